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
Widths = Annotated[list[int], Field(max_length=64), AfterValidator(_positive)]
Device = Annotated[str, AfterValidator(_known_device)]


TYPED_SUFFIX = "_as_typed"  # a path field's form as the user typed it (informational)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    PATH_FIELDS: ClassVar[tuple[str, ...]] = ()  # stored absolute; what the user typed goes in <field>_as_typed

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
        42, ge=0, description="seed of the train/val/test split and of CV folds; fixed, so runs trained with other "
                              "--seed values share a split (null: follow --seed, as runs before 0.2 did)")
    skip_bad_images: bool = Field(False, description="skip and list unreadable images instead of failing")
    cache_dir: AbsolutePath = Field(None, description="decoded-image cache folder (default ~/.cache/imgclf)")
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = Field(
        None, description="resize filter (default: the model's own, bilinear for simple_cnn)")
    positive_class: str | None = Field(None, description="positive class for binary metrics (default: 2nd)")
    workers: int | None = Field(None, ge=0, description="data loader worker processes (default: automatic)")
    path_as_typed: str | None = Field(None, description="data.path as typed (informational)")
    cache_dir_as_typed: str | None = Field(None, description="data.cache_dir as typed (informational)")


class AugmentConfig(_Section):
    """Keras ImageDataGenerator vocabulary; ``None`` means 'take the preset's value'."""

    preset: Literal["none", "light", "medium", "strong"] = Field("light", description="augmentation preset")
    rotation_range: float | None = Field(None, ge=0, le=180, description="max rotation in degrees")
    zoom_range: float | None = Field(None, ge=0, lt=1, description="zoom in [1-z, 1+z]")
    shear_range: float | None = Field(None, ge=0, lt=90, description="max shear angle in degrees (as Keras)")
    width_shift_range: float | None = Field(None, ge=0, lt=1, description="max horizontal shift, fraction")
    height_shift_range: float | None = Field(None, ge=0, lt=1, description="max vertical shift, fraction")
    horizontal_flip: bool | None = Field(None, description="random left-right flips")
    vertical_flip: bool | None = Field(None, description="random up-down flips")
    fill_mode: Literal["nearest", "constant", "reflect"] | None = Field(
        None, description="how pixels outside the image are filled")
    cval: int = Field(0, ge=0, le=255, description="fill value for fill_mode=constant")
    brightness_range: list[float] | None = Field(
        None, min_length=2, max_length=2, description="brightness factor range, e.g. 0.8,1.2")


# The model section lives in its own module; imported here, after the helpers it builds on.
from imgclf.config.model import ModelConfig  # noqa: E402


class TrainConfig(_Section):
    epochs: int = Field(30, ge=1, description="maximum number of epochs")
    batch_size: int = Field(32, ge=1, description="images per batch")
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop", "adadelta", "adagrad"] = Field(
        "adamw", description="optimizer")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum for sgd and rmsprop")
    nesterov: bool = Field(False, description="Nesterov momentum for sgd")
    schedule: Literal["none", "cosine", "step", "plateau"] = Field("cosine", description="learning-rate schedule")
    step_size: int = Field(10, ge=1, description="schedule=step: epochs between decays")
    gamma: float = Field(0.1, gt=0, le=1, description="schedule=step/plateau: decay factor")
    class_weight: Literal["none", "balanced"] = Field("none", description="loss weights per class")
    sampler: Literal["none", "weighted"] = Field("none", description="weighted = class-balanced sampling")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing")
    monitor: str = Field("val_loss", description="early-stopping metric: val_loss, val_accuracy, val_f1_macro..")
    patience: int | None = Field(None, ge=0, description="epochs without improvement before stopping "
                                 "(default: min(10, epochs))")
    min_delta: float = Field(0.0, ge=0, description="smallest change that counts as an improvement")
    early_stopping: bool = Field(True, description="stop when the monitor stops improving")
    restore_best: bool = Field(True, description="end with the best epoch's weights, not the last")
    seed: int = Field(42, ge=0, description="random seed (splits, init, augmentation, order)")
    device: Device = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the CPU/GPU computes it natively, else fp32 (fp16 on old GPUs)")
    channels_last: bool | None = Field(None, description="channels-last memory format (default: on)")
    compile: bool = Field(False, description="torch.compile the model for training (slow start, faster epochs)")
    freeze: str = Field("none", description="what trains: none (all), backbone (head only), last:N, regex:PAT")
    freeze_bn: bool = Field(False, description="keep BatchNorm layers frozen and in eval mode")
    backbone_lr_mult: float = Field(1.0, gt=0, le=10, description="backbone lr = lr x this (discriminative lr)")
    feature_cache: bool = Field(True, description="with a frozen backbone, train the head on cached features")
    feature_views: int = Field(1, ge=1, le=50, description="cached views per image (>1: augmented views)")
    average_best: int = Field(0, ge=0, le=50, description="average the weights of the last K best epochs "
                                                          "(kept if no worse on validation; 0: off)")

    @field_validator("freeze")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        try:
            return check_policy(value)
        except ConfigError as err:
            raise ValueError(str(err)) from None

    @property
    def effective_patience(self) -> int:
        """The default patience shrinks with a short run; only an explicit one can be too large."""
        return min(10, self.epochs) if self.patience is None else self.patience

    @model_validator(mode="after")
    def _patience_fits(self) -> TrainConfig:
        if self.early_stopping and self.patience is not None and self.patience > self.epochs:
            raise ValueError(f"patience={self.patience} is larger than epochs={self.epochs}; lower --patience")
        return self


class EvaluateConfig(_Section):
    """How a trained model turns probabilities into decisions, and how it is evaluated."""

    threshold: str = Field(
        "argmax", description="binary decision rule, chosen on validation: argmax (0.5), max_f1, youden, "
                              "sensitivity:0.95 (the highest threshold that keeps this sensitivity)")
    tta: Literal["none", "flip", "flip_shift"] = Field(
        "none", description="test-time augmentation: average probabilities over flips (and small shifts)")
    bootstrap: int = Field(1000, ge=0, le=100000, description="bootstrap resamples for AUC intervals (0: none)")
    report: bool = Field(True, description="write report.html (with a Grad-CAM gallery) when a run ends")

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


class StageConfig(_Section):
    """One stage of staged fine-tuning: overrides of the train settings for that stage."""

    name: str = Field("stage", description="label in history.csv and the curves")
    freeze: str | None = None
    freeze_bn: bool | None = None
    epochs: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop", "adadelta", "adagrad"] | None = None
    weight_decay: float | None = Field(None, ge=0)
    schedule: Literal["none", "cosine", "step", "plateau"] | None = None
    patience: int | None = Field(None, ge=0)
    early_stopping: bool | None = None
    backbone_lr_mult: float | None = Field(None, gt=0, le=10)
    feature_views: int | None = Field(None, ge=1, le=50)

    def apply(self, train: TrainConfig) -> TrainConfig:
        """The train config of this stage, validated (patience vs epochs, freeze policy)."""
        changes = self.model_dump(exclude={"name"}, exclude_none=True)
        return TrainConfig.model_validate({**train.model_dump(), **changes})


class Config(_Section):
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    stages: list[StageConfig] = Field(
        [], description="staged fine-tuning, e.g. name=head,freeze=backbone,epochs=10 (repeat the flag)")
    out: str | None = Field(None, description="run directory to write")
    versions: dict[str, str] = Field({}, description="library versions that made the run (informational)")

    @model_validator(mode="after")
    def _fractions_fit(self) -> Config:
        if self.data.val_fraction + self.data.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1; lower one of them")
        if self.train.monitor.startswith("train_"):
            raise ValueError("monitor must be a validation metric (val_loss, val_accuracy, ...)")
        return self


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
    return f"config {where}: {message}{got}"
