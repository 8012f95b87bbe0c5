"""Rank-aware logging. No torch import, so the CLI answers --help and config errors fast.

Rank comes from the environment torchrun or Ray sets (RANK), never from module state, so the same
code logs once per job whether it runs as one process or many.
"""

from __future__ import annotations

import logging
import os

LOGGER_NAME = "imgclf"


def get_rank() -> int:
    """Global rank under torchrun/DDP (RANK), else 0."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Only the main process writes checkpoints, reports and progress bars."""
    return get_rank() == 0


def is_local_main_process() -> bool:
    """The process that keeps its machine's caches: LOCAL_RANK 0 under torchrun, else the only one."""
    return os.environ.get("LOCAL_RANK", "0").strip() in ("", "0")


class _MainProcessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process() or record.levelno >= logging.WARNING


class _SaidOnce(logging.Filter):
    """A warning whose words were already printed is not printed again: a cv's folds, a grid's trials and the
    default model's candidates each scan the same data and meet the same settings, and one line says it."""

    def __init__(self) -> None:
        super().__init__()
        self.said: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        text = record.getMessage()
        if text in self.said:
            return False
        self.said.add(text)
        return True


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Configure the ``imgclf`` logger: INFO on rank 0, warnings on every rank, each warning once per command
    (every call starts a command afresh)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_MainProcessFilter())
        logger.addHandler(handler)
        logger.propagate = False
    for handler in logger.handlers:
        for once in [f for f in handler.filters if isinstance(f, _SaidOnce)]:
            handler.removeFilter(once)
        handler.addFilter(_SaidOnce())
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    return logger


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)
