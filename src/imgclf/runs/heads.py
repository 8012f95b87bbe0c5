"""Classical heads: a scikit-learn classifier (SVM, logistic regression, k-NN, random forest) on the
frozen backbone's penultimate features, the hybrid "CNN as feature extractor + SVM" of the literature.

The backbone runs once per image; each candidate of a small grid (e.g. the SVM's C) is fitted on
the training features and scored on validation by the run's monitor, and the best is kept. The
head is saved with skops (a safe format for scikit-learn objects, no pickle), the backbone as
safetensors, so the run directory is used by evaluate, predict and report like any other;
``safehead.load_head`` reads it back trusting only the exact types written here.
"""

from __future__ import annotations

from functools import cached_property
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

from imgclf import atomic
from imgclf.data.transforms import tta_views
from imgclf.logs import get_logger
from imgclf.models.networks import Classifier
from imgclf.runs.base import register
from imgclf.runs.network import NetworkRun
from imgclf.runs.safehead import load_head

log = get_logger("classical")
HEAD_FILE = "head.skops"
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


def make_head(kind: str, value, seed: int, balanced: bool, targets: np.ndarray, scale: bool = True):
    """Standardised (``scale``) or raw features into the scikit-learn classifier ``kind`` with its parameter.

    The SVM's probabilities come from Platt scaling fitted on cross-validated decision values
    (scikit-learn's CalibratedClassifierCV, which replaces the deprecated ``probability=True``).
    """
    weight = "balanced" if balanced else None
    if kind in ("knn", "rf"):
        value = int(value)  # n_neighbors, n_estimators: whole numbers (the config checks head_param is one)
    folds = int(max(2, min(5, np.bincount(targets).min())))
    n_train = len(targets)
    estimator = {"svm": lambda: CalibratedClassifierCV(SVC(C=value, class_weight=weight, random_state=seed),
                                                       method="sigmoid", cv=folds, ensemble=False),
                 "logreg": lambda: LogisticRegression(C=value, max_iter=5000, class_weight=weight),
                 "knn": lambda: KNeighborsClassifier(n_neighbors=min(value, n_train), algorithm="brute"),
                 "rf": lambda: RandomForestClassifier(n_estimators=value, class_weight=weight, random_state=seed,
                                                      n_jobs=1)}[kind]()
    return make_pipeline(StandardScaler(), estimator) if scale else make_pipeline(estimator)


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


def save_head(head, path: Path) -> None:
    from skops.io import dump  # skops only when a scikit-learn head is saved

    with atomic.atomic_path(path) as tmp:
        dump(head, tmp)


@register("classical")
class ClassicalRun(NetworkRun):
    """The ``classical`` kind: a frozen backbone's features into a scikit-learn head (``head.skops``)."""

    @cached_property
    def head(self):
        """The scikit-learn head, checked to fit this run's backbone width and classes."""
        size, channels = self.preprocess.size, self.preprocess.channels
        with torch.no_grad():
            probe = torch.zeros(1, channels, size, size, device=self.compute.device)
            width = Embedder(self.model)(probe).shape[1]
        return load_head(self.path / HEAD_FILE, self.config.model.head, width, len(self.classes),
                         scaled=self.config.train.head_scale)

    def loader_probs(self, loader, tta: str | None = None) -> np.ndarray:
        """The head on the features of each ``tta`` view, averaged."""
        per_view = embed(Embedder(self.model), loader, self.compute, tta_views(tta or self.config.evaluate.tta))
        return np.mean([self.head.predict_proba(f) for f in per_view], axis=0)

    def describe(self) -> str:
        return super().describe().replace(" at ", f" + scikit-learn {self.config.model.head} at ", 1)

    def check(self) -> None:
        super().check()
        _ = self.head
