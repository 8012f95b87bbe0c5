"""``imgclf demo``: a real dataset shipped with scikit-learn (digits), written as PNG class folders, trained."""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.config import Config, build_config
from imgclf.data.scan import is_ignored
from imgclf.errors import ConfigError

DEMO_SIZE = 32  # the 8x8 digits are upscaled to 32x32 PNGs


def write_digits(folder: Path, size: int = DEMO_SIZE) -> Path:
    """Write scikit-learn's 1797 handwritten digits as ``folder/<digit>/<n>.png``, whole or not at all (into a
    partial folder, then renamed); reuse a folder that holds exactly those files. The demo trains on every
    image in it, so a folder holding anything else is refused, never written into."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    expected = {f"{label}/{n:04d}.png" for n, label in enumerate(digits.target)}
    if folder.exists() or folder.is_symlink():
        _check_demo_folder(folder, expected)
        return folder
    partial = folder.with_name(PARTIAL_PREFIX + folder.name)  # a killed demo's is its own output
    if partial.is_symlink() or partial.is_file():
        partial.unlink()
    elif partial.exists():
        shutil.rmtree(partial)
    for n, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        pixels = np.clip(image * (255.0 / 16.0), 0, 255).astype(np.uint8)
        path = partial / str(label) / f"{n:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC).save(path)
    os.rename(partial, folder)
    return folder


PARTIAL_PREFIX = ".partial-"  # OUT/.partial-digits while the digits are written


def _check_demo_folder(folder: Path, expected: set[str]) -> None:
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; the demo writes its digits there: choose another --out")
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*")
             if not p.is_dir() and not any(is_ignored(part) for part in p.relative_to(folder).parts)}
    extra, missing = sorted(found - expected), sorted(expected - found)
    if extra or missing:
        what = (f"holds files the demo did not write ({', '.join(extra[:3])})" if extra
                else f"lacks {len(missing)} of the demo's images ({', '.join(missing[:3])})")
        raise ConfigError(f"{folder} {what}; the demo trains on every image there: remove {folder} (the demo writes "
                          "it again) or choose another --out")


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
