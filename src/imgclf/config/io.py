"""Config files and values: validate a nested dict, read and write YAML, and walk the fields.

Every problem is one line: unknown keys get a "did you mean", pydantic's errors are folded.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from imgclf.config.sections import TYPED_SUFFIX, Config, StageConfig, one_line
from imgclf.config.yamlfile import load_yaml
from imgclf.errors import ConfigError
from imgclf.safeio import read_capped

MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; a bigger file is refused before YAML parses it

SECTIONS = ("data", "augment", "model", "train", "evaluate")


def build_config(values: dict[str, Any] | None = None) -> Config:
    """Validate a nested dict into a Config; any problem becomes a one-line ConfigError."""
    values = values or {}
    _check_keys(values)
    try:
        return Config.model_validate(values)
    except ValidationError as err:
        raise ConfigError(one_line(err)) from None


def load_config(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = read_capped(path, MAX_CONFIG_BYTES, ConfigError, "give the YAML config imgclf wrote").decode("utf-8-sig")
        values = load_yaml(text) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested far deeper than a config can be") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except (ValueError, OverflowError) as err:  # a date like 2026-13-45, an integer past 4,300 digits
        raise ConfigError(f"config file {path} holds a value YAML cannot read ({str(err).splitlines()[0][:120]}); "
                          "fix it") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections (data:, model:, train:)")
    try:
        return build_config(values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _check_keys(values: dict[str, Any]) -> None:
    """Unknown keys get a 'did you mean' suggestion before pydantic sees them."""
    for key, section in values.items():
        if key not in Config.model_fields:
            raise ConfigError(f"unknown config section {key!r}{_suggest(key, Config.model_fields)}")
        if key in SECTIONS and isinstance(section, dict):
            fields = Config.model_fields[key].annotation.model_fields  # type: ignore[union-attr]
            for name in section:
                if name not in fields:
                    raise ConfigError(f"unknown config key '{key}.{name}'{_suggest(name, fields)}")
        if key == "stages" and isinstance(section, list):
            for i, stage in enumerate(section):
                for name in stage if isinstance(stage, dict) else ():
                    if name not in StageConfig.model_fields:
                        raise ConfigError(f"unknown key 'stages[{i}].{name}'{_suggest(name, StageConfig.model_fields)}")


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else ""




FLAG_NAMES = {("model", "name"): "model", ("augment", "preset"): "augment", ("data", "path"): "data"}


TOP_LEVEL = ("out",)


def config_fields() -> list[tuple[str | None, str, Any]]:
    """(section or None, field name, FieldInfo) for every settable leaf of Config."""
    leaves: list[tuple[str | None, str, Any]] = []
    for section in SECTIONS:
        model = Config.model_fields[section].annotation
        leaves += [(section, name, info) for name, info in model.model_fields.items()  # type: ignore[union-attr]
                   if not name.endswith(TYPED_SUFFIX)]  # informational, written by the config itself
    leaves += [(None, name, Config.model_fields[name]) for name in TOP_LEVEL]
    return leaves


def flag_name(section: str | None, name: str) -> str:
    return FLAG_NAMES.get((section, name), name) if section else name


def cli_flag(section: str | None, name: str) -> str:
    """The command line's flag for a config field: ``("train", "label_smoothing")`` -> ``--label-smoothing``."""
    return "--" + flag_name(section, name).replace("_", "-")
