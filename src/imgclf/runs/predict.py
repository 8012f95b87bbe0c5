"""Predict new images with a saved run: files, folders (recursive) or glob patterns; a folder of class
sub-folders named as the run's classes gives each image its true label."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgclf.data.datasets import ImageFiles, make_loader
from imgclf.data.images import BadImage, load_image
from imgclf.data.inputs import expand_inputs
from imgclf.data.scan import scan_csv
from imgclf.data.transforms import build_eval_transform
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger

if TYPE_CHECKING:
    from imgclf.runs.network import Run

log = get_logger("predict")


def predict_files(run: Run, inputs: list[str | Path], skip_bad_images: bool, batch_size: int,
                  tta: str = "none") -> Predictions:
    paths = expand_inputs(inputs)
    pre = run.preprocess
    good: list[Path] = []
    for path in paths:  # check every file first, so a bad one is named before any work
        try:
            load_image(path, 8, pre.channels)
            good.append(path)
        except BadImage as err:
            if not skip_bad_images:
                raise
            log.warning("warning: skipped unreadable image %s: %s", err.path, err.reason)
    dataset = ImageFiles(good, pre.size, pre.channels, build_eval_transform(pre.mean, pre.std), pre.interpolation)
    loader = make_loader(dataset, batch_size, workers=run.config.data.workers)
    probs = run.loader_probs(loader, tta)
    labels, _ = folder_labels(inputs, good, run.classes)
    return Predictions([str(p) for p in good], run.classes, labels, probs)


def folder_labels(inputs: list[str | Path], paths: list[Path], classes: list[str]) -> tuple[np.ndarray, str | None]:
    """Each image's true class, else -1 for all; and one line saying which, if there is a question. Labels come
    when every input is a folder of class sub-folders named as the run's classes (a test folder laid out as for
    training), or every input is a CSV whose label column names a class of the run on every row.

    A folder may lack some classes; a sub-folder that is not a class, or an image outside the sub-folders,
    makes the whole prediction unlabelled: a partly labelled set would score only some images.
    """
    unlabelled = np.full(len(paths), -1, dtype=np.int64)
    items = [Path(item) for item in inputs]
    if paths and all(item.is_file() and item.suffix.lower() in CSV_SUFFIXES for item in items):
        return csv_labels(items, paths, classes)
    if not paths or not all(folder.is_dir() for folder in items):
        return unlabelled, None
    lookup = {name: i for i, name in enumerate(classes)}
    labels, strays, nested = [], set(), False
    for path in paths:
        folder = next((f for f in items if Path(path).is_relative_to(f)), None)
        parts = Path(path).relative_to(folder).parts if folder is not None else ()
        nested = nested or len(parts) > 1
        sub = parts[0] if len(parts) > 1 else None
        if sub not in lookup:
            strays.add(f"{sub!r} in {folder}" if sub else f"images directly in {folder}")
        labels.append(lookup.get(sub, -1))
    if not strays:
        return np.array(labels, dtype=np.int64), (f"true labels from the class sub-folders of "
                                                  f"{', '.join(map(str, items))}: true_label column added")
    if not nested:
        return unlabelled, None  # a plain folder of images: nothing suggested labels
    shown = ", ".join(sorted(strays)[:3]) + (", ..." if len(strays) > 3 else "")
    return unlabelled, (f"predicted unlabelled: {shown} {'is' if len(strays) == 1 else 'are'} not a class "
                        f"sub-folder of the run ({', '.join(classes)})")


CSV_SUFFIXES = (".csv", ".tsv")


def csv_labels(csvs: list[Path], paths: list[Path], classes: list[str]) -> tuple[np.ndarray, str | None]:
    """The labels of CSV inputs (``folder_labels``); a split column is said to be unused (every row predicts)."""
    unlabelled = np.full(len(paths), -1, dtype=np.int64)
    rows: dict[str, tuple[str, str, Path]] = {}
    for csv in csvs:
        for p, label, split in scan_csv(csv, require_label=False):
            rows.setdefault(str(csv.parent / p), (label, split, csv))  # a path listed again: its first row, as read
    split_note = ("; the split column is not used: every listed image is predicted"
                  if any(split for _, split, _ in rows.values()) else "")
    found = [rows.get(str(p), ("", "", None)) for p in paths]
    lookup = {name: i for i, name in enumerate(classes)}
    stray = next(((label, csv) for label, _, csv in found if label not in lookup), None)
    if stray is None:
        return np.array([lookup[label] for label, _, _ in found], dtype=np.int64), (
            f"true labels from the label column of {', '.join(map(str, csvs))}: true_label column added{split_note}")
    if not any(label for label, _, _ in found):
        return unlabelled, split_note[2:] or None  # no labels given: nothing to say about them
    label, csv = stray
    what = f"label {label!r} in {csv} is not a class of the run" if label else f"{csv} leaves some labels empty"
    return unlabelled, f"predicted unlabelled: {what} ({', '.join(classes)}){split_note}"
