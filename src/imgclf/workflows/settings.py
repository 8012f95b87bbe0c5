"""Settings that cannot do what they say: refused in one line when the run cannot honour them at all, and
named in a warning when they would have no effect, before any time is spent on training."""

from __future__ import annotations

from pathlib import Path

from imgclf.config import AugmentConfig, Config, TrainConfig, cli_flag
from imgclf.config.stages import given_train_settings, recipe_overrides
from imgclf.data.audit import predefined_folds
from imgclf.data.index import require_utf8
from imgclf.data.scan import split_folders
from imgclf.data.transforms import resolve_augment
from imgclf.errors import ConfigError, DataError
from imgclf.logs import get_logger

log = get_logger("lifecycle")

# Settings that always carry a value, and what reads them: an optimizer, or a learning-rate schedule
OPTIMIZER_READERS = {"momentum": ("sgd", "rmsprop"), "rho": ("rmsprop", "adadelta"), "nesterov": ("sgd",)}
SCHEDULE_READERS = {"step_size": ("step",), "gamma": ("step", "plateau")}

# the augmentations that uncover pixels, which fill_mode and cval fill
UNCOVERING = ("rotation_range", "zoom_range", "shear_range", "width_shift_range", "height_shift_range")


def check_binary_settings(config: Config, classes: tuple[str, ...]) -> None:
    """A positive class, a decision threshold and a one-logit head exist only for two classes."""
    positive = config.data.positive_class
    if positive is not None and positive not in classes:
        raise ConfigError(f"positive_class {positive!r} is not a class; choose one of {list(classes)}")
    rule = config.evaluate.threshold
    binary_only = [flag for flag, given in ((f"--threshold {rule}", rule != "argmax"),
                                            (f"--positive-class {positive}", positive is not None),
                                            ("--binary-head sigmoid", config.model.binary_head == "sigmoid")) if given]
    if binary_only and len(classes) != 2:
        raise ConfigError(f"{' and '.join(binary_only)}: for a binary task; {len(classes)} classes found, drop "
                          f"{'them' if len(binary_only) > 1 else 'it'}")


def refuse_without_validation(config: Config, stages: list[tuple[str, TrainConfig]], resumed: bool = False) -> None:
    """Settings that act on the validation split, when the split has no images: refused, not skipped. A run
    resumed from before the threshold and the schedule were refused here has those two said in a warning."""
    network = config.model.head == "linear"  # a classical head is fitted once: no stopping or schedule
    needs, newer = [], []
    if not network:
        needs.append(f"--head {config.model.head} chooses its parameter on them")
    elif any(cfg.early_stopping or cfg.restore_best for _, cfg in stages):
        needs.append("early stopping and restore-best need them (or pass --no-early-stopping --no-restore-best)")
    if network and any(cfg.schedule == "plateau" for _, cfg in stages):
        newer.append("--schedule plateau lowers the learning rate when val_loss stops improving (or choose "
                     "another --schedule)")
    if config.evaluate.threshold != "argmax":
        newer.append(f"--threshold {config.evaluate.threshold} chooses the threshold on them (or pass --threshold "
                     "argmax)")
    if resumed and newer:
        log.warning("warning: no validation images, so these settings of the resumed run do nothing: %s",
                    "; ".join(newer))
        newer = []
    if needs or newer:
        raise DataError(f"no validation images: {'; '.join(needs + newer)}; raise --val-fraction")


def warn_replaced_settings(config: Config) -> None:
    """Settings the default transfer recipe replaces, or that no weights file reads, are said, not dropped."""
    if config.model.weights_map != "auto" and not config.model.weights:
        log.warning("warning: --weights-map %s has no effect without --weights FILE (the offline ImageNet weights "
                    "load by position, timm's hub by name, --init-from a run by name)", config.model.weights_map)
    replaced = recipe_overrides(config)
    if replaced:
        given = ", ".join(f"{typed_flag(name, getattr(config.train, name))} (stage "
                          f"{', '.join(f'{stage}: {value}' for stage, value in stages.items())})"
                          for name, stages in replaced.items())
        log.warning("warning: the default transfer recipe (stages head, then finetune) sets its own %s, so "
                    "these settings do not apply there: %s; give the stages yourself (--stage name=head,"
                    "freeze=backbone,lr=...) to choose them", ", ".join(replaced), given)


def check_paths(config: Config) -> None:
    """The dataset and --out paths: text (UTF-8), and the run not inside a folder a scan of the dataset reads
    (the whole folder, or its split or fold folders), where the next run would read this run's files as images."""
    for flag, path in (("the dataset path", config.data.path), ("--out", config.out)):
        require_utf8(path or "", f"{flag} {path!r}")
    data = Path(config.data.path).expanduser().resolve() if config.data.path else None
    if data is None or not data.is_dir():
        return
    out = Path(config.out or "runs").expanduser().resolve()
    read = list(split_folders(data).values()) or predefined_folds(data) or [data]
    if any(out.is_relative_to(folder) for folder in read):
        raise ConfigError(f"--out {config.out or 'runs/...'} is inside the dataset folder {data}: the next run on it "
                          "would read this run's files as images; choose an --out outside it")


def unused_settings(config: Config, stages: list[tuple[str, TrainConfig]]) -> list[str]:
    """Warnings for settings changed from their defaults that the run never reads (network training)."""
    found: dict[str, list[str]] = {}
    patience_given = bool(config.stages) or config.train.patience is not None  # else a recipe's own patience
    for name, cfg in stages:
        for what in _stage_unused(cfg, patience_given):
            found.setdefault(what, []).append(name)
    lines = [f"warning: {what}, in stage(s) {', '.join(names)}" for what, names in found.items()]
    lines += [f"warning: {what}" for what in _cache_unused(stages)]
    mults = {f"{cfg.backbone_lr_mult:g}" for _, cfg in stages if cfg.backbone_lr_mult != 1}
    if mults and all(cfg.freeze == "backbone" for _, cfg in stages):
        lines.append(f"warning: backbone_lr_mult={', '.join(sorted(mults))} has no effect: the backbone is frozen "
                     "in every stage")
    lines += [f"warning: {what}" for what in _overridden_by_stages(config) + _augment_unused(config.augment)]
    lines += [f"warning: {what}" for what in _own_stage_settings_unused(config, stages)]
    if config.train.sampler == "weighted" and config.train.class_weight == "balanced":
        lines.append("warning: --sampler weighted and --class-weight balanced both balance the classes: rare "
                     "classes are drawn as often as common ones and weigh more in the loss as well; keep one")
    if config.train.average_best > 1 and not stages[-1][1].restore_best:
        lines.append(f"warning: --average-best {config.train.average_best} has no effect with --no-restore-best: "
                     "the run ends with its last weights, not an average of its best")
    return lines


def _stage_unused(cfg: TrainConfig, patience_given: bool) -> list[str]:
    defaults = TrainConfig.model_fields
    unused = [f"{setting}={getattr(cfg, setting)} has no effect with {cfg.optimizer} (read by {', '.join(readers)} "
              "only)" for setting, readers in OPTIMIZER_READERS.items()
              if getattr(cfg, setting) != defaults[setting].default and cfg.optimizer not in readers]
    unused += [f"{setting}={getattr(cfg, setting)} has no effect with the {cfg.schedule} schedule (read by "
               f"{', '.join(readers)} only)" for setting, readers in SCHEDULE_READERS.items()
               if getattr(cfg, setting) != defaults[setting].default and cfg.schedule not in readers]
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.momentum == 0:
        unused.append("nesterov has no effect with momentum=0 (Nesterov needs momentum)")
    if cfg.min_delta != defaults["min_delta"].default and not (cfg.early_stopping or cfg.restore_best):
        unused.append(f"min_delta={cfg.min_delta:g} has no effect without early stopping or restore-best (it "
                      "decides which epoch is the best)")
    if patience_given and cfg.patience is not None and not cfg.early_stopping and cfg.schedule != "plateau":
        unused.append(f"patience={cfg.patience} has no effect without early stopping (or the plateau schedule)")
    return unused


def _cache_unused(stages: list[tuple[str, TrainConfig]]) -> list[str]:
    """Feature-cache settings when no stage freezes the whole backbone: only its features are cached (a regex may
    freeze it whole, so a stage with one counts as reading them)."""
    defaults = TrainConfig.model_fields
    if any(cfg.freeze == "backbone" or cfg.freeze.startswith("regex:") for _, cfg in stages):
        return []
    given = {f"{name}={getattr(cfg, name)}" for _, cfg in stages for name in ("feature_views", "feature_cache")
             if getattr(cfg, name) != defaults[name].default}
    partly = sorted({cfg.freeze for _, cfg in stages if cfg.freeze != "none"})
    why = (f"no stage freezes the whole backbone ({', '.join(partly)} trains part of it)" if partly
           else "every layer trains in every stage")
    return [f"{' and '.join(sorted(given))} has no effect: {why}, and only a frozen backbone's features are "
            "cached"] if given else []


def _own_stage_settings_unused(config: Config, stages: list[tuple[str, TrainConfig]]) -> list[str]:
    """A setting a stage gives itself that this stage cannot read, where another stage reads it (the checks
    above look at the stages together: there, one stage that reads a setting is enough)."""
    resolved, lines = dict(stages), []
    some_frozen = any(cfg.freeze == "backbone" or cfg.freeze.startswith("regex:") for _, cfg in stages)
    some_training = any(cfg.freeze != "backbone" for _, cfg in stages)
    for stage in config.stages:
        own, cfg = stage.model_dump(exclude_none=True), resolved.get(stage.name)
        if cfg is None:
            continue
        if cfg.freeze == "backbone" and own.get("backbone_lr_mult", 1) != 1 and some_training:
            lines.append(f"stage {stage.name}: backbone_lr_mult={own['backbone_lr_mult']:g} has no effect: the stage "
                         "freezes the backbone")
        given = [f"{key}={own[key]}" for key in ("feature_views", "feature_cache") if key in own]
        if given and some_frozen and not (cfg.freeze == "backbone" or cfg.freeze.startswith("regex:")):
            lines.append(f"stage {stage.name}: {' and '.join(given)} has no effect: the stage trains the backbone "
                         f"({cfg.freeze}), and only a frozen backbone's features are cached")
    return lines


def _overridden_by_stages(config: Config) -> list[str]:
    """A train setting given that every explicit stage sets for itself, one of them to another value, reaches
    none of them: said, not lost."""
    own = [stage.model_dump(exclude={"name"}, exclude_none=True) for stage in config.stages]
    return [f"{typed_flag(name, getattr(config.train, name))} reaches no stage: every stage sets its own "
            f"{name}" for name in sorted(given_train_settings(config) & TrainConfig.model_fields.keys())
            if own and all(name in values for values in own)
            and any(values[name] != getattr(config.train, name) for values in own)]


def typed_flag(name: str, value: object) -> str:
    """A train setting as the command line spells it: ``--lr 0.001``, ``--no-freeze-bn``, ``--patience (default)``."""
    flag = cli_flag("train", name)
    if isinstance(value, bool):
        return flag if value else f"--no-{flag.removeprefix('--')}"
    return f"{flag} {'(default)' if value is None else value}"


def _augment_unused(cfg: AugmentConfig) -> list[str]:
    values = resolve_augment(cfg)
    lines = []
    if cfg.cval != AugmentConfig.model_fields["cval"].default and values["fill_mode"] != "constant":
        lines.append(f"--cval {cfg.cval} has no effect with fill_mode {values['fill_mode']} (add --fill-mode "
                     "constant)")
    if cfg.fill_mode is not None and not any(values[name] for name in UNCOVERING):
        lines.append(f"--fill-mode {cfg.fill_mode} has no effect: no rotation, zoom, shear or shift uncovers any "
                     "pixel to fill")
    return lines
