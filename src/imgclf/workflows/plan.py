"""The plan a run announces before it trains: the network, its input, its weights, and every stage.

One block, so that what ``--epochs`` and the other settings mean is read before any time is
spent: ``--epochs N`` bounds the total of all stages of the default transfer recipe (see
``config.stages.default_stages``); explicit stages set their own epochs.
"""

from __future__ import annotations

from imgclf.config import Config, TrainConfig
from imgclf.models.networks import Preprocess

FREEZE_WORDS = {"none": "every layer trains", "backbone": "backbone frozen, head trains"}


def plan_lines(config: Config, preprocess: Preprocess, stages: list[tuple[str, TrainConfig]],
               start: str | None) -> list[str]:
    """Lines of the plan: model, input, weights, then one line per stage and the epoch total."""
    model = config.model
    lines = [f"plan: {model.name}{_head(config)}, {preprocess.size} px, {preprocess.channels} channel(s), "
             f"{_weights(config, start)}"]
    if config.model.head != "linear":
        return [*lines, "  no network training: the head is fitted on the frozen features, its parameter "
                        "chosen on validation"]
    for i, (name, cfg) in enumerate(stages, 1):
        lines.append(f"  stage {i} {name}: {_what_trains(cfg)}, {_epochs(cfg)}, {cfg.optimizer} lr {cfg.lr:g}, "
                     f"batch {cfg.batch_size}")
    total = sum(cfg.epochs for _, cfg in stages)
    if len(stages) > 1:
        lines.append(f"  at most {total} epochs in all")
    if config.evaluate.tta != "none":
        lines.append(f"  --tta {config.evaluate.tta}: the final val and test predictions; the per-epoch validation "
                     "that picks the best epoch scores without it")
    return lines


def _head(config: Config) -> str:
    head = config.model.head
    return "" if head == "linear" else f" with a {head} head on its frozen features"


def _weights(config: Config, start: str | None) -> str:
    if start:
        return f"starting from the trained run {start}"
    if config.model.weights:
        return f"weights from {config.model.weights}"
    if config.model.pretrained:
        return "ImageNet weights"
    return "random initial weights"


def _what_trains(cfg: TrainConfig) -> str:
    words = FREEZE_WORDS.get(cfg.freeze, f"freeze {cfg.freeze}")
    return words + (" (BatchNorm frozen)" if cfg.freeze_bn else "")


def _epochs(cfg: TrainConfig) -> str:
    if not cfg.early_stopping:
        return f"{cfg.epochs} epochs"
    return f"up to {cfg.epochs} epochs (early stopping on {cfg.monitor}, patience {cfg.effective_patience})"
