"""Which stages a config trains, and with what settings, decided from the config alone (no torch): the
training runs them, and the command line checks them before it loads torch (``cli.checks``)."""

from __future__ import annotations

import math

from pydantic import ValidationError

from imgclf.config.io import one_line
from imgclf.config.run import Config
from imgclf.config.sections import StageConfig, TrainConfig
from imgclf.errors import ConfigError

# Used with --pretrained/--weights when no stages are given: a head on cached frozen features first
# (seconds, and usually most of the accuracy on small sets), then a low-lr fine-tune of the whole
# network with BatchNorm frozen, kept only where it beats the head on validation.
DEFAULT_TRANSFER_STAGES = (
    StageConfig(name="head", freeze="backbone", epochs=40, lr=1e-3, patience=8, schedule="cosine"),
    StageConfig(name="finetune", freeze="none", freeze_bn=True, lr=1e-4, epochs=8, patience=3,
                schedule="cosine"),
)


def default_stages(config: Config) -> list[StageConfig]:
    """The default transfer recipe when a pretrained or --weights start gives no stages.

    ``--epochs N`` bounds the total: the fine-tune gets min(8, N // 2) epochs and the head the rest
    (the default 30: 22 + 8; ``--epochs 2``: 1 + 1; ``--epochs 1``: the head alone). A start from a
    whole trained run (``init_from``) has a trained head already: it trains as one stage with the
    train settings, as a separate Keras training of the loaded model would.
    """
    if config.stages or config.train.init_from or not (config.model.pretrained or config.model.weights):
        return []
    head, finetune = DEFAULT_TRANSFER_STAGES
    tune_epochs = min(finetune.epochs, config.train.epochs // 2)
    head_epochs = config.train.epochs - tune_epochs
    stages = [head.model_copy(update={"epochs": head_epochs, "patience": min(head.patience, head_epochs)})]
    if tune_epochs:
        stages.append(finetune.model_copy(update={"epochs": tune_epochs,
                                                  "patience": min(finetune.patience, tune_epochs)}))
    return stages


def given_train_settings(config: Config) -> set[str]:
    """The train settings the user gave: those typed (pydantic's ``model_fields_set``, so ``--lr 0.001`` counts
    though 0.001 is the default) and those away from their defaults. A config rebuilt from a whole dump (a run's
    config.yaml, which records ``versions``, even one from before a field existed; a cv fold's, a grid trial's)
    sets every field: there only values away from the defaults count."""
    defaults = TrainConfig()
    changed = {name for name in TrainConfig.model_fields if getattr(config.train, name) != getattr(defaults, name)}
    typed = config.train.model_fields_set
    dumped = bool(config.versions) or typed >= TrainConfig.model_fields.keys()
    return changed | (set() if dumped else typed)


def recipe_overrides(config: Config) -> dict[str, dict[str, object]]:
    """Train settings the user gave that a stage of the default transfer recipe replaces with another value:
    {name: {stage: its value}} (for a warning). ``--epochs`` bounds the recipe's total, so it applies."""
    given, replaced = given_train_settings(config), {}
    for stage in default_stages(config) if config.model.head == "linear" else []:  # a classical head trains no stage
        for name, value in stage.model_dump(exclude={"name", "epochs"}, exclude_none=True).items():
            if name in given and value != getattr(config.train, name):
                replaced.setdefault(name, {})[stage.name] = value
    return replaced


def resolve_stages(config: Config) -> list[tuple[str, TrainConfig]]:
    """(name, effective train config) per stage."""
    stages = list(config.stages) or default_stages(config)
    if not stages:
        return [("train", config.train)]
    resolved = []
    for i, stage in enumerate(stages):
        try:
            resolved.append((stage.name, stage.apply(config.train)))
        except ValidationError as err:
            raise ConfigError(f"stage {i} ({stage.name}): {one_line(err)}") from None
    return resolved


SYNC_BN_NEEDS_CUDA = "--sync-bn needs CUDA GPUs (torch's SyncBatchNorm does not run on the CPU); drop --sync-bn"


def per_rank_batch(global_batch: int, world_size: int) -> int:
    """Images per rank and step for the global ``--batch-size``; it must split evenly over the ranks."""
    if global_batch % world_size:
        lower, upper = global_batch // world_size * world_size, math.ceil(global_batch / world_size) * world_size
        hint = f"{lower} or {upper}" if lower else f"{upper}"
        raise ConfigError(f"--batch-size {global_batch} is the global batch and cannot be split evenly over "
                          f"{world_size} processes; use a multiple of {world_size} (e.g. {hint})")
    return global_batch // world_size
