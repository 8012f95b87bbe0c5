"""The decode cache's folder as a whole: what it holds, and a size limit kept by removing the least
recently used entries (``IMGCLF_CACHE_MAX_GB``, default 20; ``inf`` never removes any).

Everything in the folder can be rebuilt from the images: removing an entry costs only the time to decode (or
embed) them again. An entry is one key's files: decoded images (``KEY.npy``, its sidecar ``KEY.json``) or a linear
probe's features and scores (``KEY.probe.npy``, ``.probe.json``); each use touches it (newest mtime). Rules:

- A name imgclf does not make, a folder or anything but a file or link, is never touched.
- A decode entry is never removed while a process uses it or builds it. A process that uses an entry
  holds a shared ``flock`` on its .npy (``hold_in_use``, taken before the entry is checked and kept
  while the process lives, for its latest ``MAX_HELD`` entries); a remover first takes the entry's
  build lock and then an exclusive lock on the .npy, both without waiting, and skips the entry when
  either is busy. The sidecar goes first, so a half-removed entry is never taken for a complete one.
- Lock files (empty) stay: another process may be waiting on one.
- A temporary file a killed writer left is an orphan once its decode lock is free, or, for features
  (written in seconds, without a lock), once it is an hour old.
"""

from __future__ import annotations

import fcntl
import math
import os
import re
import stat
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

from imgclf.errors import ConfigError, DataError
from imgclf.logs import get_logger, is_local_main_process

MAX_GB_ENV = "IMGCLF_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
ORPHAN_AGE_S = 3600.0
HOLD_WAIT_S = 5.0  # the longest a process waits to mark an entry in use
MAX_HELD = 64  # entries one process marks as in use (older marks are dropped; each costs a descriptor)
KINDS = {".npy": "decoded images", ".json": "decoded images", ".probe.npy": "probe features",
         ".probe.json": "probe features"}
_ENTRY_FILE = re.compile(r"^([0-9a-f]{24})(\.probe\.npy|\.probe\.json|\.npy|\.json)$")
_TEMP_FILE = re.compile(r"^\.([0-9a-f]{24})(\.probe\.npy|\.probe\.json|\.npy|\.json)\..+\.tmp$")
log = get_logger("cache")
_held: dict[Path, int] = {}  # .npy path -> descriptor holding the shared lock, oldest first


@dataclass
class Entry:
    """One key's files of one kind; ``last_used`` is their newest mtime, ``size`` their bytes on disk."""

    key: str
    kind: str
    files: list[Path] = field(default_factory=list)
    size: int = 0
    last_used: float = 0.0


@dataclass
class Contents:
    entries: list[Entry]
    temporary: list[Path]  # temporary files of writers, live or killed

    @property
    def size(self) -> int:
        return sum(e.size for e in self.entries)


def default_cache_dir() -> Path:
    """``IMGCLF_CACHE_DIR`` when set and not empty, else ``~/.cache/imgclf``."""
    return Path(os.environ.get("IMGCLF_CACHE_DIR") or Path.home() / ".cache" / "imgclf")


def limit_bytes() -> float:
    """The cache's size limit from ``IMGCLF_CACHE_MAX_GB`` (GB, 10**9 bytes); ``math.inf`` for no limit."""
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_GB * 1e9
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= 0:  # also refuses nan
        raise ConfigError(f"{MAX_GB_ENV}={raw!r} is not a size in GB; set a number such as {DEFAULT_MAX_GB:g} "
                          "(0 keeps only the entry in use, inf never removes one)")
    return value * 1e9


def scan(folder: Path) -> Contents:
    """The entries and temporary files in ``folder``, by name; nothing is followed or opened."""
    entries: dict[tuple[str, str], Entry] = {}
    temporary = []
    try:
        listing = list(os.scandir(folder))
    except FileNotFoundError:
        return Contents([], [])
    except OSError as err:
        raise DataError(f"cannot read the decode cache folder {folder} ({err.strerror}); fix its permissions, "
                        "or set IMGCLF_CACHE_DIR to another folder") from None
    for item in listing:
        try:
            info = item.stat(follow_symlinks=False)
        except OSError:
            continue
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
            continue
        if _TEMP_FILE.match(item.name):
            temporary.append(Path(item.path))
        elif match := _ENTRY_FILE.match(item.name):
            entry = entries.setdefault((match[1], KINDS[match[2]]), Entry(match[1], KINDS[match[2]]))
            entry.files.append(Path(item.path))
            entry.size += info.st_blocks * 512
            entry.last_used = max(entry.last_used, info.st_mtime)
    return Contents(sorted(entries.values(), key=lambda e: e.last_used), temporary)


def touch(path: Path) -> None:
    """Record a use of ``path``'s entry (its mtime); a read-only cache keeps its old order. Only the process
    that keeps the machine's caches writes to them (under torchrun, the other ranks only read)."""
    if not is_local_main_process():
        return
    with suppress(OSError, NotImplementedError):
        os.utime(path, follow_symlinks=False)


@dataclass
class Pruned:
    removed: list[Entry]
    orphans: int
    size: int  # what the folder's entries hold afterwards


def prune(folder: Path, max_bytes: float, keep: frozenset[str] = frozenset()) -> Pruned:
    """Remove orphaned temporary files, then the least recently used entries (none named in ``keep``, none a
    process is using or building) until the entries hold at most ``max_bytes``."""
    contents = scan(folder)
    orphans = sum(_remove_orphan(path) for path in contents.temporary)
    size, removed = contents.size, []
    for entry in contents.entries:
        if size <= max_bytes:
            break
        if entry.key not in keep and _remove_entry(folder, entry):
            removed.append(entry)
            size -= entry.size
    return Pruned(removed, orphans, size)


def keep_within_limit(folder: Path, keep: frozenset[str]) -> None:
    """After a run adds to the cache: prune it to ``IMGCLF_CACHE_MAX_GB``, saying what went in one line."""
    limit = limit_bytes()
    if not is_local_main_process():  # LOCAL_RANK 0 keeps the machine's cache; it pruned before the others read
        return
    result = prune(folder, limit, keep)  # with no limit, it still removes the orphaned temporary files
    if result.removed:
        log.info("decode cache %s: removed %d least recently used entr%s (%s) to stay within its %s limit "
                 "(%s to change it)", folder, len(result.removed), "y" if len(result.removed) == 1 else "ies",
                 size_text(sum(e.size for e in result.removed)), size_text(limit), MAX_GB_ENV)
    if result.size > limit:
        log.warning("warning: the decode cache %s holds %s, over its %s limit, because this run's entries (or "
                    "another process's) need it; raise %s or set IMGCLF_CACHE_DIR to a larger disk",
                    folder, size_text(result.size), size_text(limit), MAX_GB_ENV)


def size_text(size: float) -> str:
    """Bytes as a person reads them: 3.2 MB, 1.25 GB; ``no`` for no limit."""
    if math.isinf(size):
        return "no"
    if size >= 1e9:
        return f"{size / 1e9:.2f} GB"
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


@contextmanager
def open_lock(lock_file: Path):
    """``lock_file`` opened for flock, created if missing, without following a link or waiting on a FIFO;
    DataError when it cannot be opened or is not a regular file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fh = os.fdopen(os.open(lock_file, flags, 0o644), "a")
    except OSError as err:
        raise DataError(f"cannot open the decode cache's lock file {lock_file} ({err.strerror}); delete it "
                        "(the cache holds only what imgclf can rebuild), or set IMGCLF_CACHE_DIR") from None
    with fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise DataError(f"the decode cache's lock file {lock_file} is not a regular file; delete it, "
                            "or set IMGCLF_CACHE_DIR")
        yield fh


def hold_in_use(npy: Path) -> None:
    """Mark ``npy`` as used by this process (a shared lock, kept while it lives), so no ``prune`` removes it.
    Nothing to mark when it is missing or not a regular file (it is built, or rebuilt, then marked)."""
    try:
        fd = os.open(npy, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return
    if not _lock_shared(fd):
        os.close(fd)
        log.warning("warning: %s stayed locked by another process for %g s; using it without marking it in use, "
                    "so a prune elsewhere may remove it", npy, HOLD_WAIT_S)
        return
    old = _held.pop(npy, None)
    _held[npy] = fd
    if old is not None:
        os.close(old)
    while len(_held) > MAX_HELD:
        os.close(_held.pop(next(iter(_held))))


def holds_current(npy: Path) -> bool:
    """Whether this process's in-use mark is on the file now at ``npy`` (not on one a rebuild replaced)."""
    fd = _held.get(npy)
    try:
        marked, current = os.fstat(fd), os.lstat(npy)
    except (OSError, TypeError):  # no mark (fd None), or no file
        return False
    return (marked.st_dev, marked.st_ino) == (current.st_dev, current.st_ino)


def _lock_shared(fd: int) -> bool:
    """A shared lock on ``fd`` within ``HOLD_WAIT_S`` (a remover holds its exclusive lock for milliseconds;
    only a stuck or hostile process holds it longer)."""
    deadline = time.monotonic() + HOLD_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)


def _remove_entry(folder: Path, entry: Entry) -> bool:
    """Delete the entry's files (the sidecar first); False when it is being built or used, or its lock
    cannot be taken."""
    if entry.kind != KINDS[".npy"]:
        return _unlink_all(entry.files)
    npy, files = folder / f"{entry.key}.npy", sorted(entry.files, key=lambda p: p.suffix != ".json")
    return _while_unlocked(folder / f"{entry.key}.lock", lambda: _unused(npy, files))


def _unused(npy: Path, files: list[Path]) -> bool:
    """Delete ``files`` while holding ``npy`` exclusively, unless a process uses it (holds it shared)."""
    try:
        fd = os.open(npy, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:  # gone, or a link or something else planted: not a file anyone maps
        return _unlink_all(files)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return _unlink_all(files)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _remove_orphan(path: Path) -> bool:
    match = _TEMP_FILE.match(path.name)
    if KINDS[match[2]] != KINDS[".npy"]:
        try:
            old = time.time() - path.lstat().st_mtime > ORPHAN_AGE_S
        except OSError:
            return False
        return old and _unlink_all([path])
    return _while_unlocked(path.parent / f"{match[1]}.lock", lambda: _unlink_all([path]))


def _while_unlocked(lock_file: Path, remove) -> bool:
    """``remove()`` while holding ``lock_file`` (a key's build lock) exclusively; False, without waiting, when
    another process holds it (it is building that key) or it cannot be opened."""
    try:
        with open_lock(lock_file) as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return remove()
    except (DataError, BlockingIOError):
        return False


def _unlink_all(paths: list[Path]) -> bool:
    try:
        for path in paths:
            path.unlink(missing_ok=True)
    except OSError:
        return False
    return True
