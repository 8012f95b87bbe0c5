"""Predict new images with a saved run: files, folders (recursive) or glob patterns; a folder of class
sub-folders named as the run's classes gives each image its true label."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgclf.data.datasets import ImageFiles, make_loader
from imgclf.data.images import BadImage, load_image
from imgclf.data.inputs import expand_inputs
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
    """Each image's true class when every input is a folder of class sub-folders named as the run's classes
    (a test folder laid out as for training), else -1 for all; and one line saying which, if there is a question.

    A folder may lack some classes; a sub-folder that is not a class, or an image outside the sub-folders,
    makes the whole prediction unlabelled: a partly labelled CSV would score only some images.
    """
    unlabelled = np.full(len(paths), -1, dtype=np.int64)
    folders = [Path(item) for item in inputs]
    if not paths or not all(folder.is_dir() for folder in folders):
        return unlabelled, None
    lookup = {name: i for i, name in enumerate(classes)}
    labels, strays, nested = [], set(), False
    for path in paths:
        folder = next((f for f in folders if Path(path).is_relative_to(f)), None)
        parts = Path(path).relative_to(folder).parts if folder is not None else ()
        nested = nested or len(parts) > 1
        sub = parts[0] if len(parts) > 1 else None
        if sub not in lookup:
            strays.add(f"{sub!r} in {folder}" if sub else f"images directly in {folder}")
        labels.append(lookup.get(sub, -1))
    if not strays:
        return np.array(labels, dtype=np.int64), (f"true labels from the class sub-folders of "
                                                  f"{', '.join(map(str, folders))}: true_label column added")
    if not nested:
        return unlabelled, None  # a plain folder of images: nothing suggested labels
    shown = ", ".join(sorted(strays)[:3]) + (", ..." if len(strays) > 3 else "")
    return unlabelled, (f"predicted unlabelled: {shown} {'is' if len(strays) == 1 else 'are'} not a class "
                        f"sub-folder of the run ({', '.join(classes)})")
