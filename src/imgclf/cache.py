"""Decode-once cache: every image decoded and resized once into a memory-mapped uint8 array.

The file is keyed by a fingerprint of (paths, file sizes, mtimes, size, channels), so runs,
folds and trials over the same images share it, and an edited image invalidates it. Epochs
read from the memory map and never decode JPEG/PNG again; memory stays bounded because the
OS pages the map in and out.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import atomic
from .images import BadImage, load_image
from .logs import get_logger

CACHE_VERSION = 1
log = get_logger("cache")


@dataclass(frozen=True)
class DecodedImages:
    """``array[i]`` is image ``i`` as ``C x H x W`` uint8; ``bad`` lists the images that failed."""

    file: Path
    count: int
    bad: tuple[BadImage, ...]

    def open(self) -> np.ndarray:
        return np.load(self.file, mmap_mode="r")


def default_cache_dir() -> Path:
    return Path(os.environ.get("IMGCLF_CACHE_DIR", Path.home() / ".cache" / "imgclf"))


def fingerprint(paths: list[Path], size: int, channels: int, interpolation: str = "bilinear") -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{channels}|{interpolation}".encode())
    for path in paths:
        try:
            stat = path.stat()
            digest.update(f"|{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        except OSError:
            digest.update(f"|{path}|missing".encode())
    return digest.hexdigest()[:24]


def decode_all(paths: list[Path], size: int, channels: int, cache_dir: str | Path | None = None,
               threads: int | None = None, interpolation: str = "bilinear") -> DecodedImages:
    """Decode ``paths`` into the cache (or reuse it); failures are returned, not raised."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = fingerprint(paths, size, channels, interpolation)
    file, bad_file = folder / f"{key}.npy", folder / f"{key}.bad.json"
    if file.exists() and bad_file.exists():
        bad = tuple(BadImage(Path(p), r) for p, r in json.loads(bad_file.read_text(encoding="utf-8")))
        log.debug("decoded-image cache hit: %s", file)
        return DecodedImages(file, len(paths), bad)
    log.info("decoding %d images once into %s", len(paths), file)
    with atomic.atomic_path(file) as tmp:
        bad = _decode_into(tmp, paths, size, channels, interpolation, threads or min(8, os.cpu_count() or 1))
    atomic.write_json(bad_file, [[str(b.path), b.reason] for b in bad])
    return DecodedImages(file, len(paths), tuple(bad))


def _decode_into(target: Path, paths: list[Path], size: int, channels: int, interpolation: str,
                 threads: int) -> list[BadImage]:
    """Fill a new .npy memory map at ``target``; Pillow releases the GIL, so threads decode in parallel."""
    array = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=(len(paths), channels, size, size))

    def decode(i: int) -> BadImage | None:
        try:
            array[i] = load_image(paths[i], size, channels, interpolation).transpose(2, 0, 1)
        except BadImage as err:
            return err
        return None

    with ThreadPoolExecutor(max_workers=threads) as pool:
        bad = [err for err in pool.map(decode, range(len(paths))) if err is not None]
    array.flush()
    return bad
