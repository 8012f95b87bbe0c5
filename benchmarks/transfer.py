"""Head-only training with and without feature caching, timed in one run.

Without caching is the Keras way: the frozen backbone runs on every image in every epoch. With
caching, imgclf runs it once and trains the head on the stored features. Target: >= 10x faster.

    python benchmarks/transfer.py [--images 150] [--size 160] [--epochs 20] [--model tf_efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import imgclf

from imagefactory import make_class_folders


def timed_run(data: Path, out: Path, args, cached: bool) -> tuple[float, float]:
    config = imgclf.build_config({
        "data": {"path": str(data), "image_size": args.size},
        "model": {"name": args.model},
        "augment": {"preset": "none"},
        "train": {"feature_cache": cached, "batch_size": 32},
        "stages": [{"name": "head", "freeze": "backbone", "epochs": args.epochs, "early_stopping": False}],
        "out": str(out),
    })
    start = time.perf_counter()
    run = imgclf.train(config)
    return time.perf_counter() - start, run.metrics["val"]["log_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=150, help="images per class (3 classes)")
    parser.add_argument("--size", type=int, default=160, help="input size in px")
    parser.add_argument("--epochs", type=int, default=20, help="head-only epochs")
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm backbone")
    args = parser.parse_args()
    logging.getLogger("imgclf").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("IMGCLF_CACHE_DIR", str(tmp / "cache"))
        data = make_class_folders(tmp / "data", args.images, sizes=(args.size,))
        timed_run(data, tmp / "warmup", argparse.Namespace(**{**vars(args), "epochs": 1}), True)  # decode once
        plain, plain_loss = timed_run(data, tmp / "plain", args, cached=False)
        cached, cached_loss = timed_run(data, tmp / "cached", args, cached=True)
    print(f"{args.model} at {args.size}px, {3 * args.images} images, {args.epochs} head-only epochs, "
          f"{os.cpu_count()} CPU cores")
    print(f"{'backbone every epoch (Keras way)':<36} {plain:8.1f} s   val loss {plain_loss:.4f}")
    print(f"{'cached features (imgclf)':<36} {cached:8.1f} s   val loss {cached_loss:.4f}")
    print(f"speed-up: {plain / cached:.1f}x (target >= 10x)")


if __name__ == "__main__":
    main()
