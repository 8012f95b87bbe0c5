"""Run a model over a loader and collect per-image probabilities, placed by dataset position."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from imgclf.data.transforms import tta_views
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
    for images, _, positions in loader:
        batch = compute.batch(images)
        total = 0
        for view in views:
            with compute.autocast():
                total = total + objective.probabilities(model(view(batch)).float())
        probs[positions.numpy()] = (total / len(views)).cpu().numpy()
    if np.isnan(probs).any():
        raise RuntimeError("some images received no prediction; the loader skipped items")
    return probs
