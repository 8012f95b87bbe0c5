"""Derive one CLI flag per config field, so every setting can be given on the command line.

``--batch-size 16`` sets ``train.batch_size``; ``--model resnet18`` sets ``model.name``. Flags
given on the command line override the ``--config`` file, which overrides the defaults.
Also the CLI's rules for the paths it writes: never replace a user's file unless told to, and
a full or read-only disk is one line naming the path.
"""

from __future__ import annotations

import argparse
import errno
import os
import types
import typing
from pathlib import Path
from typing import Any

from imgclf.config import Config, build_config, cli_flag, config_fields, flag_name, load_config
from imgclf.config.sections import TYPED_SUFFIX
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.safeio import special_file_kind

log = get_logger("flags")

# What a person reads after a flag in --help: the kind of value, not the config's internal name.
METAVARS = {"lr": "LR", "device": "DEVICE", "monitor": "METRIC", "freeze": "POLICY", "threshold": "RULE",
            "positive_class": "CLASS", "name": "MODEL", "path": "PATH", "cache_dir": "DIR", "weights": "FILE",
            "out": "DIR", "seed": "N", "split_seed": "N"}


def metavar(name: str, inner: Any) -> str:
    if name in METAVARS:
        return METAVARS[name]
    if name in ("rotation_range", "shear_range"):
        return "DEG"
    if inner is float:
        return "P" if any(w in name for w in ("dropout", "fraction", "smoothing", "range")) else "X"
    return "N" if inner is int else name.upper()


def with_default(help_text: str | None, default: Any) -> str:
    """The field's description and, where it has one and does not say it already, its default."""
    text = help_text or ""
    if default is None or "default" in text or default == []:
        return text
    shown = {True: "on", False: "off"}.get(default, default) if isinstance(default, bool) else default
    return f"{text} (default: {shown})"


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config to start from (e.g. a run's config.yaml)")
    for section, name, info in config_fields():
        flag = flag_name(section, name)
        dest = f"cfg__{section}__{name}" if section else f"cfg____{name}"
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS,
                                  "help": with_default(info.description, info.default)}
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
            if not choices:
                kwargs["metavar"] = "A,B" if typing.get_origin(inner) is list else metavar(name, inner)
        parser.add_argument(f"--{flag.replace('_', '-')}", **{k: v for k, v in kwargs.items() if v is not None})
    parser.add_argument("--stage", action="append", dest="stages", metavar="KEY=VALUE,...",
                        help=Config.model_fields["stages"].description)


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults < --config file < flags; validated as one Config. The file's settings are taken as written
    (``exclude_unset``): a file that names only ``train.epochs`` leaves the model unchosen, as no flag would,
    and a default value it writes out (``lr: 0.001``) counts as given, as typing it would."""
    base = load_config(args.config).model_dump(exclude_unset=True) if getattr(args, "config", None) else {}
    if getattr(args, "stages", None):
        if base.get("stages") and not getattr(args, "cfg__train__init_from", None):  # a chain: new stages, on purpose
            log.warning("warning: --stage replaces the %d stage(s) of %s (%s): the run trains only the --stage "
                        "ones; repeat --stage for each stage to keep", len(base["stages"]), args.config,
                        ", ".join(str(stage.get("name", "?")) for stage in base["stages"]))
        base["stages"] = [parse_stage(text) for text in args.stages]
    for key, value in vars(args).items():
        if not key.startswith("cfg__"):
            continue
        _, section, name = key.split("__", 2)
        if isinstance(value, str) and _is_list_field(section, name):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if section:
            base.setdefault(section, {})[name] = value
            base[section].pop(name + TYPED_SUFFIX, None)  # the file's typed form was of the file's value
        else:
            base[name] = value
    return build_config(base)


def given_settings(args: argparse.Namespace) -> frozenset[str]:
    """The settings the command line set, as dotted names: ``--lr 0.1`` -> ``train.lr``."""
    return frozenset(".".join(filter(None, key.split("__")[1:])) for key in vars(args) if key.startswith("cfg__"))


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
    """``X | None`` -> ``X``, and ``Annotated[X, ...]`` -> ``X`` (e.g. the config's bounded ``Widths`` lists)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


# What a full or unwritable disk means to the user, and what to do; other OSErrors stay tracebacks (bugs).
DISK_ERRORS = {
    errno.ENOSPC: "free some space or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EROFS: "the file system is read-only; write elsewhere (another --out, or a copy of the run)",
    errno.EACCES: "check its permissions, or write elsewhere (another --out, or a copy of the run)",
    errno.EPERM: "check its permissions, or write elsewhere (another --out, or a copy of the run)",
    # a path the user gave that cannot be one (an --out under a file, a broken link in the way, ...)
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EEXIST: "something (a file or a broken link) is in the way; choose another path or remove it",
    errno.EISDIR: "it is a folder; give a file name",
    errno.ENAMETOOLONG: "the name is too long for the file system; choose a shorter path",
    errno.ELOOP: "a symbolic link in the path loops; fix or remove it",
    errno.ENOENT: "no such file or folder; check the path",
}
PATH_ERRORS = (errno.ENOTDIR, errno.EEXIST, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT)


def disk_error_line(err: OSError, fallback: str | None) -> str | None:
    """One line for a full, read-only or forbidden disk or an impossible path, naming it; None for any other
    OSError."""
    if err.errno not in DISK_ERRORS or (err.errno in PATH_ERRORS and not err.filename):
        return None  # a path error without the path: imgclf's own bug, kept as a traceback
    path = err.filename or fallback or "the output"
    return f"{path}: {os.strerror(err.errno)} ({errno.errorcode[err.errno]}); {DISK_ERRORS[err.errno]}"


def refuse_existing_file(path: str | Path, flag: str, overwrite: bool) -> None:
    """No command replaces a user's file unless told to (``--overwrite``); a link (dangling or not) is the user's
    too, and what is not a regular file (a device such as /dev/null, a FIFO) is never replaced."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; give a file name")
    nearest = next((p for p in path.parents if os.path.lexists(p)), None)  # what the file would be made in
    if nearest is not None and not nearest.is_dir():
        what = "a link that leads nowhere (or in a loop)" if not nearest.exists() else "a file"
        raise ConfigError(f"{flag} {path}: {nearest} is {what}, not a folder; give a path in a folder")
    if kind := special_file_kind(path):  # a folder was refused above
        raise ConfigError(f"{flag} {path} is a {kind}, which imgclf never replaces; give the path of a regular file")
    if os.path.lexists(path) and not overwrite:
        raise ConfigError(f"{path} already exists; pass --overwrite to replace it, or choose another {flag}")


def refuse_filled_folder(path: str | Path, flag: str, overwrite: bool, allowed: tuple[str, ...] = ()) -> None:
    """A folder that holds files (other than ``allowed`` names) is written into only with ``--overwrite``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file; give a folder")
    held = sorted(p.name for p in path.iterdir() if p.name not in allowed) if path.is_dir() else []
    if held and not overwrite:
        raise ConfigError(f"{flag} folder {path} already holds files ({', '.join(held[:3])}); pass --overwrite "
                          f"to write into it (same-named files are replaced), or choose another {flag}")


def format_metrics(split: str, m: dict) -> str:
    """One split's metrics as the CLI prints them, with bootstrap intervals where computed."""
    ci = m.get("intervals") or {}

    def value(name: str, shown: float | None) -> str:
        interval = ci.get(name)
        text = "n/a" if shown is None else f"{shown:.4f}"
        return text + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")

    line = (f"{split}: n={m['n']} accuracy={value('accuracy', m['accuracy'])} "
            f"balanced_accuracy={m['balanced_accuracy']:.4f} f1_macro={m['f1_macro']:.4f} "
            f"roc_auc={value('roc_auc', m['roc_auc_ovr'])} log_loss={m['log_loss']:.4f}")
    if "sensitivity" in m:
        line += (f"\n  {m['positive_class']}: sensitivity={value('sensitivity', m['sensitivity'])} "
                 f"specificity={value('specificity', m['specificity'])}"
                 + (f" at threshold {m['threshold']:.4f}" if m.get("threshold") is not None else ""))
    return line


def refuse_settings_with_resume(args: argparse.Namespace) -> None:
    """``--resume RUN`` continues with the run's own saved settings: any other setting would be dropped."""
    given = [_typed_flag(key, value) for key, value in vars(args).items() if key.startswith("cfg__")]
    given += [flag for flag, value in (("--config", getattr(args, "config", None)), ("--stage", args.stages),
                                       ("DATA", args.data_dir), ("--budget", args.budget)) if value is not None]
    if given:
        raise ConfigError(f"--resume {args.resume} continues the run with its saved settings, so {', '.join(given)} "
                          "would not apply; drop them, or start a new run with them")


def _typed_flag(key: str, value: Any) -> str:
    """The flag as the user typed it, from its ``cfg__SECTION__NAME`` destination (``--no-X`` when off)."""
    _, section, name = key.split("__", 2)
    flag = cli_flag(section or None, name)
    return f"--no-{flag[2:]}" if value is False else flag
