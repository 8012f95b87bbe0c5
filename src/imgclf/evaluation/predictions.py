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
MAX_CLASSES = 10_000  # classes a run may have (runs.files checks run files against it too)


@dataclass
class Predictions:
    paths: list[str]
    classes: list[str]
    true: np.ndarray  # int class index per image, -1 where the label is unknown
    probs: np.ndarray  # N x K float64, rows sum to 1
    decided: np.ndarray | None = None  # predicted class per image when a threshold, not argmax, decided
    label_note: str | None = None  # where ``true`` came from, or why it is unknown, said to the user

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
                chosen = self.probs[i, self.pred[i]]  # the decided class's, which a threshold can make the lesser
                out.writerow(row + [repr(float(chosen))] + [repr(float(v)) for v in self.probs[i]])

        atomic.write_with(path, write)

    @classmethod
    def from_csv(cls, path: Path, classes: list[str] | None = None) -> Predictions:
        """A predictions CSV as ``to_csv`` wrote it; ``classes``: the run's, which its columns must be.

        The file is untrusted: a row that is short, long, not a number or names another class is a
        one-line RunDirError naming the file and line, and at most MAX_CLASSES classes are read."""
        fix = "re-run imgclf evaluate to write it again"
        try:
            with open(path, encoding="utf-8", errors=atomic.TEXT_ERRORS, newline="") as fh:
                return cls._parse(csv.reader(_bounded_lines(fh, path, fix)), path, classes, fix)
        except FileNotFoundError:
            raise RunDirError(f"{path} does not exist; run 'imgclf evaluate' first") from None
        except (csv.Error, OSError) as err:
            raise RunDirError(f"{path} is unreadable ({err}); {fix}") from None

    @classmethod
    def _parse(cls, reader, path: Path, expected: list[str] | None, fix: str) -> Predictions:
        header = next(reader, [])
        found = [c[len(PROB_PREFIX):] for c in header if c.startswith(PROB_PREFIX)]
        if len(header) > MAX_CLASSES + 4 or len(found) > MAX_CLASSES:  # + path, labels and confidence
            raise RunDirError(f"{path} has {len(header):,} columns, more than {MAX_CLASSES:,} classes'; {fix}")
        if "path" not in header or "predicted_label" not in header or not found:
            raise RunDirError(f"{path} has no predictions header (path, predicted_label, prob_CLASS...); {fix}")
        if expected is not None and found != list(expected):
            raise RunDirError(f"{path}: {_first_difference(found, list(expected))}; {fix}")
        lookup = {c: i for i, c in enumerate(found)}
        at = {name: header.index(name) for name in ("path", "true_label", "predicted_label") if name in header}
        columns = [header.index(PROB_PREFIX + c) for c in found]
        paths, true, decided, rows = [], [], [], []
        for line, row in enumerate(reader, start=2):
            try:
                if len(row) != len(header):
                    raise ValueError(f"{len(row)} fields, the header has {len(header)}")
                rows.append(np.array([float(row[k]) for k in columns]))
                if not np.isfinite(rows[-1]).all():
                    raise ValueError("a probability is not a finite number")
                if rows[-1].min() < 0 or rows[-1].max() > 1 or abs(rows[-1].sum() - 1) > 1e-3:
                    raise ValueError("the probabilities are not each in 0..1 summing to 1")
                true.append(lookup[row[at["true_label"]]] if "true_label" in at else -1)
                decided.append(lookup[row[at["predicted_label"]]])
                paths.append(row[at["path"]])
            except ValueError as err:
                raise RunDirError(f"{path}, line {line}: {err}; {fix}") from None
            except KeyError as err:
                raise RunDirError(f"{path}, line {line}: {err} is not one of its classes; {fix}") from None
        probs = np.array(rows, dtype=np.float64).reshape(len(rows), len(found))
        decided = np.array(decided, dtype=np.int64)
        argmax = probs.argmax(axis=1) if len(rows) else decided
        return cls(paths, found, np.array(true, dtype=np.int64), probs,
                   None if np.array_equal(decided, argmax) else decided)


MAX_LINE_CHARS = 4 << 20  # a predictions row: a path and a number per class (10,000 classes fit)


def _bounded_lines(fh, path: Path, fix: str):
    """The file's lines, each refused past MAX_LINE_CHARS before the csv module splits it into fields."""
    while line := fh.readline(MAX_LINE_CHARS + 1):
        if len(line) > MAX_LINE_CHARS:
            raise RunDirError(f"{path} has a line over {MAX_LINE_CHARS:,} characters; {fix}")
        yield line


def _first_difference(found: list[str], expected: list[str]) -> str:
    """Where a CSV's classes part from the run's, for a one-line error."""
    if len(found) != len(expected):
        return f"{len(found)} prob_ columns, the run has {len(expected)} classes"
    k = next(k for k, (a, b) in enumerate(zip(found, expected, strict=True)) if a != b)
    return f"prob_ column {k + 1} is {found[k]!r}, the run's class {k + 1} is {expected[k]!r}"
