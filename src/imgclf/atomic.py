"""Atomic file writes: write a temporary file next to the target, fsync, then rename.

A kill at any moment leaves either the old file or the new one, never half of one (plus, after a
SIGKILL, an orphaned ``.NAME.XXXX.tmp``: ``remove_temp_files`` clears those for a target whose writer
is known to be gone, e.g. under the cache's lock).

File names are user data and may not be valid UTF-8 (Linux allows any bytes; Python shows them as lone
surrogates). Text and CSV files are written as UTF-8 with ``surrogateescape``, so such a name keeps its
original bytes and reads back (``errors="surrogateescape"``) as the same path. JSON stays valid UTF-8:
a lone surrogate is written as its ``\\udcXX`` escape, which ``json.loads`` turns back into the same str.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from imgclf.errors import RunDirError
from imgclf.safeio import cut_name

TEXT_ERRORS = "surrogateescape"  # file names that are not UTF-8 keep their bytes; readers use the same
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:  # a short prefix: a 255-byte target name leaves no room for more around it
        fd, tmp = tempfile.mkstemp(prefix=f".{cut_name(target.name, 64)}.", suffix=".tmp", dir=target.parent)
    except OSError as err:
        raise _naming(err, target, None) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, _file_mode(target))  # mkstemp makes 0600; the result should not be private
        os.replace(tmp_path, target)
    except OSError as err:
        raise _naming(err, target, tmp) from None
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """An OSError that names no file (ENOSPC from a write) names ``path``, so its one error line can."""
    try:
        yield
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


def _naming(err: OSError, target: Path, tmp: str | None) -> OSError:
    """``err`` naming ``target`` where it named no file or the temporary one (a full disk's ENOSPC from a write,
    a refused mkstemp): the user's error line names the file they know, not ``.name.x1y2.tmp``."""
    temporary = os.path.join(target.parent, f".{cut_name(target.name, 64)}.")  # mkstemp's names start so
    if err.filename is None or str(err.filename) == tmp or str(err.filename).startswith(temporary):
        err.filename = str(target)
    return err


def inner_folder(root: str | os.PathLike, name: str) -> Path:
    """``root/name`` as a real folder inside ``root``, made if missing: a symbolic link there (a run's plots/
    pointing at /etc), or a file, would send what imgclf writes elsewhere, so it is refused."""
    folder = own_folder(Path(root) / name)
    folder.mkdir(exist_ok=True)
    return folder


def own_folder(folder: Path) -> Path:
    """``folder`` unchanged when it is missing or a real folder; a symbolic link or a file there is refused."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise RunDirError(f"{folder} is a symbolic link or a file, not a folder of its own; imgclf writes only "
                          "inside the run directory: remove it and run the command again")
    return folder


def _file_mode(target: Path) -> int:
    """An existing file keeps its permissions; a new one gets what open() would give (0666 minus umask)."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mask = os.umask(0o022)
        os.umask(mask)
        return 0o666 & ~mask


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=TEXT_ERRORS)


def write_json(target: str | os.PathLike, data: Any) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, default=_json_default)
    write_text(target, _LONE_SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n")


def write_with(target: str | os.PathLike, writer: Callable[[IO[str]], None]) -> None:
    """Write a text file through ``writer(fh)`` (e.g. a csv.writer), atomically."""
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", errors=TEXT_ERRORS, newline="") as fh:
        writer(fh)


def write_rows(target: str | os.PathLike, rows: list[dict]) -> None:
    """A CSV with one column per key seen in ``rows`` (first-seen order), atomically."""
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(fh: IO[str]) -> None:
        out = csv.DictWriter(fh, fieldnames=columns)
        out.writeheader()
        out.writerows(rows)

    write_with(target, write)


def remove_temp_files(target: str | os.PathLike) -> list[Path]:
    """Delete ``.NAME.*.tmp`` files that ``atomic_path`` left for ``target``; returns what it removed.

    Only call it while nothing else can be writing ``target`` (e.g. holding its lock): a live
    writer's temporary file matches the same pattern.
    """
    target = Path(target)
    removed = []
    for tmp in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _json_default(obj: Any) -> Any:
    # numpy scalars and arrays show up in metrics; keep JSON free of custom types.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
