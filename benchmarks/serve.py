"""Serving latency and throughput: the onnx engine against the torch engine, side by side, through HTTP.

For each model, one run is trained briefly on synthetic images (the numbers do not depend on the
weights) and exported. Each engine is then served by a real uvicorn on a free port of 127.0.0.1,
and a client posts one 640x480 JPEG per request to /v1/predict:
- single: one client, requests one after another;
- 8 clients: eight concurrent clients (one asyncio httpx client), each sending one after another.
It prints p50/p95 latency (ms) and images per second for each. Engines: ``onnx`` (the export) and
``torch`` (the run's own model, eager). The run trains with ``--precision auto`` (bf16 autocast on a
CPU that has it); both engines predict in fp32, as every saved prediction of a run does. The server
is ``imgclf serve`` in its own process; the client shares the machine's cores with it.

    python benchmarks/serve.py [--models simple_cnn,efficientnet_b0] [--requests 240] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

import imgclf
from imgclf.runtime import resolve_precision
from imgclf.serving.export import export_run

SETTINGS = {"simple_cnn": {"size": 128, "model": {"conv_filters": [32, 64, 128], "dense_layers": [256]}},
            "efficientnet_b0": {"size": 224, "model": {}}}
CLIENTS = 8


def make_data(root: Path, per_class: int = 12) -> Path:
    rng = np.random.default_rng(0)
    for label in range(3):
        folder = root / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (160, 160, 3), dtype=np.uint8)
            pixels[:, label * 53:(label + 1) * 53] //= 3
            Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def upload_jpeg() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 255, (480, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def train(data: Path, out: Path, name: str, precision: str):
    s = SETTINGS[name]
    return imgclf.train(imgclf.build_config({
        "data": {"path": str(data), "image_size": s["size"], "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": name, **s["model"]}, "train": {"epochs": 1, "batch_size": 16, "precision": precision},
        "evaluate": {"report": False, "bootstrap": 10}, "out": str(out)}))


class LiveServer:
    """``imgclf serve RUN --port 0`` in its own process, as a user starts it; ``with`` stops it by SIGTERM."""

    def __init__(self, run, engine: str):
        self.process = subprocess.Popen([sys.executable, "-m", "imgclf", "serve", str(run.path), "--engine", engine,
                                         "--port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.process.stderr], daemon=True).start()

    def __enter__(self) -> str:
        deadline, url, seen = time.monotonic() + 300, None, []
        while url is None and time.monotonic() < deadline and self.process.poll() is None:
            with contextlib.suppress(queue.Empty):
                seen.append(self.lines.get(timeout=0.5))
                url = (match := re.search(r"on (http://127\.0\.0\.1:\d+)", seen[-1])) and match.group(1)
        with httpx.Client(base_url=url or "http://127.0.0.1:9") as http:
            while url and time.monotonic() < deadline and self.process.poll() is None:
                with contextlib.suppress(httpx.TransportError):
                    if http.get("/readyz").status_code == 200:
                        return url
                time.sleep(0.1)
        raise RuntimeError(f"the server did not become ready: {''.join(seen)[-2000:]}")

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


async def client_loop(http: httpx.AsyncClient, image: bytes, count: int, latencies: list[float]) -> None:
    for _ in range(count):
        start = time.perf_counter()
        response = await http.post("/v1/predict", files={"file": ("x.jpg", image, "image/jpeg")})
        latencies.append(time.perf_counter() - start)
        response.raise_for_status()


class Tally:
    """Latencies and wall time of one setting, summed over the rounds."""

    def __init__(self):
        self.latencies: list[float] = []
        self.wall = 0.0

    def row(self) -> str:
        ms = np.array(self.latencies) * 1000
        return (f"{np.percentile(ms, 50):>9.1f} / {np.percentile(ms, 95):<8.1f} "
                f"{len(ms) / self.wall:>7.1f}")


async def measure(url: str, image: bytes, clients: int, requests: int, tally: Tally, warm_up: bool) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        if warm_up:
            await asyncio.gather(*(client_loop(http, image, 3, []) for _ in range(clients)))
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(http, image, requests // clients, tally.latencies) for _ in range(clients)))
        tally.wall += time.perf_counter() - start


def bench_model(name: str, data: Path, out: Path, image: bytes, requests: int, rounds: int) -> list[tuple]:
    """Every engine setting of one model, all servers up at once and measured in turns, round after round,
    so load from elsewhere on the machine falls on every setting alike."""
    run = train(data, out / name, name, "auto")
    export_run(run)
    trained = resolve_precision(run.config.train.precision, run.compute.device)
    settings = [(f"{engine} (fp32; trained {trained})", run, engine) for engine in ("onnx", "torch")]
    tallies = [(Tally(), Tally()) for _ in settings]
    with contextlib.ExitStack() as stack:
        urls = []
        for _, target, engine in settings:  # one at a time: start-up is CPU-bound
            server = LiveServer(target, engine)
            stack.push(server.__exit__)  # stopped even if a later one fails to start
            urls.append(server.__enter__())
        for round_ in range(rounds):
            for url, (single, many) in zip(urls, tallies, strict=True):
                asyncio.run(measure(url, image, 1, requests // (2 * rounds), single, round_ == 0))
                asyncio.run(measure(url, image, CLIENTS, requests // rounds, many, round_ == 0))
    return [(name, label, single, many) for (label, *_), (single, many) in zip(settings, tallies, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="simple_cnn,efficientnet_b0")
    parser.add_argument("--requests", type=int, default=240, help="timed requests per setting with 8 clients "
                        "(half as many for one client)")
    parser.add_argument("--rounds", type=int, default=3, help="turns taken through the settings")
    args = parser.parse_args()
    image = upload_jpeg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp) / "data")
        for name in args.models.split(","):
            rows += bench_model(name, data, Path(tmp), image, args.requests, args.rounds)
    print(f"\n{'model':<16} {'engine':<22} {'1 client p50/p95 ms':>20} {'img/s':>7}   "
          f"{f'{CLIENTS} clients p50/p95 ms':>20} {'img/s':>7}")
    for name, label, single, many in rows:
        print(f"{name:<16} {label:<22} {single.row()}   {many.row()}")


if __name__ == "__main__":
    sys.exit(main())
