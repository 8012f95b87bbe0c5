"""A yes/no value where a number is expected is refused, not read as 1 or 0.

YAML reads ``true``, ``yes`` and ``on`` as booleans, and pydantic's lax mode turns a boolean into 1 or
0 for an int or float field (and ``Literal[1, 3]`` takes ``True`` since ``True == 1``): ``lr: on`` trained
at lr 1 and ``channels: true`` in grayscale, silently.
"""

from __future__ import annotations

import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel


def yes_no_in_place_of_numbers(model: type[BaseModel], values: Any) -> list[str]:
    """``field: value`` for each boolean in ``values`` (a field's value or an item of its list) that
    ``model``'s field does not take as a boolean."""
    if not isinstance(values, dict):
        return []
    odd = []
    for name, field in model.model_fields.items():
        value = values.get(name)
        if isinstance(value, bool) and not _takes_bool(field.annotation):
            odd.append(f"{name}: {str(value).lower()}")
        elif isinstance(value, list | tuple) and any(isinstance(v, bool) for v in value) and not any(
                _takes_bool(item) for item in _item_types(field.annotation)):
            odd.append(f"{name}: {[str(v).lower() if isinstance(v, bool) else v for v in value]}".replace("'", ""))
    return odd


def _takes_bool(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if annotation is bool or annotation is Any:
        return True
    if origin is Literal:
        return any(isinstance(arg, bool) for arg in get_args(annotation))
    if origin is Annotated:
        return _takes_bool(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return any(_takes_bool(arg) for arg in get_args(annotation))
    return False


def _item_types(annotation: Any) -> list[Any]:
    """The item types of a list or tuple field (through Annotated and Optional)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _item_types(get_args(annotation)[0])
    if origin is Union or origin is types.UnionType:
        return [item for arg in get_args(annotation) for item in _item_types(arg)]
    if origin in (list, tuple):
        return [arg for arg in get_args(annotation) if arg is not Ellipsis]
    return []
