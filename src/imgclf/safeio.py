"""Read a file that came from a stranger: regular files only, opened without blocking, never past a cap.

``stat`` says 0 bytes for a FIFO and for ``/dev/zero``, and reading either blocks or never ends;
so the file is opened with ``O_NONBLOCK``, checked with ``fstat`` on the open descriptor (no race
with a swapped path), and read up to one byte past the cap.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

from imgclf.errors import ImgclfError


def read_capped(path: str | os.PathLike, limit: int, error: type[ImgclfError], fix: str,
                why: str = "far more than imgclf writes") -> bytes:
    """The bytes of ``path``; anything but a regular file of at most ``limit`` bytes is ``error``
    (``why``: what the size means, for the message)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise error(f"cannot read {path} ({err.strerror}); {fix}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # before fdopen, which refuses a folder with its own error
        os.close(fd)
        raise error(f"{path} is not a regular file (a FIFO, device or folder); {fix}")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise error(f"{path} is larger than {limit:,} bytes, {why}; {fix}")
    return data


def require_regular(path: str | os.PathLike, error: type[ImgclfError], fix: str) -> None:
    """A path that a library will open itself (zip, safetensors) must be a regular file first."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as err:
        raise error(f"cannot read {path} ({err.strerror}); {fix}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{path} is not a regular file (a FIFO, device or folder); {fix}")


def printable(text: str) -> str:
    """A file name for a terminal or a figure: bytes that are not UTF-8 appear as ``\\xNN`` and control
    characters (a newline in a name) as their escapes, never raw."""
    text = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cut_name(name: str, max_bytes: int) -> str:
    """``name`` cut to at most ``max_bytes`` bytes as the file system counts them (a file name holds 255), at a
    whole character: 100 Chinese characters are 300 bytes."""
    return os.fsencode(name)[:max_bytes].decode("utf-8", "ignore")


def special_file_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is not a regular file (after symlinks), else None.

    Checked with ``os.stat`` before anything opens the file: opening a FIFO blocks and ``/dev/zero``
    never ends. A path that cannot be stat'ed returns None, so the open that follows names the error.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode):
        return None
    kinds = [(stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")]
    return next((name for check, name in kinds if check(mode)), "special file")


MAX_CLASS_NAME = 255  # characters: a folder name's limit (in bytes) on common file systems


def class_name_problem(name: str) -> str | None:
    """What is wrong with ``name`` as a class name (empty, longer than MAX_CLASS_NAME, or holding a control
    character such as a line break, which would forge lines in every summary that names it); None if nothing."""
    if not name:
        return "is empty"
    if len(name) > MAX_CLASS_NAME:
        return f"is {len(name):,} characters long, more than the {MAX_CLASS_NAME} a class name may have"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "holds a control character (a line break, a tab, ...)"
    return None
