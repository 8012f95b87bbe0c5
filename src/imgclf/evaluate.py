"""Run a model over a loader and collect per-image probabilities, placed by dataset position."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from .objective import Objective
from .runtime import Compute


@torch.no_grad()
def predict_probs(model: nn.Module, objective: Objective, loader: DataLoader, compute: Compute) -> np.ndarray:
    """N x K probabilities; row i belongs to dataset item i even if the loader shuffles."""
    model.eval()
    probs = np.full((len(loader.dataset), objective.num_classes), np.nan)
    for images, _, positions in loader:
        with compute.autocast():
            logits = model(compute.batch(images))
        probs[positions.numpy()] = objective.probabilities(logits).cpu().numpy()
    if np.isnan(probs).any():
        raise RuntimeError("some images received no prediction; the loader skipped items")
    return probs
