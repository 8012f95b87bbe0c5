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


def render_cases(run, preds: Predictions, root: Path, per_group: int = 8) -> tuple[dict[str, list[Case]], str]:
    """Cases per group, with Grad-CAM thumbnails where the model and images allow; and a note why not."""
    groups = pick_cases(preds, per_group)
    note = ""
    try:
        explainer = Explainer(run)
    except Exception as err:  # a model Grad-CAM cannot explain still gets its table
        explainer, note = None, f"Grad-CAM unavailable: {err}"
    chosen = [i for rows in groups.values() for i in rows]
    present = [i for i in chosen if (root / preds.paths[i]).is_file()]
    if explainer is not None and len(present) < len(chosen):
        note = f"{len(chosen) - len(present)} image(s) are no longer under {root}; their thumbnails are missing"
    thumbnails: dict[int, bytes] = {}
    if explainer is not None and present:
        explained = explainer.explain([root / preds.paths[i] for i in present], [int(preds.pred[i]) for i in present])
        thumbnails = {i: _png(np.concatenate([as_rgb(e.image), overlay(e.image, e.heatmap)], axis=1))
                      for i, e in zip(present, explained, strict=True)}
    cases = {name: [Case(preds.paths[i], preds.classes[preds.true[i]], preds.classes[preds.pred[i]],
                         float(preds.probs[i, preds.pred[i]]), thumbnails.get(i)) for i in rows]
             for name, rows in groups.items()}
    return cases, note


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()
