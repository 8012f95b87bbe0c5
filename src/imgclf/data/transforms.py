"""Augmentation (Keras ImageDataGenerator vocabulary) and evaluation transforms.

Training augmentation runs on whole batches of cached ``B x C x H x W`` uint8 tensors at once, on
the device the model trains on: one random affine matrix per image (rotation, zoom, shear, shift,
flips folded in), applied by a single ``affine_grid`` + ``grid_sample`` call. Per-image transforms
in the loader cost a python call and a small warp per image; the batch costs one kernel launch,
and on a GPU it no longer runs on the CPU at all. Random values come from torch's global RNG, which
``seed_everything`` seeds and resume restores. Evaluation never augments: it only scales to float
and normalises with the model's mean/std.

Keras semantics kept: ``rotation_range`` and ``shear_range`` are degrees, ``zoom_range=z`` zooms
in [1-z, 1+z] (one factor for both axes, or with ``zoom_axes: independent`` an x and a y factor drawn
apart, as Keras's ImageDataGenerator does), shifts are fractions of width/height, ``fill_mode`` fills what the transform
uncovers: ``nearest`` repeats the edge, ``reflect`` mirrors, ``constant`` fills with ``cval``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from imgclf.config import AugmentConfig

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
PAD_MODES = {"nearest": "border", "reflect": "reflection"}


def resolve_augment(cfg: AugmentConfig) -> dict:
    """The preset's values with the user's explicit settings on top; None fields take the preset."""
    values = {"rotation_range": 0.0, "zoom_range": 0.0, "shear_range": 0.0, "width_shift_range": 0.0,
              "height_shift_range": 0.0, "horizontal_flip": False, "vertical_flip": False,
              "fill_mode": "nearest", "brightness_range": None}
    values.update(PRESETS[cfg.preset])
    values.update({k: v for k, v in cfg.model_dump().items() if k in values and v is not None})
    values["cval"], values["zoom_axes"] = cfg.cval, cfg.zoom_axes
    return values


class BatchAugment:
    """Random augmentation of a uint8 batch -> normalised float batch, on the batch's device."""

    def __init__(self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float]):
        self.a = resolve_augment(cfg)
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
        self.warps = any(self.a[k] for k in ("rotation_range", "zoom_range", "shear_range", "width_shift_range",
                                              "height_shift_range", "horizontal_flip", "vertical_flip"))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255)
        n = x.shape[0]
        if self.warps:
            x = self._warp(x, self.random_theta(n).to(x.device))
        if self.a["brightness_range"]:
            low, high = self.a["brightness_range"]
            factor = (low + (high - low) * torch.rand(n)).to(x.device)
            x = (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def random_theta(self, n: int) -> torch.Tensor:
        """``n x 2 x 3`` matrices mapping output to input coordinates (``affine_grid``'s convention)."""
        a = self.a
        independent = a["zoom_axes"] == "independent"
        # one uniform(-1, 1) column per parameter; the y zoom's column comes last, so "same" draws as before
        u = torch.rand(n, 8 if independent else 7, dtype=torch.float64) * 2 - 1
        angle = torch.deg2rad(u[:, 0] * a["rotation_range"])
        shear = torch.deg2rad(u[:, 1] * a["shear_range"])
        zoom = 1 + u[:, [2, 7] if independent else [2, 2]] * a["zoom_range"]  # n x 2: the x and y factors
        shift = torch.stack([u[:, 3] * a["width_shift_range"], u[:, 4] * a["height_shift_range"]], 1) * 2
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotate = torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1)
        shear_m = torch.zeros(n, 2, 2, dtype=torch.float64)
        shear_m[:, 0, 0], shear_m[:, 0, 1], shear_m[:, 1, 1] = 1, -torch.sin(shear), torch.cos(shear)
        forward = rotate @ shear_m @ torch.diag_embed(zoom)
        inverse = torch.linalg.inv(forward)
        theta = torch.cat([inverse, -(inverse @ shift.unsqueeze(2))], 2)
        for column, flip in ((0, "horizontal_flip"), (1, "vertical_flip")):
            if a[flip]:
                theta[:, :, column] *= torch.where(u[:, 5 + column] < 0, -1.0, 1.0).view(-1, 1)
        return theta.float()

    def _warp(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        grid = affine_grid(theta, x.shape[2], x.shape[3])
        fill = self.a["fill_mode"]
        if fill != "constant":
            return F.grid_sample(x, grid, mode="bilinear", padding_mode=PAD_MODES[fill], align_corners=False)
        inside = torch.ones_like(x[:, :1])
        out = F.grid_sample(torch.cat([x, inside], 1), grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
        return out[:, :-1] + (1 - out[:, -1:]) * (self.a["cval"] / 255)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, (n, c, height, width), align_corners=False)``, equal within float rounding, as two
    broadcast products: its batched matmul with an inner size of 3 took 6-7 ms of a 150 px batch of 32's
    18 ms augmentation, this 3 ms."""
    def centres(size: int) -> torch.Tensor:  # pixel centres in [-1, 1]
        return (torch.arange(size, dtype=theta.dtype, device=theta.device) * 2 + 1) / size - 1

    t = theta[:, None, None]  # n x 1 x 1 x 2 x 3
    row = centres(width).view(1, 1, width, 1) * t[..., 0] + t[..., 2]  # n x 1 x width x 2
    return row + centres(height).view(1, height, 1, 1) * t[..., 1]


def build_eval_transform(mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(_to_model_input(mean, std))


def _to_model_input(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


TTA_SHIFT = 0.0625  # 1/16 of the image: small enough to keep the object, large enough to move its pixels


def tta_views(kind: str) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The views test-time augmentation averages over; the first is always the image itself."""
    views: list[Callable[[torch.Tensor], torch.Tensor]] = [_same]
    if kind in ("flip", "flip_shift"):
        views.append(_hflip)
    if kind == "flip_shift":
        views += [partial(_shift, dx=dx, dy=dy) for dx, dy in ((TTA_SHIFT, 0), (-TTA_SHIFT, 0),
                                                                (0, TTA_SHIFT), (0, -TTA_SHIFT))]
    return views


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def _hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def _shift(x: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Move the content by (dx, dy) of the image size, repeating the edge into the uncovered strip."""
    theta = torch.tensor([[1.0, 0.0, -2 * dx], [0.0, 1.0, -2 * dy]], device=x.device).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
