"""Train a classical head: a scikit-learn classifier on a frozen backbone's features, its parameter
chosen on validation (``--head svm|logreg|knn|rf``) or fixed (``head_param``), on standardised or
(``head_scale: false``) raw features, written as a run of the ``classical`` kind.

The features are the network's penultimate layer. With ``--init-from RUN`` they come from that
trained run (the notebook's "SVM on a trained CNN's features"); without it, any dense layer of
the head has never trained, and the log says so loudly.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from torch import nn

from imgclf.config import AugmentConfig, Config, TrainConfig, cli_flag
from imgclf.data.pipeline import eval_loader, inference_batch
from imgclf.errors import ConfigError, RunDirError
from imgclf.evaluation.metrics import compute_metrics, validation_row
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger, is_main_process
from imgclf.models.checkpoint import load_weights, save_weights
from imgclf.models.networks import Classifier, build_model
from imgclf.reporting.plots import write_history
from imgclf.runs.heads import GRIDS, HEAD_FILE, Embedder, embed, make_head, save_head
from imgclf.runs.manifest import INCOMPLETE
from imgclf.runs.network import MODEL_FILE
from imgclf.workflows.lifecycle import finish_run, setup_run

log = get_logger("classical")


def train_classical(config: Config, evaluate_test: bool = True, candidate: bool = False,
                    resume_dir: Path | None = None):
    """Fit each candidate of the head's grid on the training features; keep the best on validation.

    ``candidate``: the default's linear probe, which takes the settings given for every candidate: those
    it cannot apply are no news about it (the candidates that train a network apply them). ``resume_dir``:
    a killed run, fitted again (a head has no epochs to continue) on its saved split, in its folder."""
    if resume_dir is not None:
        if not (resume_dir / INCOMPLETE).is_file():
            raise RunDirError(f"{resume_dir} is a finished --head {config.model.head} run: nothing to resume; "
                              "train again with another --out")
        log.info("--head %s has no epochs to continue: fitted again on the run's saved split", config.model.head)
    s = setup_run(config, resume_dir)
    cfg, index, kind = s.config, s.index, s.config.model.head
    model = build_model(cfg.model, len(index.classes), s.preprocess, load_pretrained=s.init_weights is None)
    if s.init_weights is not None:
        load_weights(model, s.init_weights)
    else:
        _warn_untrained(model, cfg, kind)
    if not candidate:
        _warn_unused(cfg, kind)
    model = s.compute.prepare(model)
    batch = inference_batch(cfg.train.batch_size, index.splits.count("train"))  # as the run predicts later
    features = {split: embed(Embedder(model), eval_loader(s.prepared, split, s.preprocess, batch, cfg.data.workers),
                             s.compute)[0]
                for split in ("train", "val")}
    train, val = index.subset("train"), index.subset("val")
    name, values = head_candidates(cfg)
    if kind == "knn" and max(values) > len(train):
        log.warning("warning: knn n_neighbors=%s: more than the %d training images; it uses all %d",
                    ",".join(str(v) for v in values if v > len(train)), len(train), len(train))
        values = list(dict.fromkeys(min(v, len(train)) for v in values))  # each k fitted once
    balanced, scale = cfg.train.class_weight == "balanced", cfg.train.head_scale
    sign = 1 if cfg.train.monitor.endswith("loss") else -1
    history, best = [], None
    for epoch, value in enumerate(values, 1):
        start = time.perf_counter()
        head = make_head(kind, value, cfg.train.seed, balanced, train.targets, scale).fit(features["train"],
                                                                                         train.targets)
        row = validation_row(compute_metrics(Predictions.of_index(val, head.predict_proba(features["val"])),
                                             cfg.data.positive_class))
        history.append({"epoch": epoch, "stage": kind, "param": f"{name}={value}", **row,
                        "seconds": round(time.perf_counter() - start, 3)})
        monitored = row.get(cfg.train.monitor)  # val_auc is missing when val lacks a class
        if monitored is None and cfg.train.monitor != "val_auc":
            raise ConfigError(f"monitor {cfg.train.monitor!r} is not a validation metric; use one of {', '.join(row)}")
        score = sign * monitored if monitored is not None else np.inf
        log.info("%s %s=%s: %s %s", kind, name, value, cfg.train.monitor, monitored)
        if best is None or score < best[0]:
            best = (score, epoch, head)
    log.info("%s: chose %s", kind, history[best[1] - 1]["param"])
    if is_main_process():
        save_weights(model, s.out / MODEL_FILE, {**s.meta, "epoch": best[1]})
        save_head(best[2], s.out / HEAD_FILE)
        write_history(history, s.out / "history.csv")
    return finish_run(s, evaluate_test, best[1])


def head_candidates(cfg: Config) -> tuple[str, list]:
    """(the head's parameter, the values to try): the fixed ``head_param``, or the kind's small grid."""
    kind, fixed = cfg.model.head, cfg.train.head_param
    name, values = GRIDS[kind]
    if fixed is not None:
        values = [int(fixed) if kind in ("knn", "rf") else fixed]
        log.info("%s: %s=%s fixed by head_param (no search on validation)", kind, name, values[0])
    if not cfg.train.head_scale:
        log.info("%s: on raw features (head_scale off: no standardisation)", kind)
    return name, values


def _warn_unused(cfg: Config, kind: str) -> None:
    """Training settings a scikit-learn head has no use for are said, not dropped in silence."""
    if cfg.train.max_seconds:
        log.warning("warning: --max-seconds %g has no effect with --head %s: a scikit-learn head has no epochs "
                    "to stop after, so it fits all its candidates", cfg.train.max_seconds, kind)
    if cfg.train.sampler != "none":
        log.warning("warning: --sampler %s has no effect with --head %s: the head is fitted on every training "
                    "image's features at once; --class-weight balanced weights its classes", cfg.train.sampler, kind)
    unused = head_unused_settings(cfg, kind)
    if unused:
        log.warning("warning: %s %s no effect with --head %s: it is fitted once on features of the un-augmented "
                    "images, with no network training (no epochs, optimizer, stages or augmentation)",
                    ", ".join(unused), "has" if len(unused) == 1 else "have", kind)


# what a scikit-learn head does use of the train section (max_seconds and sampler: warned about on their own)
HEAD_USES = {"batch_size", "class_weight", "monitor", "seed", "device", "precision", "channels_last", "head_param",
             "head_scale", "init_from", "init_from_as_typed", "max_seconds", "sampler"}


def head_unused_settings(cfg: Config, kind: str) -> list[str]:
    """The flags set away from their defaults that a scikit-learn head ``kind`` cannot apply."""
    def changed(section: str, values, defaults) -> list[str]:
        return [cli_flag(section, name) for name in type(values).model_fields
                if (section != "train" or name not in HEAD_USES) and getattr(values, name) != getattr(defaults, name)]

    unused = changed("train", cfg.train, TrainConfig()) + changed("augment", cfg.augment, AugmentConfig())
    # The features stop before the classifier, and no head layer trains: these change nothing, unless --init-from
    # reads a trained run's head (whose layout it requires, so they cannot be dropped there)
    model = cfg.model
    unused += [flag for flag, given in (("--binary-head sigmoid", model.binary_head == "sigmoid"),
                                        (f"--dropout {model.dropout}", bool(model.dropout)),
                                        ("--head-batchnorm", bool(model.head_batchnorm)))
               if given and not cfg.train.init_from]
    if kind == "knn" and cfg.train.class_weight == "balanced":  # k-nearest neighbours takes no class weights
        unused.append("--class-weight balanced")
    return unused + ["--stage"] * bool(cfg.stages)


def _warn_untrained(model: Classifier, cfg: Config, kind: str) -> None:
    """Features that no training shaped: a random backbone, or dense layers of a head that never trained."""
    if not (cfg.model.pretrained or cfg.model.weights):
        log.warning("warning: --head %s on a backbone without --pretrained, --weights or --init-from: random "
                    "features", kind)
    hidden = [m for m in model.head.modules() if isinstance(m, nn.Linear)][:-1]  # the last one is the classifier
    if hidden:
        widths = [m.out_features for m in hidden]
        log.warning("warning: --head %s reads the output of dense layers %s that were never trained (random "
                    "weights, whatever the backbone); train the network first and pass --init-from RUN, or drop "
                    "the dense layers", kind, widths)
