"""``imgclf demo``: a real dataset shipped with scikit-learn (digits), written as PNG class folders, trained."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.config import Config, build_config

DEMO_SIZE = 32  # the 8x8 digits are upscaled to 32x32 PNGs


def write_digits(folder: Path, size: int = DEMO_SIZE) -> Path:
    """Write scikit-learn's 1797 handwritten digits as ``folder/<digit>/<n>.png``; reuse if present."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == len(digits.target):
        return folder
    for n, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        path = folder / str(label) / f"{n:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).save(path)
    return folder


TRANSFER_MODEL = "tf_efficientnet_lite0"
CNN_EPOCHS, TRANSFER_EPOCHS = 30, 4  # the demos' default epochs (--epochs sets either)


def demo_config(out: Path, epochs: int | None = None, transfer: bool = False, overrides: dict | None = None) -> Config:
    """A small CNN on 1-channel 32 px digits (``epochs`` default 30); or, with ``transfer``, ImageNet
    EfficientNet-Lite0 at 64 px with the default transfer recipe (head on cached features, then a short
    fine-tune; ``epochs`` default 4). Pool split 70/15/15."""
    epochs = epochs or (TRANSFER_EPOCHS if transfer else CNN_EPOCHS)
    run_dir = out / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S")
    values = {
        "data": {"path": str(out / "digits"), "image_size": DEMO_SIZE, "channels": 1},
        "model": {"name": "simple_cnn", "conv_filters": [32, 64, 128], "dense_layers": [128], "dropout": 0.3},
        "augment": {"preset": "light"},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 2e-3, "patience": min(6, epochs)},
        "out": str(run_dir),
    }
    if transfer:
        values["data"].update(image_size=64, channels=3)
        values["model"] = {"name": TRANSFER_MODEL, "pretrained": True}
        values["train"] = {"epochs": epochs, "batch_size": 64}
    for section, fields in (overrides or {}).items():
        values.setdefault(section, {}).update(fields)
    return build_config(values)
