"""Predict new images with a saved run: files, folders (recursive) or glob patterns; a folder of class
sub-folders named as the run's classes gives each image its true label."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from imgclf.data.datasets import ImageFiles, make_loader
from imgclf.data.images import BadImage, load_image
from imgclf.data.inputs import read_inputs
from imgclf.data.transforms import build_eval_transform
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger

if TYPE_CHECKING:
    from imgclf.runs.network import Run

log = get_logger("predict")


def predict_files(run: Run, inputs: list[str | Path], skip_bad_images: bool, batch_size: int,
                  tta: str = "none") -> Predictions:
    named = read_inputs(inputs)
    pre = run.preprocess
    good: list[Path] = []
    for path in named.paths:  # check every file first, so a bad one is named before any work
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
    labels, note = named.true_labels(good, run.classes)
    return Predictions([str(p) for p in good], run.classes, labels, probs, label_note=note)
