"""Training throughput on the networks users train: imgclf against a plain PyTorch loop on the same model.

One run builds a synthetic JPEG dataset per workload and measures, in interleaved rounds (imgclf,
plain, imgclf, plain, ...; medians reported, so a busy moment on a shared machine hits both sides):
- imgclf train: images/s of an epoch's training alone (history.csv ``train_seconds``; the first
  epoch of each training warms up and is left out): cached uint8 images, 'medium' augmentation on
  each batch, imgclf's default precision and memory format;
- plain loop: the model-only limit, the same model, optimizer (fused Adam, as imgclf's) and loss on
  tensors already in memory, with the same precision and memory format (no data path, no augmentation);
- their ratio (target >= 0.9), and where the rest of imgclf's whole call goes: per-epoch validation,
  per-epoch saves and stage set-up (resume state, best weights, loaders, feature caches), set-up, and
  the report after training (final test predictions, and val's where training's validation of the saved
  weights cannot stand in for them; baselines, plots, report.html).

Workloads (batch 32, Adam, 'medium' = the COVID notebook's rotation 45, zoom/shear/shifts 0.2, both flips):
- notebook_cnn: the bears notebook's CNN exactly, 150 px: conv 32/64/128 3x3 'valid' relu, each
  followed by max-pool 2, no BatchNorm, flatten, dense 512 relu, softmax (18.9M-parameter dense layer);
- vgg16_head: VGG16 frozen (no pretrained weights: speed only), head flatten -> dense 512 relu,
  150 px, the backbone run every epoch (feature_cache off: what a Keras head stage does);
- efficientnet_b0: full fine-tune at 224 px (no pretrained weights: speed only);
- simple_cnn: imgclf's shorthand simple CNN (BatchNorm, 'same' convolutions, flatten, dense 512), 150 px.
``--predict`` also times prediction: imgclf predict against a plain fp32 ImageFolder loop. Each result
line ends with the load average (1 minute) it was measured under: on a 2-core machine another busy
process costs torch's two threads far more than its share (measured: 140 img/s on one thread against
52 on two, at load 4.5), so a number without its load says little. ``--threads N`` sets torch's
intra-op threads for both sides.

    python benchmarks/throughput.py [--workloads notebook_cnn,vgg16_head,efficientnet_b0] [--rounds 3] [--threads N]
                                    [--epochs 2] [--images N]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import statistics
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
from imgclf.config import ModelConfig
from imgclf.models.freeze import apply_freeze
from imgclf.models.networks import build_model, resolve_preprocess
from imgclf.runtime import Compute

NOTEBOOK_CONV = ["conv 32 3 valid relu", "pool max 2", "conv 64 3 valid relu", "pool max 2",
                 "conv 128 3 valid relu", "pool max 2"]
WORKLOADS = {
    "notebook_cnn": {"size": 150, "images": 300, "model": {"name": "simple_cnn", "conv_layers": NOTEBOOK_CONV,
                                                           "head_layers": ["flatten", "dense 512 relu"]}},
    "vgg16_head": {"size": 150, "images": 120, "model": {"name": "vgg16", "pretrained": False,
                                                         "head_layers": ["flatten", "dense 512 relu"]},
                   "train": {"freeze": "backbone", "feature_cache": False}},
    "efficientnet_b0": {"size": 224, "images": 100, "model": {"name": "efficientnet_b0", "pretrained": False}},
    "simple_cnn": {"size": 150, "images": 300, "model": {"name": "simple_cnn", "conv_filters": [32, 64, 128],
                                                         "dense_layers": [512], "pool": "flatten"}},
}
BATCH = 32


def make_jpegs(root: Path, n: int, size: int = 256) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % 3
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        pixels[:, label * size // 3:(label + 1) * size // 3] //= 3
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def imgclf_config(data: Path, out: Path, w: dict, epochs: int):
    return imgclf.build_config({
        "data": {"path": str(data), "image_size": w["size"], "val_fraction": 0.1, "test_fraction": 0.1},
        "model": w["model"], "augment": {"preset": "medium"},
        "train": {"epochs": epochs, "batch_size": BATCH, "optimizer": "adam", "early_stopping": False,
                  "restore_best": False, **w.get("train", {})},
        "out": str(out)})


class _TrainedLine(logging.Handler):
    """Catches imgclf's "trained N epochs in X s" line: X is the training phase (epochs plus checkpoints)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: float | None = None
        self.at = 0.0  # when it was logged (time.time())

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and record.msg.startswith("trained ") and record.args:
            self.seconds, self.at = float(record.args[-1]), record.created


def imgclf_train(config) -> tuple[float, dict]:
    """(training images/s, median over the epochs after the first; the call's seconds by phase: ``wall``;
    ``train`` (the epochs' training alone); ``val`` (per-epoch validation); ``save`` (the rest of the training
    phase: per epoch the resume state, the best weights and history.csv; per stage its loaders and, for a
    frozen stage, its feature cache); ``setup`` (before training); ``report`` (after training:
    curves, final test (and, where needed, val) predictions, baselines, evaluation plots, report.html))."""
    line = _TrainedLine()
    logger = logging.getLogger("imgclf")
    quiet = [(handler, handler.level) for handler in logger.handlers]  # the console stays at warnings
    for handler, level in quiet:
        handler.setLevel(max(level, logging.WARNING))
    logger_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(line)
    try:
        start = time.time()
        run = imgclf.train(config)
        end = time.time()
    finally:
        logger.removeHandler(line)
        logger.setLevel(logger_level)
        for handler, level in quiet:
            handler.setLevel(level)
    if line.seconds is None:
        raise SystemExit("imgclf's 'trained N epochs in X s' line was not logged: the benchmark cannot time the phases")
    n_train = sum(1 for r in read_csv(run.path / "split.csv") if r["split"] == "train")
    history = read_csv(run.path / "history.csv")
    train = [float(r["train_seconds"]) for r in history]
    epochs = sum(float(r["seconds"]) for r in history)
    return n_train / statistics.median(train[1:]), {
        "wall": end - start, "train": sum(train), "val": epochs - sum(train), "save": line.seconds - epochs,
        "setup": line.at - line.seconds - start, "report": end - line.at}


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


class PlainLoop:
    """The model-only limit: imgclf's model, Adam and cross-entropy on in-memory tensors, imgclf's precision
    and memory format, the frozen part (if any) frozen with requires_grad off."""

    def __init__(self, w: dict):
        self.compute = Compute.resolve("auto", "auto", None)
        cfg = ModelConfig(**w["model"])
        model = build_model(cfg, 3, resolve_preprocess(cfg, w["size"], 3))
        if w.get("train", {}).get("freeze") == "backbone":
            apply_freeze(model, "backbone")
        self.model = self.compute.prepare(model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4, fused=True)  # as imgclf's
        self.images = self.compute.batch(torch.randn(BATCH, 3, w["size"], w["size"]))
        self.targets = torch.randint(0, 3, (BATCH,))
        self.step()  # warm-up: oneDNN primitives, optimizer state

    def step(self) -> None:
        self.model.train()
        with self.compute.autocast():
            out = self.model(self.images)
        loss = torch.nn.functional.cross_entropy(out.float(), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def rate(self, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return BATCH * steps / (time.perf_counter() - start)


def predict_rates(run_dir: Path, data: Path, size: int) -> tuple[float, float]:
    run = imgclf.load_run(run_dir)
    paths = [str(p) for p in sorted(data.rglob("*.jpg"))]
    start = time.perf_counter()
    run.predict(paths)
    ours = len(paths) / (time.perf_counter() - start)
    transform = v2.Compose([v2.PILToTensor(), v2.Resize((size, size), antialias=True),
                            v2.ToDtype(torch.float32, scale=True)])
    dataset = datasets.ImageFolder(str(data), transform=transform)
    model = run.model.float().to(memory_format=torch.contiguous_format).eval()
    start = time.perf_counter()
    with torch.no_grad():
        for images, _ in torch.utils.data.DataLoader(dataset, batch_size=BATCH, num_workers=2):
            model(images).softmax(1)
    return ours, len(dataset) / (time.perf_counter() - start)


def measure(name: str, tmp: Path, rounds: int, epochs: int, predict: bool, images: int | None = None) -> dict:
    w = {**WORKLOADS[name], **({"images": images} if images else {})}
    data = make_jpegs(tmp / f"data_{name}", w["images"])
    config = imgclf_config(data, tmp / f"run_{name}", w, epochs)
    imgclf.train(config.model_copy(update={"train": config.train.model_copy(update={"epochs": 1})}))  # decode
    plain = PlainLoop(w)
    steps = max(3, int(w["images"] * 0.8) // BATCH)  # as many steps as one imgclf epoch
    ours, theirs, parts = [], [], []
    for r in range(rounds):
        rate, seconds = imgclf_train(config.model_copy(update={"out": str(tmp / f"run_{name}_{r}")}))
        ours.append(rate)
        parts.append(seconds)
        theirs.append(plain.rate(steps))
    ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
    result = {"imgclf": statistics.median(ours), "plain": statistics.median(theirs),
              "parts": {k: statistics.median(p[k] for p in parts) for k in parts[0]}, "n": w["images"],
              "steps": steps,
              "spread": (min(ratios), max(ratios))}
    if predict:
        result["predict"] = predict_rates(tmp / f"run_{name}_0", data, w["size"])
    return result


def report(name: str, r: dict, rounds: int, epochs: int) -> None:
    w = WORKLOADS[name]
    print(f"\n{name} at {w['size']} px: {r['n']} images (80% train), {rounds} rounds of imgclf ({epochs} epochs, "
          f"first left out) and plain ({r['steps']} steps)")
    low, high = r["spread"]
    print(f"  train  imgclf {r['imgclf']:7.1f} img/s | plain model-only {r['plain']:7.1f} img/s  ->  "
          f"{r['imgclf'] / r['plain']:.2f}x (rounds {low:.2f}-{high:.2f}); load {os.getloadavg()[0]:.1f}")
    p = r["parts"]
    share = {k: 100 * p[k] / p["wall"] for k in ("train", "val", "save", "setup", "report")}
    print(f"  imgclf's call, {p['wall']:.1f} s: training {share['train']:.0f}%, per-epoch validation "
          f"{share['val']:.0f}% ({p['val']:.1f} s), saves and stage set-up (resume state, best weights, loaders, "
          f"feature caches) {share['save']:.0f}% "
          f"({p['save']:.1f} s), set-up {share['setup']:.0f}% ({p['setup']:.1f} s), report after training "
          f"(curves, final predictions, baselines, plots, report.html) {share['report']:.0f}% "
          f"({p['report']:.1f} s)")
    print(f"  validation plus report: {share['val'] + share['report']:.0f}% of the call (target <= 10%)")
    if "predict" in r:
        ours, plain = r["predict"]
        print(f"  predict imgclf {ours:6.1f} img/s | plain fp32 ImageFolder loop {plain:6.1f}  ->  "
              f"{ours / plain:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="notebook_cnn,vgg16_head,efficientnet_b0",
                        help=f"comma-separated, from {', '.join(WORKLOADS)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians reported")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per imgclf training (>= 2)")
    parser.add_argument("--predict", action="store_true", help="also time prediction against a plain loop")
    parser.add_argument("--images", type=int, default=None,
                        help="images per workload (default: each workload's own; the issue's case is 1800)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads {args.threads}: use 1 or more")
        torch.set_num_threads(args.threads)
    names = args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}; use {', '.join(WORKLOADS)}")
    logging.getLogger("imgclf").setLevel(logging.WARNING)
    print(f"CPU cores: {os.cpu_count()}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{Compute.resolve('auto', 'auto', None)}, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("IMGCLF_CACHE_DIR", str(tmp / "cache"))
        for name in names:
            result = measure(name, tmp, args.rounds, max(2, args.epochs), args.predict, args.images)
            report(name, result, args.rounds, max(2, args.epochs))
            sys.stdout.flush()


if __name__ == "__main__":
    main()
