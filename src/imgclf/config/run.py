"""The train section, the stages of a chain, and the whole Config of a run.

Split from ``sections`` (which holds data, augment, model and evaluate, and the shared field
helpers) so neither outgrows its page; ``sections`` re-exports everything here.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from imgclf.config.sections import (
    MAX_SEED,
    AbsolutePath,
    AugmentConfig,
    DataConfig,
    Device,
    EvaluateConfig,
    ModelConfig,
    _Section,
    check_policy,
)
from imgclf.errors import ConfigError

SCHEDULES = Literal["none", "cosine", "step", "plateau", "keras_decay"]
KERAS_RHO, TORCH_ALPHA = 0.9, 0.99  # RMSprop's squared-gradient decay: Keras's default, torch's default
TORCH_ADADELTA_RHO = 0.9  # what Adadelta had before rho reached it (Keras's is 0.95)
# Optimizer constants that default to None (torch's value) -> the optimizers that use them; any other
# optimizer with one of them set is an error, never a silently ignored setting.
OPTIMIZER_CONSTANTS = {"eps": ("adam", "adamw", "rmsprop", "adadelta", "adagrad"),
                       "initial_accumulator_value": ("adagrad",)}
MAX_TREES = 2000  # --head rf: safehead.MAX_SCHEMA_BYTES holds this many trees' description twice over
AUTO_VIEWS = 5  # augmented views cached per image when a frozen backbone meets augmentation (feature_views unset)


# history.csv's validation columns (evaluation.metrics.validation_row), the names --monitor takes
MONITORS = ("val_loss", "val_accuracy", "val_balanced_accuracy", "val_precision_macro", "val_recall_macro",
            "val_f1_macro", "val_auc")


class TrainConfig(_Section):
    PATH_FIELDS = ("init_from",)
    epochs: int = Field(30, ge=1, description="maximum number of epochs")
    batch_size: int = Field(32, ge=1, description="images per training step; with several processes the global "
                            "batch, split evenly over them")
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop", "adadelta", "adagrad"] = Field(
        "adamw", description="optimizer")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="weight decay")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum for sgd and rmsprop (Keras's default is 0)")
    rho: float = Field(KERAS_RHO, ge=0, lt=1, description=f"rmsprop and adadelta: decay of the squared-gradient "
                       f"average (Keras rho; torch's RMSprop alpha, Adadelta rho); default {KERAS_RHO}: Keras's "
                       f"RMSprop and torch's Adadelta (Keras's Adadelta: 0.95; torch's RMSprop: {TORCH_ALPHA})")
    eps: float | None = Field(None, gt=0, lt=1, description="adam, adamw, rmsprop, adadelta, adagrad: the epsilon "
                              "added to the denominator; default torch's (1e-8; adadelta 1e-6, adagrad 1e-10); "
                              "Keras uses 1e-7")
    initial_accumulator_value: float | None = Field(None, ge=0, description="adagrad: starting value of the "
                                                    "squared-gradient sums; default torch's 0 (Keras: 0.1)")
    nesterov: bool = Field(False, description="Nesterov momentum for sgd")
    schedule: SCHEDULES = Field("cosine", description="learning-rate schedule; keras_decay: Keras's decay "
                                "argument, lr / (1 + decay * step) per batch")
    decay: float = Field(0.0, ge=0, description="schedule=keras_decay: inverse-time decay per step (Keras decay)")
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
    max_seconds: float | None = Field(None, gt=0, description="time limit for the whole training: it ends after "
                                      "the epoch when another would not finish in time, gives up an epoch part-way "
                                      "that would overrun, and keeps its best epoch")
    restore_best: bool = Field(True, description="end with the best epoch's weights, not the last")
    seed: int = Field(42, ge=0, le=MAX_SEED, description="random seed (init, augmentation, order; the split too only "
                                            "with --split-seed null)")
    device: Device = Field("auto", description="auto, cpu, cuda, cuda:1 ...")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast where the CPU/GPU computes it natively, else fp32 (fp16 on old GPUs)")
    channels_last: bool | None = Field(None, description="channels-last memory format (default: on)")
    compile: bool = Field(False, description="torch.compile the model for training (slow start, faster epochs)")
    sync_bn: bool = Field(False, description="several processes (torchrun, --nproc): BatchNorm statistics over the "
                          "global batch, not each process's share (SyncBatchNorm; CUDA only)")
    freeze: str = Field("none", description="what trains: none (all), backbone (head only), last:N, regex:PAT")
    freeze_bn: bool = Field(False, description="keep BatchNorm layers frozen and in eval mode")
    backbone_lr_mult: float = Field(1.0, gt=0, le=10, description="backbone lr = lr x this (discriminative lr)")
    feature_cache: bool = Field(True, description="with a frozen backbone, train the head on cached features")
    feature_views: int | None = Field(
        None, ge=1, le=50, description=f"frozen backbone: cached views per image; default {AUTO_VIEWS} augmented "
                                       "views with augmentation on, else 1; 1 with augmentation on trains uncached")
    average_best: int = Field(0, ge=0, le=50, description="average the weights of the last K best epochs "
                                                          "(kept if no worse on validation; 0: off)")
    head_param: float | None = Field(None, gt=0, description="--head svm|logreg|knn|rf: the head's parameter (svm, "
                                     "logreg: C; knn: n_neighbors; rf: n_estimators), fixed; default: chosen on "
                                     "validation among a few")
    head_scale: bool = Field(True, description="--head svm|logreg|knn|rf: standardise the features first (off: raw "
                             "features, as a plain SVC() on them)")
    init_from: AbsolutePath = Field(None, description="start from a trained run's whole model (head included); "
                                                      "same model settings and classes")
    init_from_as_typed: str | None = Field(None, description="train.init_from as typed (informational)")

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
        if self.decay and self.schedule != "keras_decay":
            raise ValueError(f"decay={self.decay:g} is used only by schedule=keras_decay (now {self.schedule}); "
                             "pass --schedule keras_decay, or drop --decay")
        for name in OPTIMIZER_CONSTANTS:
            if getattr(self, name) is not None and self.optimizer not in OPTIMIZER_CONSTANTS[name]:
                raise ValueError(f"{name}={getattr(self, name):g} does not apply to {self.optimizer} (used by "
                                 f"{', '.join(OPTIMIZER_CONSTANTS[name])}); drop --{name.replace('_', '-')} "
                                 "(in a grid, set it to null for those trials), or pick an optimizer that uses it")
        return self


class StageConfig(_Section):
    """One stage of staged fine-tuning: overrides of the train settings for that stage."""

    name: str = Field("stage", description="label in history.csv and the curves")
    freeze: str | None = None
    freeze_bn: bool | None = None
    epochs: int | None = Field(None, ge=1)
    batch_size: int | None = Field(None, ge=1)
    lr: float | None = Field(None, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop", "adadelta", "adagrad"] | None = None
    weight_decay: float | None = Field(None, ge=0)
    momentum: float | None = Field(None, ge=0, lt=1)
    rho: float | None = Field(None, ge=0, lt=1)
    eps: float | None = Field(None, gt=0, lt=1)
    initial_accumulator_value: float | None = Field(None, ge=0)
    schedule: SCHEDULES | None = None
    decay: float | None = Field(None, ge=0)
    patience: int | None = Field(None, ge=0)
    min_delta: float | None = Field(None, ge=0)
    early_stopping: bool | None = None
    restore_best: bool | None = Field(None, description="end this stage with its best-so-far weights (else its last)")
    backbone_lr_mult: float | None = Field(None, gt=0, le=10)
    feature_cache: bool | None = None
    feature_views: int | None = Field(None, ge=1, le=50)

    def apply(self, train: TrainConfig) -> TrainConfig:
        """The train config of this stage, validated (patience vs epochs, freeze policy)."""
        changes = self.model_dump(exclude={"name"}, exclude_none=True)
        if self.schedule not in (None, "keras_decay") and self.decay is None:
            changes["decay"] = 0.0  # the inherited decay belongs to the keras_decay schedule this stage replaces
        for name, users in OPTIMIZER_CONSTANTS.items():  # likewise an inherited constant of the replaced optimizer
            if self.optimizer not in (None, *users) and getattr(self, name) is None:
                changes[name] = None
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

    # (section, field) -> the behaviour a run had before the field existed. A run's config.yaml
    # (it records versions) without the field gets this value; new configs get the field's default.
    OLD_RUN_VALUES: ClassVar[dict[tuple[str, str], Any]] = {("train", "rho"): TORCH_ALPHA}

    @model_validator(mode="before")
    @classmethod
    def _old_run_values(cls, values: Any) -> Any:
        """An old run's config.yaml retrains as it trained then, e.g. RMSprop with torch's alpha."""
        if not isinstance(values, dict) or not values.get("versions"):
            return values
        values = dict(values)
        train = values.get("train")
        rho_was_rmsprop_only = isinstance(train, dict) and "rho" not in train
        for (section, name), old in cls.OLD_RUN_VALUES.items():
            fields = values.get(section)
            if isinstance(fields, dict) and name not in fields:
                values[section] = {**fields, name: old}
        if rho_was_rmsprop_only:
            _old_adadelta_rho(values)
        return values

    @model_validator(mode="after")
    def _fractions_fit(self) -> Config:
        if self.data.val_fraction + self.data.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1; lower one of them")
        if self.train.monitor not in MONITORS:  # it was found out after the first epoch, the run folder made
            raise ValueError(f"monitor {self.train.monitor!r} is not a validation metric; use one of "
                             f"{', '.join(MONITORS)}")
        if self.train.init_from and self.model.weights:
            raise ValueError("init_from and weights are both set: --init-from loads a whole trained run, which "
                             "would replace the --weights file; pass one of them")
        self._check_classical_head()
        return self

    def _check_classical_head(self) -> None:
        """head_param and head_scale belong to a scikit-learn head; an integer parameter must be whole."""
        train, head = self.train, self.model.head
        if head == "linear" and (train.head_param is not None or not train.head_scale):
            name = "head_param" if train.head_param is not None else "head_scale"
            raise ValueError(f"{name} applies only to --head svm, logreg, knn or rf (now linear); drop "
                             f"--{name.replace('_', '-')}, or pick such a head")
        if head in ("knn", "rf") and train.head_param is not None and not float(train.head_param).is_integer():
            what = "n_neighbors" if head == "knn" else "n_estimators"
            raise ValueError(f"head_param={train.head_param:g} is the {head} head's {what}: give a whole number")
        if head == "rf" and train.head_param is not None and train.head_param > MAX_TREES:
            raise ValueError(f"head_param={train.head_param:g} trees for the rf head: at most {MAX_TREES} (the "
                             "saved head's description grows with every tree)")


def _old_adadelta_rho(values: dict) -> None:
    """A run from before rho reached adadelta trained Adadelta with torch's rho and RMSprop with torch's alpha."""
    old = {"adadelta": TORCH_ADADELTA_RHO, "rmsprop": TORCH_ALPHA}
    train = values["train"]
    if train.get("optimizer") in old:  # any other optimizer never read rho: keep the default, and no warning
        values["train"] = {**train, "rho": old[train["optimizer"]]}
    stages = values.get("stages")
    if not isinstance(stages, list):
        return
    optimizers = [(stage.get("optimizer") or train.get("optimizer")) if isinstance(stage, dict) else None
                  for stage in stages]
    values["stages"] = [{**stage, "rho": old[optimizer]} if optimizer in old and stage.get("rho") is None else stage
                        for stage, optimizer in zip(stages, optimizers, strict=True)]
