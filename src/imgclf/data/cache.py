"""Decode-once cache: every image decoded and resized once into a memory-mapped uint8 array.

An entry is ``KEY.npy`` (``N x C x H x W`` uint8) plus its sidecar ``KEY.json`` (version, shape,
dtype and the images that failed to decode). ``KEY`` records what the entry was made from: the cache
version, size, channels, interpolation and, for every image, its path (as bytes, so names that are
not UTF-8 work), file size, mtime and a BLAKE2 hash of its first and last 64 KiB (the whole file when
smaller). An image edited with its size and mtime preserved (``touch -r``) therefore gets a new key and
is decoded again, unless the edit is only inside the middle of a file over 128 KiB (an uncompressed BMP,
TIFF or DICOM of the same dimensions): that one is not seen, the price of reading at most 128 KiB per
image each run rather than every byte. Runs, folds and trials over
the same images share an entry. Epochs read from the memory map and never decode JPEG/PNG again.

Before use an entry is checked: the sidecar must parse and match the expected shape, list as failed
only images of the entry, and the .npy header (magic, shape, dtype, C order) must match with the file
exactly as long as the header says and its pixels hash (SHA-256) as the sidecar recorded. A damaged,
truncated or overwritten entry is rebuilt with a warning. The hash reads the whole entry each run, at
about 1.3 GB/s from the page cache here (0.1 s for 1,800 images at 150 px), in 8 MB pieces (memory
stays flat); the epochs read the same pages right after. It catches an overwritten or corrupted file,
not a colleague who also rewrites the sidecar: ``cachefiles`` warns when others can write the folder.

Building takes an exclusive ``fcntl.flock`` on ``KEY.lock``: another rank or process building the
same key waits, then re-checks and reuses the entry. Holding the lock, the builder removes temporary
files a killed builder left for this key (no live writer can own them). A finished entry is read
without the lock: the .npy is renamed into place before the sidecar, so a sidecar vouches for a
complete array.

Feature entries (``cachefiles.read_features``/``write_features``) hold a frozen backbone's features of
cached images, keyed by their caller (the decode entry, the rows, the model and its settings).

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
from imgclf.data.cachedir import hold_in_use, holds_current, open_lock, touch
from imgclf.data.cachefiles import (
    MAX_NPY_HEADER,
    DamagedEntry,
    cache_folder,
    data_sha256,
    open_regular,
    read_npy_header,
)
from imgclf.data.images import BadImage, load_image
from imgclf.errors import DataError
from imgclf.logs import get_logger

CACHE_VERSION = 4  # bumped when load_image decodes some file differently or the entry changes (4: pixel hash)
SAMPLE_BYTES = 64 * 1024
MAX_SIDECAR_BYTES_PER_IMAGE = 8 * 1024  # a failed image's path and reason, in a decode entry's sidecar
MAX_REASON = 1000  # characters of a failed image's reason the sidecar keeps
log = get_logger("cache")


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
    entry = Entry(folder / f"{key}.npy", folder / f"{key}.json", (len(paths), channels, size, size),
                  frozenset(map(str, paths)))
    hold_in_use(entry.npy)  # before the check: a file marked in use is never pruned
    bad = _reusable(entry, warn=False)
    if bad is None or not holds_current(entry.npy):  # missing, damaged, or not the file marked (replaced, or new)
        with _locked(folder / f"{key}.lock", entry.npy):
            bad = _reusable(entry, warn=True)  # another process may have built it meanwhile
            if bad is None:
                bad = _build(entry, paths, interpolation, threads or default_threads())
            hold_in_use(entry.npy)  # under the key's lock, which a pruner needs too, so nothing removes it first
    else:
        log.debug("decoded-image cache hit: %s", entry.npy)
        touch(entry.sidecar)
    return DecodedImages(entry.npy, len(paths), bad)


@dataclass(frozen=True)
class Entry:
    """A decode entry's files, the array shape its key promises, and the images it was made from."""

    npy: Path
    sidecar: Path
    shape: tuple[int, ...]
    sources: frozenset[str]


def _reusable(entry: Entry, warn: bool) -> tuple[BadImage, ...] | None:
    """The entry's failed images when it is complete and valid, else None (with a warning if damaged)."""
    try:
        return read_entry(entry)
    except DamagedEntry as err:
        if warn:
            log.warning("warning: decode cache entry %s is damaged (%s); rebuilding it", entry.npy, err)
        return None


def read_entry(entry: Entry) -> tuple[BadImage, ...] | None:
    """None when the entry was never finished (no sidecar); DamagedEntry when its files are wrong. Each
    file is opened without following a link or blocking on a FIFO, the sidecar's size is bounded by the
    image count (its list of failed images), each failed image must be one of the entry's and its reason
    short, and the pixels must hash as the sidecar says: a planted or overwritten file can neither hang nor
    bloat a run, drop a good image, nor change what it trains on by accident."""
    if not os.path.lexists(entry.sidecar):
        return None
    limit = MAX_NPY_HEADER + MAX_SIDECAR_BYTES_PER_IMAGE * entry.shape[0]
    try:
        with open_regular(entry.sidecar, limit) as fh:
            meta = json.loads(fh.read(limit).decode("utf-8"))
        bad = _failed_images(meta, entry)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise DamagedEntry(f"{entry.sidecar.name} is unreadable: {reason}") from None
    if check_npy(entry.npy, entry.shape) != meta["sha256"]:
        raise DamagedEntry(f"{entry.npy.name}'s pixels do not match the hash its sidecar recorded (overwritten)")
    return bad


def _failed_images(meta: dict, entry: Entry) -> tuple[BadImage, ...]:
    """The sidecar's failed images, each one of the entry's own with a reason of at most MAX_REASON characters."""
    if meta["version"] != CACHE_VERSION or meta["shape"] != list(entry.shape) or meta["dtype"] != "uint8":
        raise DamagedEntry(f"{entry.sidecar.name} describes {meta['shape']} {meta['dtype']}, expected "
                           f"{list(entry.shape)}")
    if not isinstance(meta["sha256"], str) or len(meta["bad"]) > entry.shape[0]:  # checked before objects are made
        raise DamagedEntry(f"{entry.sidecar.name} has no pixel hash or lists more failed images than it holds")
    bad = tuple(BadImage(Path(p), reason) for p, reason in meta["bad"])
    if any(str(b.path) not in entry.sources or not isinstance(b.reason, str) or len(b.reason) > MAX_REASON
           for b in bad):
        raise DamagedEntry(f"{entry.sidecar.name} lists a failed image that is not one of the entry's, or its "
                           "reason is not a short text")
    return bad


def check_npy(npy: Path, shape: tuple[int, ...]) -> str:
    """The .npy header must say ``shape`` uint8 in C order and the file must hold exactly that many bytes;
    the SHA-256 of those bytes (read in pieces: memory stays flat)."""
    try:
        with open_regular(npy, MAX_NPY_HEADER + int(np.prod(shape))) as fh:
            _, (found, fortran_order, dtype) = read_npy_header(fh)
            header_end, length = fh.tell(), os.fstat(fh.fileno()).st_size
            if tuple(found) != tuple(shape) or dtype != np.uint8 or fortran_order:
                raise DamagedEntry(f"{npy.name} holds {found} {dtype}, expected {shape} uint8")
            expected = header_end + int(np.prod(shape))
            if length != expected:
                raise DamagedEntry(f"{npy.name} is {length} bytes, expected {expected} (truncated or overwritten)")
            return data_sha256(fh, header_end)
    except (OSError, ValueError) as err:  # numpy's messages run over several lines: the first says what
        raise DamagedEntry(f"{npy.name} has no valid .npy header: {str(err).splitlines()[0]}") from None


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


def _build(entry: Entry, paths: list[Path], interpolation: str, threads: int) -> tuple[BadImage, ...]:
    """Decode into a new entry; the caller holds the key's lock, so leftover temporary files are orphans."""
    npy, sidecar = entry.npy, entry.sidecar
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
        bad = _decode_into(tmp, paths, entry.shape, interpolation, threads)
        digest = check_npy(tmp, entry.shape)
    atomic.write_json(sidecar, {"version": CACHE_VERSION, "shape": list(entry.shape), "dtype": "uint8",
                                "sha256": digest, "bad": [[str(b.path), b.reason[:MAX_REASON]] for b in bad]})
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
