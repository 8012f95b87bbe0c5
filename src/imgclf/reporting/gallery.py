"""The report's gallery: the most confident errors and the least confident correct predictions,
each shown as the image the model saw next to its Grad-CAM overlay."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.reporting.explain import Explainer
from imgclf.reporting.plots import as_rgb, overlay

log = get_logger("gallery")


@dataclass(frozen=True)
class Case:
    path: str
    true: str
    predicted: str
    confidence: float
    png: bytes | None = None  # image | overlay, or None when the file could not be explained


def pick_cases(preds: Predictions, per_group: int = 8) -> dict[str, list[int]]:
    """Row indices: errors by falling confidence, correct predictions by rising confidence."""
    wrong = np.flatnonzero(preds.pred != preds.true)
    right = np.flatnonzero(preds.pred == preds.true)
    confidence = preds.probs[np.arange(len(preds.pred)), preds.pred]  # in the decided class
    return {"most confident errors": wrong[np.argsort(-confidence[wrong], kind="stable")][:per_group].tolist(),
            "least confident correct": right[np.argsort(confidence[right], kind="stable")][:per_group].tolist()}


def render_cases(run, preds: Predictions, root: Path, split: str,
                 per_group: int = 8) -> tuple[dict[str, list[Case]], str]:
    """Cases per group, with Grad-CAM thumbnails where the model and images allow; and a note why not.

    Only the run's own images are opened: those split.csv lists for ``split``, inside the dataset folder."""
    groups = pick_cases(preds, per_group)
    try:
        explainer = Explainer(run)
    except Exception as err:  # a model Grad-CAM cannot explain still gets its table
        return _cases(preds, groups, {}), f"Grad-CAM unavailable: {err}"
    present, note = own_images(run, preds, root, split, [i for rows in groups.values() for i in rows])
    thumbnails: dict[int, bytes] = {}
    if present:
        explained = explainer.explain([root / preds.paths[i] for i in present], [int(preds.pred[i]) for i in present])
        thumbnails = {i: _png(np.concatenate([as_rgb(e.image), overlay(e.image, e.heatmap)], axis=1))
                      for i, e in zip(present, explained, strict=True)}
    return _cases(preds, groups, thumbnails), note


def own_images(run, preds: Predictions, root: Path, split: str, chosen: list[int]) -> tuple[list[int], str]:
    """The rows of ``chosen`` whose image may be opened (the run's own, still on disk), and a note on the rest.

    predictions_<split>.csv is a file from a stranger: a path in it that the run's sealed split.csv does not
    list for ``split`` (/etc/passwd, ``../``, another split's image) is never opened, so no other file reaches
    the page."""
    if not root.is_dir():
        return [], f"the dataset folder {root} is gone; the thumbnails are missing"
    index = run.index(root)
    # split.csv's own paths, absolute ones included (cv's fold runs list their images by absolute path)
    own = {path for path, where in zip(index.paths, index.splits, strict=True) if where == split}
    listed = [i for i in chosen if preds.paths[i] in own]
    present = [i for i in listed if (root / preds.paths[i]).is_file()]
    notes = []
    if len(listed) < len(chosen):
        notes.append(f"{len(chosen) - len(listed)} path(s) in predictions_{split}.csv are not images of the run's "
                     f"{split} split (split.csv); their thumbnails are left out")
    if len(present) < len(listed):
        notes.append(f"{len(listed) - len(present)} image(s) are no longer under {root}; their thumbnails are missing")
    return present, "; ".join(notes)


def _cases(preds: Predictions, groups: dict[str, list[int]], thumbnails: dict[int, bytes]) -> dict[str, list[Case]]:
    return {name: [Case(preds.paths[i], preds.classes[preds.true[i]], preds.classes[preds.pred[i]],
                        float(preds.probs[i, preds.pred[i]]), thumbnails.get(i)) for i in rows]
            for name, rows in groups.items()}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
