"""Per-image predictions: the single source of every metric, table and plot.

Rows are keyed by the dataset position each image came from, so the order a loader used
(shuffled or not) cannot misalign predictions with labels. The CSV is UTF-8, except that file names
which are not UTF-8 keep their original bytes (surrogateescape, see ``atomic.py``) and read back unchanged.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from imgclf import atomic
from imgclf.errors import RunDirError

PROB_PREFIX = "prob_"


@dataclass
class Predictions:
    paths: list[str]
    classes: list[str]
    true: np.ndarray  # int class index per image, -1 where the label is unknown
    probs: np.ndarray  # N x K float64, rows sum to 1
    decided: np.ndarray | None = None  # predicted class per image when a threshold, not argmax, decided

    @classmethod
    def of_index(cls, index, probs: np.ndarray, classes: list[str] | tuple[str, ...] | None = None) -> Predictions:
        """An index's images (a ``DatasetIndex`` or its subset: paths, targets, classes) with their N x K
        ``probs``, row for row; ``classes``: a run's own names instead of the index's."""
        return cls(list(index.paths), list(index.classes if classes is None else classes), index.targets, probs)

    @property
    def pred(self) -> np.ndarray:
        return self.probs.argmax(axis=1) if self.decided is None else self.decided

    def at_threshold(self, threshold: float | None, positive: int) -> Predictions:
        """Binary decisions: ``positive`` where its probability reaches ``threshold`` (None: argmax)."""
        if threshold is None:
            return replace(self, decided=None)
        other = 1 - positive
        return replace(self, decided=np.where(self.probs[:, positive] >= threshold, positive, other))

    @property
    def confidence(self) -> np.ndarray:
        return self.probs.max(axis=1)

    @property
    def has_labels(self) -> bool:
        return len(self.true) > 0 and bool((self.true >= 0).all())

    def to_csv(self, path: Path) -> None:
        labelled = self.has_labels

        def write(fh) -> None:
            out = csv.writer(fh)
            head = ["path", *(["true_label"] if labelled else []), "predicted_label", "confidence"]
            out.writerow(head + [PROB_PREFIX + c for c in self.classes])
            for i, p in enumerate(self.paths):
                row = [p, *([self.classes[self.true[i]]] if labelled else []), self.classes[self.pred[i]]]
                out.writerow(row + [repr(float(self.confidence[i]))] + [repr(float(v)) for v in self.probs[i]])

        atomic.write_with(path, write)

    @classmethod
    def from_csv(cls, path: Path) -> Predictions:
        try:
            with open(path, encoding="utf-8", errors=atomic.TEXT_ERRORS, newline="") as fh:
                reader = csv.DictReader(fh)
                columns = reader.fieldnames or []
                rows = list(reader)
        except FileNotFoundError:
            raise RunDirError(f"{path} does not exist; run 'imgclf evaluate' first") from None
        classes = [c[len(PROB_PREFIX):] for c in columns if c.startswith(PROB_PREFIX)]
        lookup = {c: i for i, c in enumerate(classes)}
        probs = np.array([[float(r[PROB_PREFIX + c]) for c in classes] for r in rows], dtype=np.float64)
        true = np.array([lookup[r["true_label"]] if "true_label" in r else -1 for r in rows], dtype=np.int64)
        decided = np.array([lookup[r["predicted_label"]] for r in rows], dtype=np.int64)
        probs = probs.reshape(len(rows), len(classes))
        argmax = probs.argmax(axis=1) if len(rows) else decided
        return cls([r["path"] for r in rows], classes, true, probs,
                    None if np.array_equal(decided, argmax) else decided)
