"""Derive one CLI flag per config field, so every setting can be given on the command line.

``--batch-size 16`` sets ``train.batch_size``; ``--model resnet18`` sets ``model.name``. Flags
given on the command line override the ``--config`` file, which overrides the defaults.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any

from .config import SECTIONS, Config, build_config, load_config
from .errors import ConfigError

# Fields whose flag is not simply their name: the names users expect from the README.
FLAG_NAMES = {("model", "name"): "model", ("augment", "preset"): "augment", ("data", "path"): "data"}
TOP_LEVEL = ("out",)


def config_fields() -> list[tuple[str | None, str, Any]]:
    """(section or None, field name, FieldInfo) for every settable leaf of Config."""
    leaves: list[tuple[str | None, str, Any]] = []
    for section in SECTIONS:
        model = Config.model_fields[section].annotation
        leaves += [(section, name, info) for name, info in model.model_fields.items()]  # type: ignore[union-attr]
    leaves += [(None, name, Config.model_fields[name]) for name in TOP_LEVEL]
    return leaves


def flag_name(section: str | None, name: str) -> str:
    return FLAG_NAMES.get((section, name), name) if section else name


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config to start from (e.g. a run's config.yaml)")
    for section, name, info in config_fields():
        flag = flag_name(section, name)
        dest = f"cfg__{section}__{name}" if section else f"cfg____{name}"
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": info.description}
        inner = _strip_optional(info.annotation)
        if inner is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            choices = typing.get_args(inner) if typing.get_origin(inner) is typing.Literal else None
            if choices:
                kwargs["choices"] = list(choices)
                kwargs["type"] = type(choices[0])
            elif inner in (int, float):
                kwargs["type"] = inner
            kwargs["metavar"] = "A,B" if typing.get_origin(inner) is list else None
        parser.add_argument(f"--{flag.replace('_', '-')}", **{k: v for k, v in kwargs.items() if v is not None})
    parser.add_argument("--stage", action="append", dest="stages", metavar="KEY=VALUE,...",
                        help=Config.model_fields["stages"].description)


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults < --config file < flags; validated as one Config."""
    base = load_config(args.config).model_dump() if getattr(args, "config", None) else {}
    if getattr(args, "stages", None):
        base["stages"] = [parse_stage(text) for text in args.stages]
    for key, value in vars(args).items():
        if not key.startswith("cfg__"):
            continue
        _, section, name = key.split("__", 2)
        if isinstance(value, str) and _is_list_field(section, name):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if section:
            base.setdefault(section, {})[name] = value
        else:
            base[name] = value
    return build_config(base)


def parse_stage(text: str) -> dict[str, str]:
    """``name=head,freeze=backbone,epochs=10`` -> a dict that StageConfig validates."""
    stage = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--stage {text!r}: {item!r} is not KEY=VALUE")
        stage[key.strip()] = value.strip()
    return stage


def _is_list_field(section: str, name: str) -> bool:
    model = Config.model_fields[section].annotation if section else Config
    annotation = _strip_optional(model.model_fields[name].annotation)  # type: ignore[union-attr]
    return typing.get_origin(annotation) is list


def _strip_optional(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return args[0] if len(args) == 1 else annotation
    return annotation
