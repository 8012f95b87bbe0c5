"""Feature caching: with a frozen backbone, run it once per image (or per augmented view) and
train the head on the stored features, instead of running the backbone again every epoch."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgclf.data.datasets import make_loader
from imgclf.runtime import Compute


class HeadOnly(nn.Module):
    """A classifier's head as a model over cached features; ``fit`` and ``predict_probs`` use it as is."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.backbone = nn.Identity()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader: DataLoader, compute: Compute, views: int = 1) -> TensorDataset:
    """``views`` passes over ``loader`` -> a dataset of (feature, target, position) on the CPU.

    Positions index the original images, so view ``v`` of image ``i`` keeps position ``i``.
    """
    backbone.eval()
    feats, targets, positions = [], [], []
    for _ in range(views):
        for images, target, position in loader:
            with compute.autocast():
                out = backbone(compute.batch(images))
            feats.append(out.float().cpu())
            targets.append(target)
            positions.append(position)
    return TensorDataset(torch.cat(feats), torch.cat(targets), torch.cat(positions))


def feature_loader(features: TensorDataset, batch_size: int, shuffle: bool,
                   generator: torch.Generator | None = None, sampler=None) -> DataLoader:
    return make_loader(features, batch_size, shuffle=shuffle, sampler=sampler, generator=generator, workers=0)
