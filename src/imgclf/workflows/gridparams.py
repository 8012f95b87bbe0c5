"""The grid's vocabulary: which settings vary, over which values, and how a grid point becomes a config.

A setting is named by its flag (``lr``, ``batch-size``), as ``section.field`` (``train.lr``), as a
stage's field (``stages.1.lr`` by position from 0, or ``stages.finetune.lr`` by name), or is the
whole ``stages`` list. Values come from ``--param NAME=V1,V2`` (a list field's values in brackets,
``dense_layers=[512],[256,128]``; ``;`` separates values too) or from a YAML mapping of settings to
lists. In the YAML, a list of mappings couples settings: ``optimizer_lr: [{optimizer: rmsprop, lr:
1e-3}, {optimizer: adam, lr: 1e-4}]`` is one axis of two points (its key is only a label).
A grid value that a stage would override is an error, never a silently ignored axis.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, NamedTuple

import yaml

from imgclf.config import Config, StageConfig, config_fields, flag_name
from imgclf.config.stages import default_stages, resolve_stages
from imgclf.config.yamlfile import load_yaml
from imgclf.errors import ConfigError
from imgclf.safeio import read_capped

MAX_TRIALS = 10_000  # every trial's config is built before the first trains
MAX_GRID_BYTES = 1 << 20  # a --grid file is a few lines


class Setting(NamedTuple):
    """Where a grid key lands: a section field, a top-level field, or a field of one stage."""

    section: str | None  # None: top level; "stages": the field of the stage ``stage``
    name: str
    stage: str | None = None  # a position ("1") or a stage name

    def describe(self) -> str:
        if self.section == "stages":
            return f"stages.{self.stage}.{self.name}"
        return f"{self.section}.{self.name}" if self.section else self.name

    def given_in(self, given: frozenset[str]) -> bool:
        """Whether the command line (``given``: dotted names) set it; a stage's lr counts as set by --lr, which
        every stage inherits."""
        return self.describe() in given or (self.section == "stages" and f"train.{self.name}" in given)


def setting(key: str) -> Setting:
    """``lr``, ``batch-size``, ``model``, ``train.lr``, ``stages.1.lr`` or ``stages`` -> where it lands."""
    key = key.strip().replace("-", "_")
    for section, name, _ in config_fields():
        if key in (flag_name(section, name), f"{section}.{name}" if section else name):
            return Setting(section, name)
    if key == "stages":
        return Setting(None, "stages")
    parts = key.split(".")
    if len(parts) == 3 and parts[0] == "stages":
        if parts[2] not in StageConfig.model_fields or parts[2] == "name":
            raise ConfigError(f"grid setting {key!r}: stages have no field {parts[2]!r}; they have "
                              f"{', '.join(n for n in StageConfig.model_fields if n != 'name')}")
        return Setting("stages", parts[2], parts[1])
    raise ConfigError(f"grid setting {key!r} is not a config field (see imgclf train --help); a stage's field is "
                      "stages.N.FIELD, e.g. stages.1.lr")


def parse_params(items: list[str], grid_file: str | None = None) -> dict[str, list]:
    """``["lr=1e-3,1e-4", ...]`` and/or a YAML mapping -> {key: [values]}; a coupled axis has mapping values."""
    grid: dict[str, list] = _read_grid_file(grid_file) if grid_file else {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise ConfigError(f"--param {item!r}: use NAME=V1,V2,... (a list field: NAME=[1,2],[3])")
        if key.strip() in grid:  # a second --param, or --param beside --grid, for one setting would replace it
            raise ConfigError(f"grid setting {key.strip()!r} is given twice (--param and --grid, or two --param); "
                              "list all its values once")
        grid[key.strip()] = [_parse_value(key, text) for text in split_values(values)]
    if not grid:
        raise ConfigError("no grid: pass --param NAME=V1,V2 (repeatable) or --grid FILE.yaml")
    _check_axes(grid)
    if (trials := math.prod(len(values) for values in grid.values())) > MAX_TRIALS:
        sizes = " x ".join(f"{len(values)} {key}" for key, values in grid.items())
        raise ConfigError(f"grid: {trials:,} trials ({sizes}); at most {MAX_TRIALS:,}: narrow an axis, or couple "
                          "settings on one axis")
    return grid


def split_values(text: str) -> list[str]:
    """Split at the commas and semicolons outside brackets: ``[512],[256,128]`` -> two values."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char in ",;" and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def _parse_value(key: str, text: str) -> Any:
    if text.startswith("["):
        try:
            value = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError, OverflowError, RecursionError):
            value = None
        if not isinstance(value, list):
            raise ConfigError(f"--param {key}: {text!r} is not a list; write it as [1,2] (brackets, commas)")
        return value
    return _coerce(text)


def _coerce(text: str) -> Any:
    """'32' -> 32, '1e-3' -> 0.001, 'true' -> True; anything else stays a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _read_grid_file(path: str) -> dict[str, list]:
    try:
        text = read_capped(path, MAX_GRID_BYTES, ConfigError, "give a YAML mapping of settings to lists of values",
                           why="far more than a grid's few lines")
        loaded = load_yaml(text.decode("utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"--grid {path}: no such file") from None
    except (OSError, yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:  # ValueError: UTF-8, dates
        reason = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise ConfigError(f"--grid {path}: cannot read it as YAML ({reason})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--grid {path} must map config fields to lists of values")
    return {str(k): v if isinstance(v, list) else [v] for k, v in loaded.items()}


def overridden(config: Config, grid: dict[str, list], given: frozenset[str]) -> list[str]:
    """The settings in ``given`` (set on the command line, as dotted names) that the grid would set to another
    value in some trial: what the user asked would be replaced."""
    replaced = []
    for key, values in grid.items():
        for name, value in ((name, value) for point in axis_points(key, values) for name, value in point.items()):
            target = setting(str(name))
            if target.describe() in given and target.section != "stages" and _differs(config, target, value):
                replaced.append(target.describe())
    return list(dict.fromkeys(replaced))


def axis_points(key: str, values: list) -> list[dict]:
    """An axis's trials as settings: a coupled axis's mappings as they are, else ``{key: value}`` each."""
    return values if all(isinstance(v, dict) for v in values) else [{key: v} for v in values]


def _differs(config: Config, target: Setting, value: Any) -> bool:
    """Whether ``value``, validated as the config would take it (YAML's 1e-3 is a string), is not the setting's."""
    if target.section is None:
        return value != getattr(config, target.name)
    section = getattr(config, target.section)
    try:
        taken = type(section).model_validate({**section.model_dump(), target.name: value})
    except ValueError:  # the trial's own check names it
        return True
    return getattr(taken, target.name) != getattr(section, target.name)


NOT_VARIED = {"out": "every trial writes into OUT/trials/<trial>", "versions": "imgclf records it"}


def _check_axes(grid: dict[str, list]) -> None:
    """Every key a setting, list fields given lists, coupled axes all mappings, no setting on two axes."""
    seen: dict[Setting, str] = {}
    for key, values in grid.items():
        if not values:
            raise ConfigError(f"grid {key}: no values; list at least one")
        mappings = [isinstance(v, dict) for v in values]
        if any(mappings) and not all(mappings):
            raise ConfigError(f"grid {key}: mixes mappings and plain values; a coupled axis lists mappings only, "
                              "e.g. [{optimizer: adam, lr: 1.0e-4}, {optimizer: sgd, lr: 1.0e-2}]")
        points = axis_points(key, values)
        same = next((v for i, v in enumerate(values) if _canonical(v) in map(_canonical, values[:i])), None)
        if same is not None:  # two trials of one setting, seeded apart or not, ranked as two
            raise ConfigError(f"grid {key}: the value {same!r} is listed twice (as the same number or setting); "
                              "list each value once")
        for name in dict.fromkeys(k for point in points for k in point):
            target = setting(str(name))
            if target.section is None and target.name in NOT_VARIED:
                raise ConfigError(f"grid {name}: not a setting a grid varies ({NOT_VARIED[target.name]})")
            if target in seen and seen[target] != key:  # two axes (lr and train.lr): one would be lost
                raise ConfigError(f"grid: {target.describe()} is varied twice (axes {seen[target]} and {key}); keep "
                                  "it on one axis")
            seen[target] = key
            for point in points:
                if name in point:
                    _check_list_value(target, name, point[name])


def _canonical(value: Any) -> Any:
    """A value as a trial takes it: '1e-3' (YAML reads it as text), 1e-3 and 0.001 alike."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _canonical(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_canonical(v) for v in value)
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _check_list_value(target: Setting, key: str, value: Any) -> None:
    if _is_list_field(target) and not isinstance(value, list) and value is not None:
        raise ConfigError(f"grid {key}: a list setting, so each value is a list, e.g. --param {key}=[512],[256,128] "
                          f"or in YAML {key}: [[512], [256, 128]] (got {value!r})")


def _is_list_field(target: Setting) -> bool:
    if target.section in (None, "stages"):
        return False
    section = Config.model_fields[target.section].annotation
    annotation = section.model_fields[target.name].annotation  # type: ignore[union-attr]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return typing.get_origin(annotation) is list


def flat_params(point: dict[str, Any]) -> dict[str, Any]:
    """A grid point with its coupled axes opened: {opt: {optimizer: adam, lr: 1e-4}} -> {optimizer: adam, lr: 1e-4}."""
    flat: dict[str, Any] = {}
    for key, value in point.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return flat


def apply_params(values: dict[str, Any], params: dict[str, Any]) -> None:
    """Write a grid point's settings into a config dict (``config.model_dump()``), in place."""
    for key, value in params.items():
        target = setting(key)
        if target.section == "stages":
            values["stages"][_stage_position(values["stages"], target)][target.name] = value
        elif target.section:
            values[target.section][target.name] = value
        else:
            values[target.name] = value


def _stage_position(stages: list[dict], target: Setting) -> int:
    names = [stage.get("name") for stage in stages]
    listed = ", ".join(f"{i} {n}" for i, n in enumerate(names)) or "none"
    if target.stage is not None and target.stage.isdigit() and int(target.stage) < len(stages):
        return int(target.stage)
    if target.stage in names and names.count(target.stage) == 1:
        return names.index(target.stage)
    raise ConfigError(f"--param {target.describe()}: no such stage (or its name is not unique); the config's "
                      f"stages are: {listed}. Give stages in the config (stages:) or with --stage to vary them")


def check_reaches_stages(trial: Config, params: dict[str, Any]) -> None:
    """A train setting on a grid axis must reach every stage: one that a stage sets for itself is an error."""
    recipe = " of the default transfer recipe" if default_stages(trial) else ""
    for key in params:
        target = setting(key)
        if target.section != "train" or target.name not in StageConfig.model_fields:
            continue
        wanted = getattr(trial.train, target.name)
        stages = resolve_stages(trial)
        if recipe and target.name == "epochs" and sum(cfg.epochs for _, cfg in stages) == wanted:
            continue  # the recipe shares the epochs out between its stages: the axis reaches them as their total
        for position, (name, cfg) in enumerate(stages):
            if getattr(cfg, target.name) != wanted:
                fix = (f"vary stages.{position}.{target.name} instead, or remove {target.name} from that stage"
                       if trial.stages else "give the stages yourself (--stage or stages:) and vary "
                                            f"stages.N.{target.name}")
                raise ConfigError(f"--param {key}: stage {position} ({name}){recipe} sets its own "
                                  f"{target.name}={getattr(cfg, target.name)!r}, so the grid's {target.name}="
                                  f"{wanted!r} would not reach it; {fix}")
