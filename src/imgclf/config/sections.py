"""One typed config for a run: data, augmentation, model, training. Saved with every run.

Every leaf field is also a CLI flag (``cliflags.py`` derives them), so a run is reproduced by
``imgclf train --config run/config.yaml`` and any flag overrides the file.
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgclf.config.booleans import yes_no_in_place_of_numbers
from imgclf.errors import ConfigError


def _absolute(value: str | None) -> str | None:
    """Resolved against the current directory when the config is made, so a saved config works from anywhere."""
    return os.path.abspath(os.path.expanduser(value)) if value else value


MAX_WIDTH = 1 << 16  # filters or units of one layer; far beyond any image classifier's


def _positive(widths: list[int]) -> list[int]:
    odd = next((w for w in widths if not 0 < w <= MAX_WIDTH), None)
    if odd is not None:
        raise ValueError(f"every width must be a positive number up to {MAX_WIDTH} (got {odd}); e.g. 32,64")
    return widths


def _known_device(value: str) -> str:
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ValueError(f"unknown device {value!r}; use auto, cpu, cuda, cuda:N or mps")
    return value


AbsolutePath = Annotated[str | None, AfterValidator(_absolute)]
MAX_SEED = 2**32 - 1  # numpy's legacy seeding takes 32 bits; larger seeds overflowed deep in a library
Widths = Annotated[list[int], Field(max_length=64), AfterValidator(_positive)]
Device = Annotated[str, AfterValidator(_known_device)]


TYPED_SUFFIX = "_as_typed"  # a path field's form as the user typed it (informational)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()  # stored absolute; what the user typed goes in <field>_as_typed

    @model_validator(mode="before")
    @classmethod
    def _no_yes_no_numbers(cls, values: Any) -> Any:
        odd = yes_no_in_place_of_numbers(cls, values)
        if odd:
            raise ValueError(f"{'; '.join(odd)}: yes/no where a number is expected (YAML reads true, yes "
                             "and on as yes/no); give the number")
        return values

    @model_validator(mode="before")
    @classmethod
    def _keep_typed_paths(cls, values: Any) -> Any:
        """A relative value is as typed; an absolute one keeps the typed form it was saved with."""
        for name in cls.PATH_FIELDS if isinstance(values, dict) else ():
            value, typed = values.get(name), f"{name}_as_typed"
            if isinstance(value, str) and value and (not os.path.isabs(value) or not values.get(typed)):
                values = {**values, typed: value}
        return values


class DataConfig(_Section):
    PATH_FIELDS = ("path", "cache_dir")
    path: AbsolutePath = Field(None, description="dataset folder, or a CSV/TSV with path,label[,split]")
    layout: Literal["auto", "split_folders", "class_folders", "csv"] = Field(
        "auto", description="dataset layout; auto detects train/val/test folders, class folders or a CSV")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="share held out for validation (of a pool, or of train)")
    test_fraction: float = Field(0.15, ge=0, lt=1, description="share of a pool (class folders, CSV) held out for test")
    image_size: int | None = Field(
        None, gt=0, le=4096, description="square input size in px (default: the model's own, 64 for simple_cnn)")
    channels: Literal[1, 3] = Field(3, description="1 = grayscale input, 3 = RGB")
    split_seed: int | None = Field(
        42, ge=0, le=MAX_SEED,
        description="seed of the train/val/test split and of CV folds; fixed, so runs trained with other --seed "
                    "values share a split (null: follow --seed, as runs before 0.2 did)")
    group_column: str | None = Field(None, min_length=1, max_length=255,
                                     description="a CSV column naming each image's group (e.g. patient): val and "
                                                 "test take whole groups, and cv's folds too")
    skip_bad_images: bool = Field(False, description="skip and list unreadable images instead of failing")
    cache_dir: AbsolutePath = Field(None, description="decoded-image cache folder (default $IMGCLF_CACHE_DIR, else "
                                           "~/.cache/imgclf)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None, description="resize filter (default: the model's own, bilinear for simple_cnn)")
    positive_class: str | None = Field(None, description="positive class for binary metrics (default: 2nd)")
    workers: int | None = Field(None, ge=0, le=256,
                                description="data loader worker processes (default: automatic; at most 256)")
    path_as_typed: str | None = Field(None, description="data.path as typed (informational)")
    cache_dir_as_typed: str | None = Field(None, description="data.cache_dir as typed (informational)")

    @field_validator("group_column")
    @classmethod
    def _group_is_another_column(cls, column: str | None) -> str | None:
        if column is not None and column.strip().lower() in ("path", "label", "split"):  # what the CSV's rows mean
            raise ValueError(f"{column!r} is a column the dataset CSV gives its own meaning; name the column that "
                             "holds each image's group (e.g. patient)")
        return column


class AugmentConfig(_Section):
    """Keras ImageDataGenerator vocabulary; ``None`` means 'take the preset's value'."""

    preset: Literal["none", "light", "medium", "strong"] = Field("light", description="augmentation preset")
    rotation_range: float | None = Field(None, ge=0, le=180, description="max rotation in degrees")
    zoom_range: float | None = Field(None, ge=0, lt=1, description="zoom in [1-z, 1+z]")
    zoom_axes: Literal["same", "independent"] = Field(
        "same", description="same: one zoom factor for both axes; independent: x and y factors drawn apart, "
                            "as Keras's zoom_range")
    shear_range: float | None = Field(None, ge=0, lt=90, description="max shear angle in degrees (as Keras)")
    width_shift_range: float | None = Field(None, ge=0, lt=1, description="max horizontal shift, fraction")
    height_shift_range: float | None = Field(None, ge=0, lt=1, description="max vertical shift, fraction")
    horizontal_flip: bool | None = Field(None, description="random left-right flips")
    vertical_flip: bool | None = Field(None, description="random up-down flips")
    fill_mode: Literal["nearest", "constant", "reflect"] | None = Field(
        None, description="how pixels outside the image are filled")
    cval: int = Field(0, ge=0, le=255, description="fill value for fill_mode=constant")
    brightness_range: list[Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)]] | None = Field(
        None, min_length=2, max_length=2, description="brightness factor range, e.g. 0.8,1.2")

    @model_validator(mode="after")
    def _zoom_axes_need_zoom(self) -> AugmentConfig:
        if self.zoom_axes != "same" and (self.zoom_range == 0 or (self.zoom_range is None and self.preset == "none")):
            raise ValueError(f"zoom_axes={self.zoom_axes} needs a zoom: set --zoom-range (e.g. 0.2) or a preset "
                             "that zooms, or drop --zoom-axes")
        return self


# The model section lives in its own module; imported here, after the helpers it builds on.
from imgclf.config.model import ModelConfig  # noqa: E402, F401 (re-exported)


class EvaluateConfig(_Section):
    """How a trained model turns probabilities into decisions, and how it is evaluated."""

    threshold: str = Field(
        "argmax", description="binary decision rule, chosen on validation: argmax (0.5), max_f1, youden, "
                              "sensitivity:0.95 (the highest threshold that keeps this sensitivity)")
    tta: Literal["none", "flip", "flip_shift"] = Field(
        "none", description="test-time augmentation: average probabilities over flips (and small shifts)")
    bootstrap: int = Field(1000, ge=0, le=100000, description="bootstrap resamples for AUC intervals (0: none)")
    report: bool = Field(True, description="write report.html (with a Grad-CAM gallery) when a run ends")
    baseline: bool = Field(True, description="also score a linear probe on frozen pretrained (EfficientNet-Lite0) "
                           "features as a baseline, on the same images (seconds; the majority-class baseline is "
                           "always shown)")

    @field_validator("threshold")
    @classmethod
    def _known_rule(cls, rule: str) -> str:
        if rule in ("argmax", "max_f1", "youden"):
            return rule
        name, _, target = rule.partition(":")
        try:
            if name == "sensitivity" and 0 < float(target) <= 1:
                return rule
        except ValueError:
            pass
        raise ValueError(f"threshold must be argmax, max_f1, youden or sensitivity:S with 0 < S <= 1 (got {rule!r})")

    @classmethod
    def check_threshold(cls, rule: str) -> str:
        """``rule`` if it is a threshold rule, else a one-line ConfigError."""
        try:
            return cls(threshold=rule).threshold
        except ValidationError as err:
            raise ConfigError(one_line(err).replace("config threshold", "--threshold")) from None


def check_policy(policy: str) -> str:
    """Validate a policy string early; return it unchanged."""
    if policy in ("none", "backbone"):
        return policy
    kind, _, arg = policy.partition(":")
    if kind == "last" and arg.isdigit():
        return policy
    if kind == "regex" and arg:
        try:
            re.compile(arg)
        except re.error as err:
            raise ConfigError(f"freeze={policy!r}: bad regular expression ({err})") from None
        return policy
    raise ConfigError(f"freeze={policy!r} is not a policy; use none, backbone, last:N or regex:PATTERN")


# A bounded repr of a bad value, even of a YAML "billion laughs" structure of shared lists.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxstring = 2, 4, 4, 60


def one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    message = first["msg"].removeprefix("Value error, ")
    got = f" (got {_SHORT.repr(first['input'])[:80]})" if first["type"] != "value_error" and "input" in first else ""
    return f"config {where[:120]}: {message[:300]}{got}"


# The train section, the stages and the whole Config live in run.py, which builds on the helpers
# above; imported last, so both modules are complete whichever is imported first.
from imgclf.config.run import Config, StageConfig, TrainConfig  # noqa: E402, F401 (re-exported)
