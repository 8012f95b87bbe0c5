"""Training and prediction throughput: imgclf against a plain PyTorch loop and its own model-only limit.

One run builds a synthetic JPEG dataset and measures, per model, images per second for:
- imgclf train: the full pipeline (decode-once cache, 'medium' augmentation, default precision);
- a plain torchvision ImageFolder + DataLoader loop, fp32, same model and augmentation (the baseline);
- model-only: the same training step on pre-loaded tensors with imgclf's precision (the ceiling);
and for prediction, imgclf predict against the plain loop. Targets on a 2-core CPU: imgclf >= 1.8x
the plain loop, and >= 0.9x its own model-only limit.

    python benchmarks/throughput.py [--images 600] [--models simple_cnn,efficientnet_b0]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2

import imgclf
from imgclf.config import AugmentConfig, ModelConfig
from imgclf.data.transforms import resolve_augment
from imgclf.models.networks import build_model, resolve_preprocess
from imgclf.runtime import Compute

SETTINGS = {"simple_cnn": {"size": 150, "model": {"conv_filters": [32, 64, 128], "dense_layers": [512],
                                                   "pool": "flatten"}, "epochs": 2, "per_class": None},
            "efficientnet_b0": {"size": 224, "model": {}, "epochs": 1, "per_class": 80}}


def make_jpegs(root: Path, per_class: int, size: int = 256) -> Path:
    rng = np.random.default_rng(0)
    for label in range(3):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            pixels[:, label * size // 3:(label + 1) * size // 3] //= 3
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def imgclf_train(data: Path, out: Path, name: str, s: dict, workers: int | None) -> float:
    config = imgclf.build_config({"data": {"path": str(data), "image_size": s["size"], "val_fraction": 0.05,
                                           "test_fraction": 0.05, "workers": workers},
                                  "model": {"name": name, **s["model"]}, "augment": {"preset": "medium"},
                                  "train": {"epochs": s["epochs"], "batch_size": 32, "early_stopping": False,
                                            "restore_best": False},
                                  "out": str(out)})
    imgclf.train(config)  # the first run decodes into the cache: not timed
    timed = out.with_name(out.name + "_timed")
    run = imgclf.train(config.model_copy(update={"out": str(timed)}))
    n_train = sum(1 for r in read_csv(run.path / "split.csv") if r["split"] == "train")
    rows = read_csv(run.path / "history.csv")
    return n_train * len(rows) / sum(float(r["train_seconds"]) for r in rows)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def plain_transform(size: int, train: bool):
    a = resolve_augment(AugmentConfig(preset="medium"))
    steps = [v2.PILToTensor(), v2.Resize((size, size), antialias=True)]
    if train:
        steps += [v2.RandomAffine(a["rotation_range"], (a["width_shift_range"], a["height_shift_range"]),
                                  (1 - a["zoom_range"], 1 + a["zoom_range"]), a["shear_range"]),
                  v2.RandomHorizontalFlip(), v2.RandomVerticalFlip()]
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


def plain_train(data: Path, name: str, s: dict, workers: int) -> float:
    """The baseline users write: ImageFolder, DataLoader, fp32, decode every epoch."""
    dataset = datasets.ImageFolder(str(data), transform=plain_transform(s["size"], True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True, num_workers=workers)
    cfg = ModelConfig(name=name, **s["model"])
    model = build_model(cfg, 3, resolve_preprocess(cfg, s["size"], 3))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    model.train()
    start, seen = time.perf_counter(), 0
    for images, targets in loader:
        loss = torch.nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(targets)
    return seen / (time.perf_counter() - start)


def model_only(name: str, s: dict, steps: int) -> float:
    """The same training step on tensors already in memory, with imgclf's default compute settings."""
    compute = Compute.resolve("auto", "auto", None)
    cfg = ModelConfig(name=name, **s["model"])
    model = compute.prepare(build_model(cfg, 3, resolve_preprocess(cfg, s["size"], 3)))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    images, targets = torch.randn(32, 3, s["size"], s["size"]), torch.randint(0, 3, (32,))
    model.train()
    for i in range(steps + 2):
        if i == 2:
            start = time.perf_counter()
        with compute.autocast():
            out = model(compute.batch(images))
        loss = torch.nn.functional.cross_entropy(out.float(), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return 32 * steps / (time.perf_counter() - start)


def predict_rates(run_dir: Path, data: Path, size: int) -> tuple[float, float]:
    run = imgclf.load_run(run_dir)
    paths = [str(p) for p in sorted(data.rglob("*.jpg"))]
    start = time.perf_counter()
    run.predict(paths)
    ours = len(paths) / (time.perf_counter() - start)
    dataset = datasets.ImageFolder(str(data), transform=plain_transform(size, False))
    model = run.model.float().to(memory_format=torch.contiguous_format).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=32):
            model(images).softmax(1)
    return ours, len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600, help="JPEGs per class (3 classes, 256x256)")
    parser.add_argument("--models", default="simple_cnn,efficientnet_b0", help="comma-separated")
    parser.add_argument("--plain-workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="DataLoader workers for the plain loop")
    parser.add_argument("--workers", type=int, help="imgclf loader workers (default: automatic)")
    args = parser.parse_args()
    logging.getLogger("imgclf").setLevel(logging.WARNING)
    print(f"CPU cores: {os.cpu_count()}, torch {torch.__version__}, {Compute.resolve('auto', 'auto', None)}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("IMGCLF_CACHE_DIR", str(tmp / "cache"))
        for name in args.models.split(","):
            s = SETTINGS[name]
            data = make_jpegs(tmp / f"data_{name}", s["per_class"] or args.images)
            ours = imgclf_train(data, tmp / f"run_{name}", name, s, args.workers)
            plain = plain_train(data, name, s, args.plain_workers)
            limit = model_only(name, s, steps=8 if name == "simple_cnn" else 3)
            pred_ours, pred_plain = predict_rates(tmp / f"run_{name}_timed", data, s["size"])
            print(f"\n{name} at {s['size']}px, batch 32, 'medium' augmentation ({3 * (s['per_class'] or args.images)} "
                  f"images)")
            print(f"  train  imgclf {ours:7.1f} img/s | plain loop fp32 {plain:7.1f} | model-only {limit:7.1f}"
                  f"  ->  {ours / plain:.2f}x plain, {ours / limit:.2f}x model-only")
            print(f"  predict imgclf {pred_ours:6.1f} img/s | plain loop fp32 {pred_plain:7.1f}"
                  f"  ->  {pred_ours / pred_plain:.2f}x plain")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
