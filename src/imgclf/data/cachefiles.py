"""The cache folder and its files as untrusted input: the folder is said when others can write it; files
are opened once as regular files (no link followed, no FIFO waited on), sizes bounded before anything is
parsed, .npy headers checked. The frozen-backbone feature entries (``read_features``/``write_features``)
that the probe baseline keeps next to the decode cache are a ``.npy`` of ``rows x D`` float32, its header
and exact length checked, and its values finite and within the range the backbone can output."""

from __future__ import annotations

import hashlib
import os
import stat
from contextlib import suppress
from pathlib import Path

import numpy as np

from imgclf import atomic
from imgclf.data.cachedir import default_cache_dir, touch
from imgclf.errors import DataError
from imgclf.logs import get_logger

MAX_NPY_HEADER = 64 * 1024  # bytes an entry's .npy header may take
HASH_CHUNK = 8 << 20  # bytes read at a time when an entry's pixels are hashed (memory stays flat)
log = get_logger("cache")


def cache_folder(cache_dir: str | Path | None) -> Path:
    """The cache folder to decode into (``cache_dir``, else the default), created if missing."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = "it is not a folder" if isinstance(err, FileExistsError) else err.strerror
        raise DataError(f"cannot use {folder} as the decode cache folder ({reason}); set IMGCLF_CACHE_DIR "
                        "(or data.cache_dir) to a folder you can write") from None
    _warn_if_shared(folder)
    return folder


def _warn_if_shared(folder: Path) -> None:
    """Say when others can write the cache folder: whoever can write it can change what a run trains on (an
    entry's pixel hash is in its own sidecar), so it is trusted as the user's own files are."""
    with suppress(OSError):
        info = os.stat(folder)
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or info.st_uid != os.geteuid():
            log.warning("warning: the decode cache folder %s is writable by other users or owned by another: "
                        "anyone who can write it can change the images a run reads; set IMGCLF_CACHE_DIR (or "
                        "--cache-dir) to a folder only you can write", folder)


class DamagedEntry(Exception):
    """A cache entry whose files do not hold what its key promises; it is rebuilt."""


def open_regular(path: Path, max_bytes: int):
    """``path`` opened for reading if it is a regular file of at most ``max_bytes`` (no link followed,
    no FIFO waited on), else DamagedEntry; OSError when it cannot be opened."""
    fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)), "rb")
    info = os.fstat(fh.fileno())
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        fh.close()
        raise DamagedEntry(f"{path.name} is not a regular file of at most {max_bytes:,} bytes")
    return fh


def read_npy_header(fh) -> tuple[tuple[int, int], tuple]:
    """(version, (shape, fortran_order, dtype)) of the .npy file ``fh``, read from its start."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return version, read(fh)


def data_sha256(fh, start: int) -> str:
    """SHA-256 of the open file ``fh`` from byte ``start`` to its end, read in HASH_CHUNK pieces."""
    digest = hashlib.sha256()
    fh.seek(start)
    while chunk := fh.read(HASH_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def read_features(npy: Path, shape: tuple[int, int], value_range: tuple[float, float]) -> np.ndarray | None:
    """The float32 features of ``shape`` that ``write_features`` saved, each within ``value_range``; None
    when absent, or damaged (a one-line warning). The file is opened once, without following a link or
    blocking on a FIFO, and read only after its size has matched its header exactly."""
    if not os.path.lexists(npy):
        return None
    try:
        features = _read_float32(npy, shape)
    except (OSError, ValueError, DamagedEntry) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        log.warning("warning: feature cache entry %s is damaged (%s); computing the features again", npy, reason)
        return None
    low, high = value_range
    if not (np.isfinite(features).all() and features.min(initial=low) >= low and features.max(initial=high) <= high):
        log.warning("warning: feature cache entry %s holds values outside [%g, %g]; computing the features again",
                    npy, low, high)
        return None
    touch(npy)
    return features


def _read_float32(npy: Path, shape: tuple[int, int]) -> np.ndarray:
    data_bytes = int(np.prod(shape)) * 4
    with open_regular(npy, data_bytes + MAX_NPY_HEADER) as fh:
        info = os.fstat(fh.fileno())
        version, (found, fortran_order, dtype) = read_npy_header(fh)
        if version not in ((1, 0), (2, 0)):
            raise DamagedEntry(f"{npy.name} has .npy version {version}")
        if tuple(found) != tuple(shape) or dtype != np.dtype("<f4") or fortran_order:
            raise DamagedEntry(f"{npy.name} holds {found} {dtype}, expected {shape} float32")
        if info.st_size != fh.tell() + data_bytes:
            raise DamagedEntry(f"{npy.name} is {info.st_size} bytes, expected {fh.tell() + data_bytes}")
        return np.frombuffer(fh.read(data_bytes), dtype="<f4").reshape(shape)


def write_features(npy: Path, features: np.ndarray) -> None:
    """Save ``features`` as float32, atomically; a folder that cannot be written costs a warning, not the run."""
    try:
        with atomic.atomic_path(npy) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(features, dtype=np.float32), allow_pickle=False)
    except OSError as err:
        log.warning("warning: could not keep features in the cache (%s); they will be computed again next time", err)
