"""Scaling: memory and time as the dataset grows, and training speed as processes are added.

Memory and time (default): one training epoch at N = 1k, 2.5k, 5k, 10k images. Memory should be
O(batch): the decoded images live in a memory-mapped cache file, so private (anonymous) memory
stays flat while N grows 10x; the mapped file's pages show up as file-backed RSS, which the OS can
drop under pressure. Private memory is printed twice: the process's (RssAnon), and the part of it
that glibc's malloc has handed out and not yet been given back (mallinfo2: the working set). The
difference is freed memory malloc keeps in its heap, whose fragmentation grows with the number of
steps until it levels off, whatever N is; ``--equal-steps`` trains every size as many steps, so that
only N differs. Epoch time should grow linearly with N. Each size runs in a fresh process,
so peaks do not carry over.

Processes (``--processes 1,2``): the same training (global batch 64, so the same steps per
epoch) on 1 process, then through ``imgclf train --nproc P``; training images per second from
history.csv's ``train_seconds`` (the epoch's training alone, rank 0), median over the epochs after
the first, best of ``--rounds`` interleaved rounds; scaling efficiency = (speed at P / speed at 1) / P.
On the CPU the P processes share the same cores (``--nproc`` gives each cores / P threads); with
``--device cuda`` each process drives one GPU.

    python benchmarks/scaling.py [--sizes 1000,2500,5000,10000] [--px 64] [--repeats 3] [--equal-steps]
    python benchmarks/scaling.py --processes 1,2 [--images 2000] [--px 64] [--device cpu] [--rounds 2]
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_pngs(root: Path, n: int, px: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        label = i % 3
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 120, (px, px), dtype=np.uint8)
        pixels[:, label * px // 3:(label + 1) * px // 3] += 100
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def rss_kib() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            fields[key] = int(value.split()[0])
    return fields


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_in_use_kib() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2), in KiB; 0 without glibc >= 2.33."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError, TypeError):
        return 0
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) // 1024


def child(data: str, n: int, px: int, cache: str, epochs: int = 1) -> None:
    """Decode (cached), then train ``epochs`` epochs, sampling RSS every 50 ms; time the first."""
    import logging

    import imgclf

    logging.getLogger("imgclf").setLevel(logging.WARNING)
    os.environ["IMGCLF_CACHE_DIR"] = cache
    config = imgclf.build_config({
        "data": {"path": data, "image_size": px, "channels": 1, "val_fraction": 0.02, "test_fraction": 0.02},
        "model": {"name": "simple_cnn", "conv_filters": [16, 32, 64]}, "augment": {"preset": "light"},
        "train": {"epochs": epochs, "batch_size": 64, "early_stopping": False, "restore_best": False},
        "out": tempfile.mkdtemp()})
    peaks = {"RssAnon": 0, "RssFile": 0, "HeapInUse": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in {**rss_kib(), "HeapInUse": heap_in_use_kib()}.items():
                peaks[key] = max(peaks[key], value)
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    run = imgclf.train(config)
    done.set()
    history = (run.path / "history.csv").read_text().splitlines()
    seconds = float(history[1].split(",")[history[0].split(",").index("train_seconds")])
    print(json.dumps({"n": n, "epoch_seconds": seconds, **peaks}))


def train_speed(data: Path, processes: int, px: int, device: str, epochs: int, out: Path, cache: Path) -> float:
    """Training images per second of one ``imgclf train`` on ``processes`` processes."""
    command = [sys.executable, "-m", "imgclf", "train", str(data), "--image-size", str(px), "--channels", "1",
               "--model", "simple_cnn", "--conv-filters", "16,32,64", "--augment", "light", "--epochs", str(epochs),
               "--batch-size", "64", "--no-early-stopping", "--no-restore-best", "--no-report", "--bootstrap", "0",
               "--val-fraction", "0.05", "--test-fraction", "0.05", "--device", device, "--out", str(out)]
    if processes > 1:
        command += ["--nproc", str(processes)]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "IMGCLF_CACHE_DIR": str(cache)})
    train_images = sum(json.loads((out / "dataset.json").read_text())["counts"]["train"].values())
    with open(out / "history.csv", encoding="utf-8") as fh:
        seconds = [float(row["train_seconds"]) for row in csv.DictReader(fh)][1:]  # the first epoch warms up
    return train_images / statistics.median(seconds)


def process_scaling(counts: list[int], n: int, px: int, device: str, rounds: int, epochs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_pngs(tmp / "data", n, px)
        speeds: dict[int, list[float]] = {p: [] for p in counts}
        for r in range(rounds):  # interleaved, so a busy moment on a shared machine hits every count
            for p in counts:
                speeds[p].append(train_speed(data, p, px, device, epochs, tmp / f"run_{r}_{p}", tmp / "cache"))
    base = max(speeds[counts[0]]) / counts[0]
    print(f"{'processes':>9} {'images/s':>9} {'speed-up':>9} {'efficiency':>10}   ({n} images, {px} px, {device})")
    for p in counts:
        best = max(speeds[p])
        print(f"{p:>9} {best:>9.0f} {best / base:>9.2f} {best / base / p:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2500,5000,10000", help="dataset sizes")
    parser.add_argument("--px", type=int, default=64, help="image size")
    parser.add_argument("--processes", help="process counts to compare, e.g. 1,2 (CPU) or 1,2,4,8 (GPUs)")
    parser.add_argument("--images", type=int, default=2000, help="--processes: dataset size")
    parser.add_argument("--device", default="cpu", help="--processes: cpu, or cuda (one GPU per process)")
    parser.add_argument("--rounds", type=int, default=2, help="--processes: interleaved rounds, best kept")
    parser.add_argument("--epochs", type=int, default=3, help="--processes: epochs per training (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per size; medians reported (the peak "
                        "of one run varies by ~100 MiB with how glibc's arenas happen to fill)")
    parser.add_argument("--equal-steps", action="store_true", help="train each size as many steps as one epoch of "
                        "the largest (1k images: 10 epochs against 10k's one), so malloc's fragmentation, which "
                        "grows with the steps, is the same at every size and only the dataset's size differs")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3], int(args.child[4]))
        return
    if args.processes:
        process_scaling([int(p) for p in args.processes.split(",")], args.images, args.px, args.device,
                        args.rounds, max(2, args.epochs))
        return
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats}: use 1 or more")
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for n in sizes:
            data = make_pngs(tmp / f"data_{n}", n, args.px)
            epochs = max(1, round(max(sizes) / n)) if args.equal_steps else 1
            command = [sys.executable, __file__, "--child", str(data), str(n), str(args.px), str(tmp / "cache"),
                       str(epochs)]
            subprocess.run(command, check=True)  # first run: decode into the cache
            repeats = [json.loads(subprocess.run(command, check=True, capture_output=True, text=True)
                                  .stdout.strip().splitlines()[-1]) for _ in range(args.repeats)]
            medians = {k: statistics.median(r[k] for r in repeats)
                       for k in ("epoch_seconds", "RssAnon", "RssFile", "HeapInUse")}
            rows.append({"n": n, "spread": [r["RssAnon"] for r in repeats], **medians})
    base = rows[0]
    print(f"{'images':>8} {'epoch s':>8} {'s / 1k img':>10} {'peak anon MiB':>14} {'(runs)':>16} "
          f"{'peak file MiB':>14} {'heap in use MiB':>16}")
    for r in rows:
        spread = "-".join(f"{v / 1024:.0f}" for v in (min(r["spread"]), max(r["spread"])))
        print(f"{r['n']:>8} {r['epoch_seconds']:>8.1f} {1000 * r['epoch_seconds'] / r['n']:>10.2f} "
              f"{r['RssAnon'] / 1024:>14.0f} {spread:>16} {r['RssFile'] / 1024:>14.0f} "
              f"{r['HeapInUse'] / 1024:>16.0f}")
    last = rows[-1]
    time_ratio = last["epoch_seconds"] / base["epoch_seconds"]
    print(f"\n{last['n'] / base['n']:.0f}x the images: epoch time x{time_ratio:.2f}, "
          f"private memory x{last['RssAnon'] / base['RssAnon']:.2f}, "
          f"heap in use x{last['HeapInUse'] / max(1, base['HeapInUse']):.2f}")


if __name__ == "__main__":
    main()
