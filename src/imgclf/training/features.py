"""Feature caching: with a frozen backbone, run it once per image (or per augmented view) and
train the head on the stored features, instead of running the backbone again every epoch.

Augmentation is never dropped on the way: with augmentation on, a frozen stage caches
``feature_views`` augmented views per image (``AUTO_VIEWS`` when unset), or, with one view asked
for, trains uncached so that every epoch sees freshly augmented images as Keras does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgclf.config import AugmentConfig, TrainConfig
from imgclf.config.run import AUTO_VIEWS
from imgclf.data.datasets import make_loader
from imgclf.data.pipeline import drops_lone_sample
from imgclf.data.transforms import resolve_augment
from imgclf.runtime import Compute

AUGMENTING_KEYS = ("rotation_range", "zoom_range", "shear_range", "width_shift_range", "height_shift_range",
                   "horizontal_flip", "vertical_flip", "brightness_range")


def augmenting(augment: AugmentConfig) -> bool:
    """Whether the training images are augmented at all (the preset and the user's settings resolved)."""
    values = resolve_augment(augment)
    return any(values[key] for key in AUGMENTING_KEYS)


def cache_plan(cfg: TrainConfig, augment: AugmentConfig) -> tuple[int | None, str]:
    """(views to cache, or None to train uncached; the log's words) for a stage with a frozen backbone."""
    if not cfg.feature_cache:
        return None, "trained uncached (feature_cache off)"
    if not augmenting(augment):
        extra = f"; augmentation is off, so the {cfg.feature_views} views would be identical" \
            if (cfg.feature_views or 1) > 1 else ""
        return 1, f"head trained on cached features (1 view per image{extra})"
    if cfg.feature_views is None:
        return AUTO_VIEWS, (f"head trained on cached features of {AUTO_VIEWS} augmented views per image "
                            "(--feature-views K to choose, 1 to augment every epoch uncached)")
    if cfg.feature_views == 1:
        return None, ("trained uncached: augmentation is on and feature_views=1, so every epoch sees freshly "
                      "augmented images (--feature-views K caches K augmented views, faster)")
    return cfg.feature_views, f"head trained on cached features of {cfg.feature_views} augmented views per image"


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


def feature_loader(features: TensorDataset, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
                   sampler=None, trains_batchnorm: bool = False) -> DataLoader:
    """Batches of cached feature rows; a last row alone is left out (and said) where the head's BatchNorm trains."""
    count = len(sampler) if sampler is not None else len(features)
    return make_loader(features, batch_size, shuffle=shuffle, sampler=sampler, generator=generator, workers=0,
                       drop_last=drops_lone_sample(count, batch_size, trains_batchnorm, "feature rows"))
