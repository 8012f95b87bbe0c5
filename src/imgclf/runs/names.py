"""A class name as a run file may hold it: what a training could have made (see ``safeio.class_name_problem``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

from imgclf.safeio import class_name_problem, printable


def valid_class_name(name: str) -> str:
    if problem := class_name_problem(name):
        raise ValueError(f"class name '{printable(name[:40])}{'...' if len(name) > 40 else ''}' {problem}")
    return name


ClassName = Annotated[str, AfterValidator(valid_class_name)]
