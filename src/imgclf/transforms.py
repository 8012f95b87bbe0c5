"""Augmentation (Keras ImageDataGenerator vocabulary) and evaluation transforms, on torchvision v2.

Both work on the cached ``C x H x W`` uint8 tensors. Evaluation never augments: it only scales
to float and normalises with the model's mean/std.

Keras semantics kept: ``rotation_range`` and ``shear_range`` are degrees, ``zoom_range=z`` zooms
in [1-z, 1+z], shifts are fractions of width/height, ``fill_mode`` fills what the transform
uncovers. ``nearest`` (edge replicate) and ``reflect`` are done by padding before the affine
transform and centre-cropping after it, since v2.RandomAffine itself only fills a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2

from .config import AugmentConfig

PRESETS: dict[str, dict] = {
    "none": {},
    "light": {"rotation_range": 10, "zoom_range": 0.1, "width_shift_range": 0.1, "height_shift_range": 0.1},
    # What users' notebooks use: rotation 45, zoom/shear/shift 0.2, both flips.
    "medium": {"rotation_range": 45, "zoom_range": 0.2, "shear_range": 0.2, "width_shift_range": 0.2,
               "height_shift_range": 0.2, "horizontal_flip": True, "vertical_flip": True},
    "strong": {"rotation_range": 90, "zoom_range": 0.3, "shear_range": 15, "width_shift_range": 0.25,
               "height_shift_range": 0.25, "horizontal_flip": True, "vertical_flip": True,
               "brightness_range": [0.7, 1.3]},
}
PAD_MODES = {"nearest": "edge", "reflect": "reflect"}


def resolve_augment(cfg: AugmentConfig) -> dict:
    """The preset's values with the user's explicit settings on top; None fields take the preset."""
    values = {"rotation_range": 0.0, "zoom_range": 0.0, "shear_range": 0.0, "width_shift_range": 0.0,
              "height_shift_range": 0.0, "horizontal_flip": False, "vertical_flip": False,
              "fill_mode": "nearest", "brightness_range": None}
    values.update(PRESETS[cfg.preset])
    values.update({k: v for k, v in cfg.model_dump().items() if k in values and v is not None})
    values["cval"] = cfg.cval
    return values


def build_train_transform(cfg: AugmentConfig, size: int, mean: Sequence[float],
                          std: Sequence[float]) -> v2.Compose:
    a = resolve_augment(cfg)
    steps: list = []
    geometric = any(a[k] for k in ("rotation_range", "zoom_range", "shear_range",
                                   "width_shift_range", "height_shift_range"))
    if geometric:
        pad = size // 2 if a["fill_mode"] in PAD_MODES else 0
        scale = size / (size + 2 * pad)  # shifts are fractions of the original, not the padded, size
        if pad:
            steps.append(v2.Pad(pad, padding_mode=PAD_MODES[a["fill_mode"]]))
        zoom = a["zoom_range"]
        steps.append(v2.RandomAffine(
            degrees=a["rotation_range"],
            translate=(a["width_shift_range"] * scale, a["height_shift_range"] * scale),
            scale=(1 - zoom, 1 + zoom) if zoom else None,
            shear=a["shear_range"] or None,
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=a["cval"] if a["fill_mode"] == "constant" else 0,
        ))
        if pad:
            steps.append(v2.CenterCrop(size))
    if a["horizontal_flip"]:
        steps.append(v2.RandomHorizontalFlip())
    if a["vertical_flip"]:
        steps.append(v2.RandomVerticalFlip())
    if a["brightness_range"]:
        steps.append(v2.ColorJitter(brightness=tuple(a["brightness_range"])))
    return v2.Compose([*steps, *_to_model_input(mean, std)])


def build_eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(_to_model_input(mean, std))


def _to_model_input(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
