"""Classical heads: a scikit-learn classifier (SVM, logistic regression, k-NN, random forest) on the
frozen backbone's penultimate features, the hybrid "CNN as feature extractor + SVM" of the literature.

The backbone runs once per image; each candidate of a small grid (e.g. the SVM's C) is fitted on
the training features and scored on validation by the run's monitor, and the best is kept. The
head is saved with skops (a safe format for scikit-learn objects, no pickle), the backbone as
safetensors, so the run directory is used by evaluate, predict and report like any other;
``safehead.load_head`` reads it back trusting only the exact types written here.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from torch import nn

from .checkpoint import save_weights
from .config import Config
from .errors import ConfigError
from .logs import get_logger, is_main_process
from .metrics import compute_metrics, validation_row
from .model import Classifier, build_model
from .pipeline import eval_loader
from .predictions import Predictions
from .run import HEAD_FILE, MODEL_FILE
from .transforms import tta_views

log = get_logger("classical")
# head -> (parameter searched on validation, its values)
GRIDS: dict[str, tuple[str, list]] = {"svm": ("C", [0.1, 1.0, 10.0]), "logreg": ("C", [0.01, 0.1, 1.0, 10.0]),
                                      "knn": ("n_neighbors", [3, 5, 11]), "rf": ("n_estimators", [100, 300])}


class Embedder(nn.Module):
    """A classifier's penultimate features (pooled backbone output) as a module."""

    def __init__(self, model: Classifier):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.embed(x)


def make_head(kind: str, value, seed: int, balanced: bool, targets: np.ndarray):
    """Standardised features into the scikit-learn classifier ``kind`` with its searched parameter.

    The SVM's probabilities come from Platt scaling fitted on cross-validated decision values
    (scikit-learn's CalibratedClassifierCV, which replaces the deprecated ``probability=True``).
    """
    weight = "balanced" if balanced else None
    folds = int(max(2, min(5, np.bincount(targets).min())))
    n_train = len(targets)
    estimator = {"svm": lambda: CalibratedClassifierCV(SVC(C=value, class_weight=weight, random_state=seed),
                                                       method="sigmoid", cv=folds, ensemble=False),
                 "logreg": lambda: LogisticRegression(C=value, max_iter=5000, class_weight=weight),
                 "knn": lambda: KNeighborsClassifier(n_neighbors=min(value, n_train), algorithm="brute"),
                 "rf": lambda: RandomForestClassifier(n_estimators=value, class_weight=weight, random_state=seed,
                                                      n_jobs=1)}[kind]()
    return make_pipeline(StandardScaler(), estimator)


@torch.no_grad()
def embed(model: nn.Module, loader, compute, views: list | None = None) -> list[np.ndarray]:
    """Per view, ``N x D`` features of the loader's images, rows placed by dataset position."""
    model.eval()
    views = views or tta_views("none")
    out: list[np.ndarray | None] = [None] * len(views)
    for images, _, positions in loader:
        batch = compute.batch(images)
        for v, view in enumerate(views):
            with compute.autocast():
                feats = model(view(batch)).float().cpu().numpy()
            if out[v] is None:
                out[v] = np.zeros((len(loader.dataset), feats.shape[1]), dtype=np.float32)
            out[v][positions.numpy()] = feats
    return [o if o is not None else np.zeros((0, 0), np.float32) for o in out]


def train_classical(config: Config, evaluate_test: bool = True):
    from .api import finish_run, setup_run
    from .report import write_history

    s = setup_run(config)
    cfg, index, kind = s.config, s.index, s.config.model.head
    if not (cfg.model.pretrained or cfg.model.weights):
        log.warning("warning: --head %s on a backbone without --pretrained or --weights: random features", kind)
    model = s.compute.prepare(build_model(cfg.model, len(index.classes), s.preprocess, load_pretrained=True))
    features = {split: embed(Embedder(model), eval_loader(s.prepared, split, s.preprocess, cfg.train.batch_size,
                                                          cfg.data.workers), s.compute)[0]
                for split in ("train", "val")}
    train, val = index.subset("train"), index.subset("val")
    name, values = GRIDS[kind]
    balanced = cfg.train.class_weight == "balanced"
    sign = 1 if cfg.train.monitor.endswith("loss") else -1
    history, best = [], None
    for epoch, value in enumerate(values, 1):
        start = time.perf_counter()
        head = make_head(kind, value, cfg.train.seed, balanced, train.targets).fit(features["train"], train.targets)
        row = validation_row(compute_metrics(Predictions(list(val.paths), list(index.classes), val.targets,
                                                         head.predict_proba(features["val"])),
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


def classical_probs(run, loader, tta: str) -> np.ndarray:
    """Probabilities of a classical-head run: the head on the features of each view, averaged."""
    per_view = embed(Embedder(run.model), loader, run.compute, tta_views(tta))
    return np.mean([run.head.predict_proba(f) for f in per_view], axis=0)


def save_head(head, path: Path) -> None:
    from skops.io import dump

    from . import atomic

    with atomic.atomic_path(path) as tmp:
        dump(head, tmp)
