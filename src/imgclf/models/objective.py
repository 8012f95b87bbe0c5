"""Loss and probabilities for a classifier's logits: K-way softmax, or one logit with BCE for 2 classes."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.utils.class_weight import compute_class_weight


class Objective:
    """``loss(logits, targets)`` for training and ``probabilities(logits)`` as an N x K matrix."""

    def __init__(self, num_classes: int, sigmoid: bool = False, class_weights: torch.Tensor | None = None,
                 label_smoothing: float = 0.0):
        if sigmoid and num_classes != 2:
            raise ValueError("a single-logit (sigmoid) head needs exactly 2 classes")
        self.num_classes = num_classes
        self.sigmoid = sigmoid
        self.class_weights = class_weights
        self.label_smoothing = label_smoothing

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        weights = self.class_weights.to(logits.device) if self.class_weights is not None else None
        if not self.sigmoid:
            return F.cross_entropy(logits, targets, weight=weights, label_smoothing=self.label_smoothing)
        soft = targets.float() * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        per_sample = F.binary_cross_entropy_with_logits(logits.squeeze(1), soft, reduction="none")
        if weights is None:
            return per_sample.mean()
        w = weights[targets]
        return (per_sample * w).sum() / w.sum()  # same normalisation as cross_entropy's weight=

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.double()
        if self.sigmoid:
            p1 = torch.sigmoid(logits.squeeze(1))
            return torch.stack([1 - p1, p1], dim=1)
        return torch.softmax(logits, dim=1)


def balanced_class_weights(targets: np.ndarray, num_classes: int) -> np.ndarray:
    """scikit-learn's 'balanced' weights: n_samples / (n_classes * count[c])."""
    return compute_class_weight("balanced", classes=np.arange(num_classes), y=targets)
