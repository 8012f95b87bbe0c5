"""The split a resumed run continues with: the one saved in ``RUN/split.csv``, never a new draw.

Images may have been added to or removed from the dataset since the run started. Redrawing the
split then would score former training images as test while split.csv still describes the old
split, so a resume reads the saved one: images that have gone are an error (the run cannot be
continued as it began), new images are named in one warning and left out.
"""

from __future__ import annotations

import csv
from pathlib import Path, PurePosixPath

from imgclf.config import DataConfig
from imgclf.data.index import SPLITS, DatasetIndex, check_classes, detect_layout, scan_rows
from imgclf.errors import DataError, RunDirError
from imgclf.logs import get_logger
from imgclf.runs.files import read_json as read_run_json

log = get_logger("saved_split")
SPLIT_FILE = "split.csv"


def load_saved_split(run_dir: Path, data: DataConfig) -> DatasetIndex:
    """The run's saved index, checked against the files on disk now."""
    root, classes = _saved_root(run_dir), _saved_classes(run_dir)
    index = _read_split(run_dir / SPLIT_FILE, root, classes)
    _refuse_missing_images(index, run_dir)
    _warn_new_images(index, data, run_dir)
    return index


def _saved_root(run_dir: Path) -> Path:
    info = read_run_json(run_dir / "dataset.json")
    root = info.get("root") if isinstance(info, dict) else None
    if not isinstance(root, str) or not root:
        raise RunDirError(f"{run_dir / 'dataset.json'} has no dataset root; the run directory is damaged")
    if not Path(root).is_dir():
        raise DataError(f"dataset folder {root} (from {run_dir / 'dataset.json'}) is gone; put it back to resume, "
                        "or start a new run")
    return Path(root)


def _saved_classes(run_dir: Path) -> list[str]:
    classes = read_run_json(run_dir / "classes.json")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise RunDirError(f"{run_dir / 'classes.json'} is not a list of class names; the run directory is damaged")
    return classes


def _read_split(path: Path, root: Path, classes: list[str]) -> DatasetIndex:
    """split.csv read and checked: known columns, classes and splits, paths that stay inside ``root``."""
    try:
        index = DatasetIndex.load(path, root, classes)
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; the run cannot resume without its saved split") from None
    except (KeyError, TypeError, ValueError, csv.Error) as err:
        raise RunDirError(f"{path} is damaged ({type(err).__name__}: {err}); it needs columns path,label,split") \
            from None
    for i, (rel, label, split) in enumerate(zip(index.paths, index.labels, index.splits, strict=True)):
        where = f"{path} row {i + 2}"
        if not rel or PurePosixPath(rel).is_absolute() or Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise RunDirError(f"{where}: path {rel!r} is not inside the dataset folder; the split file is damaged")
        if label not in classes or split not in SPLITS:
            raise RunDirError(f"{where}: label {label!r} or split {split!r} is not one the run knows "
                              f"({classes}, {list(SPLITS)}); the split file is damaged")
    check_classes(index, source=str(path))
    return index


def _refuse_missing_images(index: DatasetIndex, run_dir: Path) -> None:
    gone = [rel for rel in index.paths if not (index.root / rel).is_file()]
    if gone:
        raise DataError(f"{len(gone)} image(s) listed in {run_dir / SPLIT_FILE} are gone from {index.root} "
                        f"(first: {gone[0]}); put them back to resume, or start a new run on the changed data")


def _warn_new_images(index: DatasetIndex, data: DataConfig, run_dir: Path) -> None:
    """One warning for images the dataset holds now that the saved split does not: they stay out."""
    csv_name = Path(data.path).name if data.path and Path(data.path).suffix.lower() in (".csv", ".tsv") else None
    layout = "csv" if csv_name else data.layout
    source = index.root / csv_name if csv_name else index.root
    try:
        layout = detect_layout(source) if layout == "auto" else layout
        found = [rel for rel, _, _ in scan_rows(source, layout)]
    except DataError as err:
        log.warning("warning: could not rescan %s for new images (%s); resuming with %s as saved",
                    source, err, run_dir / SPLIT_FILE)
        return
    saved = set(index.paths)
    new = sorted(rel for rel in found if rel not in saved)
    if new:
        log.warning("warning: %d image(s) in %s are not in %s and are left out of the resumed run (first: %s); "
                    "start a new run to use them", len(new), source, run_dir / SPLIT_FILE, new[0])
