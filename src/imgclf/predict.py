"""Predict new images with a saved run: files, folders (recursive) or glob patterns."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .datasets import ImageFiles, make_loader
from .errors import DataError
from .images import BadImage, load_image
from .logs import get_logger
from .predictions import Predictions
from .scan import is_ignored, is_image, scan_csv
from .transforms import build_eval_transform

if TYPE_CHECKING:
    from .run import Run

log = get_logger("predict")


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, a CSV/TSV's ``path`` column, folders searched recursively, else a glob."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
            found += [path.parent / p for p, _, _ in scan_csv(path, require_label=False)]
        elif path.is_file():
            found.append(path)
        elif path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and is_image(p.name)
                            and not any(is_ignored(part) for part in p.relative_to(path).parts))
        else:
            matches = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(f"{item} is not a file or folder and matches no files")
            found += matches
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return found


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
    return Predictions([str(p) for p in good], run.classes, np.full(len(good), -1), probs)
