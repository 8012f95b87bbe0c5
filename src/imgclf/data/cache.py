"""Decode-once cache: every image decoded and resized once into a memory-mapped uint8 array.

An entry is ``KEY.npy`` (``N x C x H x W`` uint8) plus its sidecar ``KEY.json`` (version, shape,
dtype and the images that failed to decode). ``KEY`` records what the entry was made from: the cache
version, size, channels, interpolation and, for every image, its path (as bytes, so names that are
not UTF-8 work), file size, mtime and a BLAKE2 hash of its first and last 64 KiB (the whole file when
smaller). An image edited with its size and mtime preserved (``touch -r``) therefore gets a new key and
is decoded again; the price is reading up to 128 KiB per image each run. Runs, folds and trials over
the same images share an entry. Epochs read from the memory map and never decode JPEG/PNG again.

Before use an entry is checked: the sidecar must parse and match the expected shape, and the .npy
header (magic, shape, dtype, C order) must match with the file exactly as long as the header says.
A damaged or truncated entry is rebuilt with a warning. The pixel bytes themselves are not
checksummed (that would mean reading the whole cache every run).

Building takes an exclusive ``fcntl.flock`` on ``KEY.lock``: another rank or process building the
same key waits, then re-checks and reuses the entry. Holding the lock, the builder removes temporary
files a killed builder left for this key (no live writer can own them). A finished entry is read
without the lock: the .npy is renamed into place before the sidecar, so a sidecar vouches for a
complete array.

Feature entries (``read_features``/``write_features``) hold a frozen backbone's features of cached
images, keyed by their caller (the decode entry, the rows, the model and its settings): a ``.npy`` of
``rows x D`` float32, opened once as a regular file (no link, no FIFO), its size bounded before its
header is parsed, its header and exact length checked, and its values finite and within the range
the backbone can output.

Each use touches its entry; ``cachedir`` keeps the folder within ``IMGCLF_CACHE_MAX_GB`` by removing the
least recently used entries.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf import atomic
from imgclf.data.cachedir import cache_folder, hold_in_use, holds_current, open_lock, touch
from imgclf.data.images import BadImage, load_image
from imgclf.errors import DataError
from imgclf.logs import get_logger

CACHE_VERSION = 3  # bumped whenever load_image decodes some file differently (3: 16-bit PGM, PNG tRNS, JPEG at nearest)
SAMPLE_BYTES = 64 * 1024
MAX_NPY_HEADER = 64 * 1024  # bytes an entry's .npy header may take
MAX_SIDECAR_BYTES_PER_IMAGE = 8 * 1024  # a failed image's path and reason, in a decode entry's sidecar
log = get_logger("cache")


class DamagedEntry(Exception):
    """A cache entry whose files do not hold what its key promises; it is rebuilt."""


@dataclass(frozen=True)
class DecodedImages:
    """``array[i]`` is image ``i`` as ``C x H x W`` uint8; ``bad`` lists the images that failed."""

    file: Path
    count: int
    bad: tuple[BadImage, ...]

    def open(self) -> np.ndarray:
        return np.load(self.file, mmap_mode="r")


def default_threads() -> int:
    return min(8, os.cpu_count() or 1)


def fingerprint(paths: list[Path], size: int, channels: int, interpolation: str = "bilinear") -> str:
    """The entry key: settings plus every image's path bytes, size, mtime and sampled content hash."""
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{size}|{channels}|{interpolation}".encode())
    with ThreadPoolExecutor(max_workers=default_threads()) as pool:
        for record in pool.map(source_record, paths):
            digest.update(b"\0" + record)
    return digest.hexdigest()[:24]


def source_record(path: Path) -> bytes:
    """What one image contributes to the key; never opens a file that is not regular (a FIFO would block)."""
    raw = os.fsencode(path)
    try:
        info = os.stat(path)
    except OSError as err:
        return raw + f"|missing|{err.errno}".encode()
    if not stat.S_ISREG(info.st_mode):
        return raw + f"|special|{stat.S_IFMT(info.st_mode)}".encode()
    return raw + f"|{info.st_size}|{info.st_mtime_ns}|".encode() + sample_hash(path, info.st_size)


def sample_hash(path: Path, size: int) -> bytes:
    """BLAKE2 of the first and last ``SAMPLE_BYTES`` (the whole file when it is at most twice that)."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as fh:
            digest.update(fh.read(SAMPLE_BYTES))
            if size > SAMPLE_BYTES:
                fh.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
                digest.update(fh.read(SAMPLE_BYTES))
    except OSError as err:
        return f"unreadable|{err.errno}".encode()
    return digest.digest()


def decode_all(paths: list[Path], size: int, channels: int, cache_dir: str | Path | None = None,
               threads: int | None = None, interpolation: str = "bilinear") -> DecodedImages:
    """Decode ``paths`` into the cache (or reuse a checked entry); failures are returned, not raised."""
    folder = cache_folder(cache_dir)
    key = fingerprint(paths, size, channels, interpolation)
    npy, sidecar = folder / f"{key}.npy", folder / f"{key}.json"
    shape = (len(paths), channels, size, size)
    hold_in_use(npy)  # before the check: a file marked in use is never pruned
    bad = _reusable(npy, sidecar, shape, warn=False)
    if bad is None or not holds_current(npy):  # missing, damaged, or not the file marked (replaced, or new)
        with _locked(folder / f"{key}.lock", npy):
            bad = _reusable(npy, sidecar, shape, warn=True)  # another process may have built it meanwhile
            if bad is None:
                bad = _build(npy, sidecar, paths, shape, interpolation, threads or default_threads())
            hold_in_use(npy)  # under the key's lock, which a pruner needs too, so nothing removes it first
    else:
        log.debug("decoded-image cache hit: %s", npy)
        touch(sidecar)
    return DecodedImages(npy, len(paths), bad)


def _reusable(npy: Path, sidecar: Path, shape: tuple[int, ...], warn: bool) -> tuple[BadImage, ...] | None:
    """The entry's failed images when it is complete and valid, else None (with a warning if damaged)."""
    try:
        return read_entry(npy, sidecar, shape)
    except DamagedEntry as err:
        if warn:
            log.warning("warning: decode cache entry %s is damaged (%s); rebuilding it", npy, err)
        return None


def read_entry(npy: Path, sidecar: Path, shape: tuple[int, ...]) -> tuple[BadImage, ...] | None:
    """None when the entry was never finished (no sidecar); DamagedEntry when its files are wrong. Each
    file is opened without following a link or blocking on a FIFO, and the sidecar's size is bounded by
    the image count (its list of failed images), so a planted file can neither hang nor bloat a run."""
    if not os.path.lexists(sidecar):
        return None
    limit = MAX_NPY_HEADER + MAX_SIDECAR_BYTES_PER_IMAGE * shape[0]
    try:
        with _open_regular(sidecar, limit) as fh:
            meta = json.loads(fh.read(limit).decode("utf-8"))
        if meta["version"] != CACHE_VERSION or meta["shape"] != list(shape) or meta["dtype"] != "uint8":
            raise DamagedEntry(f"{sidecar.name} describes {meta['shape']} {meta['dtype']}, expected {list(shape)}")
        if len(meta["bad"]) > shape[0]:  # at most every image failed: checked before one object is made
            raise DamagedEntry(f"{sidecar.name} lists {len(meta['bad'])} failed images of {shape[0]}")
        bad = tuple(BadImage(Path(p), str(reason)) for p, reason in meta["bad"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DamagedEntry(f"{sidecar.name} is unreadable: {err}") from None
    check_npy(npy, shape)
    return bad


def check_npy(npy: Path, shape: tuple[int, ...]) -> None:
    """The .npy header must say ``shape`` uint8 in C order and the file must hold exactly that many bytes."""
    try:
        with _open_regular(npy, MAX_NPY_HEADER + int(np.prod(shape))) as fh:
            _, (found, fortran_order, dtype) = _read_header(fh)
            header_end, length = fh.tell(), os.fstat(fh.fileno()).st_size
    except (OSError, ValueError) as err:  # numpy's messages run over several lines: the first says what
        raise DamagedEntry(f"{npy.name} has no valid .npy header: {str(err).splitlines()[0]}") from None
    if tuple(found) != tuple(shape) or dtype != np.uint8 or fortran_order:
        raise DamagedEntry(f"{npy.name} holds {found} {dtype}, expected {shape} uint8")
    expected = header_end + int(np.prod(shape))
    if length != expected:
        raise DamagedEntry(f"{npy.name} is {length} bytes, expected {expected} (truncated or overwritten)")


def _read_header(fh) -> tuple[tuple[int, int], tuple]:
    """(version, (shape, fortran_order, dtype)) of the .npy file ``fh``, read from its start."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return version, read(fh)


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


def _open_regular(path: Path, max_bytes: int):
    """``path`` opened for reading if it is a regular file of at most ``max_bytes`` (no link followed,
    no FIFO waited on), else DamagedEntry; OSError when it cannot be opened."""
    fh = os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)), "rb")
    info = os.fstat(fh.fileno())
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        fh.close()
        raise DamagedEntry(f"{path.name} is not a regular file of at most {max_bytes:,} bytes")
    return fh


def _read_float32(npy: Path, shape: tuple[int, int]) -> np.ndarray:
    data_bytes = int(np.prod(shape)) * 4
    with _open_regular(npy, data_bytes + MAX_NPY_HEADER) as fh:
        info = os.fstat(fh.fileno())
        version, (found, fortran_order, dtype) = _read_header(fh)
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


@contextmanager
def _locked(lock_file: Path, npy: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_file`` (``cachedir.open_lock``); say so when another process has it
    (it is building ``npy``)."""
    with open_lock(lock_file) as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that is decoding into %s", npy)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _build(npy: Path, sidecar: Path, paths: list[Path], shape: tuple[int, ...], interpolation: str,
           threads: int) -> tuple[BadImage, ...]:
    """Decode into a new entry; the caller holds the key's lock, so leftover temporary files are orphans."""
    for path in (npy, sidecar):  # what a rename cannot replace
        if path.is_dir() and not path.is_symlink():
            raise DataError(f"{path} is a folder where the decode cache keeps a file; delete it, or set "
                            "IMGCLF_CACHE_DIR to another folder")
    orphans = atomic.remove_temp_files(npy) + atomic.remove_temp_files(sidecar)
    if orphans:
        log.info("removed %d temporary file(s) a killed decode left in %s", len(orphans), npy.parent)
    sidecar.unlink(missing_ok=True)  # the old sidecar must not vouch for the .npy being replaced
    log.info("decoding %d images once into %s", len(paths), npy)
    with atomic.atomic_path(npy) as tmp:
        bad = _decode_into(tmp, paths, shape, interpolation, threads)
    atomic.write_json(sidecar, {"version": CACHE_VERSION, "shape": list(shape), "dtype": "uint8",
                                "bad": [[str(b.path), b.reason] for b in bad]})
    return tuple(bad)


def _decode_into(target: Path, paths: list[Path], shape: tuple[int, ...], interpolation: str,
                 threads: int) -> list[BadImage]:
    """Fill a new .npy memory map at ``target``; Pillow releases the GIL, so threads decode in parallel."""
    array = np.lib.format.open_memmap(target, mode="w+", dtype=np.uint8, shape=shape)
    _, channels, size, _ = shape

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
