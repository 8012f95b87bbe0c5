"""Run a model over a loader and collect per-image probabilities, placed by dataset position."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from imgclf.data.transforms import tta_views
from imgclf.errors import RunDirError
from imgclf.models.objective import Objective
from imgclf.runtime import Compute


@torch.no_grad()
def predict_probs(model: nn.Module, objective: Objective, loader: DataLoader, compute: Compute,
                  tta: str = "none") -> np.ndarray:
    """N x K probabilities; row i belongs to dataset item i even if the loader shuffles.

    With ``tta`` each image's probabilities are the mean over its test-time views (``tta_views``).
    """
    model.eval()
    views = tta_views(tta)
    probs = np.full((len(loader.dataset), objective.num_classes), np.nan)
    seen = np.zeros(len(loader.dataset), dtype=bool)
    for images, _, positions in loader:
        batch = compute.batch(images)
        total = 0
        for view in views:
            with compute.autocast():
                total = total + objective.probabilities(model(view(batch)).float())
        probs[positions.numpy()] = (total / len(views)).cpu().numpy()
        seen[positions.numpy()] = True
    if not seen.all():
        raise RuntimeError("some images received no prediction; the loader skipped items")
    if not np.isfinite(probs).all():
        raise RunDirError(f"the model's output is not a number for {int((~np.isfinite(probs).all(1)).sum())} "
                         "image(s): its weights hold NaN or infinite values (training diverged: lower --lr; or a "
                         "damaged model.safetensors: restore it or re-train)")
    return probs
