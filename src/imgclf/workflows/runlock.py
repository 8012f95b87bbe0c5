"""One writer per run or experiment folder: a command holds an exclusive ``flock`` on the folder itself while it
writes there, so a second command given the same ``--out`` (or ``--resume``) is refused in one line instead of
emptying a live run's files as if they were a killed run's.

The lock is on the directory (no lock file to leave behind or to copy with the run), taken without waiting, and
freed by the kernel when its process ends, killed or not: a failed run never blocks the next. A process that
claims a folder it already holds keeps its claim (a command that fails and is retried in one Python session,
a grid's trials, a default run's candidates); a finished run gives its claim back (``release``).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from imgclf.errors import ConfigError
from imgclf.logs import get_logger

log = get_logger("runs")
_held: dict[str, int] = {}  # the folder's real path -> the descriptor holding its lock


def claim(folder: Path, what: str = "run") -> None:
    """Hold ``folder`` (an existing directory) for this process; ConfigError when another process holds it."""
    key = os.path.realpath(folder)
    if key in _held:
        return
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{folder} is being written by another imgclf command; wait for it to end, or give this "
                          f"{what} another --out") from None
    except OSError as err:  # a file system without flock: the claim cannot be made there, said, and the run goes on
        os.close(fd)
        log.warning("warning: %s cannot be locked (%s): another imgclf command given the same folder would not be "
                    "refused while this one writes there", folder, err.strerror or err)
        return
    _held[key] = fd


def release(folder: Path) -> None:
    """Give back this process's claim on ``folder`` (nothing when it holds none)."""
    fd = _held.pop(os.path.realpath(folder), None)
    if fd is not None:
        os.close(fd)
