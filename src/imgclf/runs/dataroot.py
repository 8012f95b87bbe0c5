"""Where a finished run reads its split's images: the dataset folder it was trained on (dataset.json's
root), or the folder ``--data`` names when the dataset moved. A ``--data`` folder beside a dataset that
is still in place is said in one warning, and the metrics scored on it record it (``foreign_root``):
they are no longer the scores of the images the run was trained and split on."""

from __future__ import annotations

import csv
from pathlib import Path

from imgclf.data.index import SPLITS, DatasetIndex
from imgclf.errors import DataError, RunDirError
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.runs import files as runfiles

log = get_logger("runs")


def split_root(dataset: runfiles.DatasetFile, data_root: str | Path | None) -> Path:
    """The folder the split's relative paths are read under."""
    root = Path(data_root) if data_root else Path(dataset.root)
    if data_root and not root.is_dir():
        raise DataError(f"--data {root} is not a folder; give the folder the run's dataset was moved to")
    if not root.is_dir():
        raise RunDirError(f"dataset folder {root} is gone; pass --data NEW_LOCATION")
    if foreign_root(dataset, data_root) and Path(dataset.root).is_dir():
        log.warning("warning: --data %s: the run's own dataset folder %s is still there; the split's images are "
                    "read under %s instead", root, dataset.root, root)
    return root


def foreign_root(dataset: runfiles.DatasetFile, data_root: str | Path | None) -> str | None:
    """``data_root`` resolved, when it is another folder than the one the run was trained on (else None)."""
    if not data_root:
        return None
    given = Path(data_root).resolve()
    return None if given == Path(dataset.root).resolve() else str(given)


def read_split(path: Path, root: Path, classes: list[str], counted: int, rerooted: bool = False) -> DatasetIndex:
    """A finished run's split.csv, every row a class of the run and train/val/test; at most ``counted`` rows
    (the images dataset.json counts; 0: an older run that counted none). ``rerooted`` (``--data``): its paths
    must be relative, or the images would be read where they were, not under the folder given."""
    try:
        index = DatasetIndex.load(path, root, classes, max_rows=counted or None)
    except (KeyError, ValueError, UnicodeDecodeError, csv.Error) as err:
        raise RunDirError(f"{path} is damaged ({type(err).__name__}: {err}); {runfiles.FIX}") from None
    odd = next((i for i in range(len(index)) if index.labels[i] not in classes or index.splits[i] not in SPLITS),
               None)
    if odd is not None:
        raise RunDirError(f"{path}: row {odd + 2} has label {index.labels[odd]!r} and split "
                          f"{index.splits[odd]!r}, not a class of the run and train/val/test; {runfiles.FIX}")
    fixed = next((p for p in index.paths if Path(p).is_absolute()), None) if rerooted else None
    if fixed is not None:
        raise DataError(f"--data {root}: {path} lists its images by absolute path (e.g. {fixed}), as cv's folds and "
                        "CSVs of absolute paths do, so they cannot be read under another folder; drop --data")
    return index


def check_saved_predictions(preds: Predictions, split: DatasetIndex, path: Path) -> Predictions:
    """A run's predictions_<split>.csv (not sealed: evaluate rewrites it) as scoring reads it again: each row
    one of the split's images, once, with the split's label; a file of other rows is one line, not scores."""
    labels = dict(zip(split.paths, split.labels, strict=True))
    seen: set[str] = set()
    for line, (image, true) in enumerate(zip(preds.paths, preds.true, strict=True), start=2):
        if labels.get(image) is None or image in seen or (true >= 0 and preds.classes[true] != labels[image]):
            why = ("twice" if image in seen else "not an image of the split" if image not in labels
                   else f"labelled {preds.classes[true]!r}, the split says {labels[image]!r}")
            raise RunDirError(f"{path}, line {line}: {image!r} is {why} (split.csv); re-run imgclf evaluate "
                              f"RUN --split {path.stem.removeprefix('predictions_')} to write it again")
        seen.add(image)
    return preds
