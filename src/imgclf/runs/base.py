"""The bottom of the runs wing: what every kind of run offers, and how a directory is opened by its kind.

A run directory records its kind in ``run.json`` (``network``, ``classical``, ``ensemble``). Each
kind's module registers an opener here; ``load_run`` reads the kind and calls its opener, then
checks the directory against its manifest. Adding a kind (an exported model, a stacked ensemble)
is one module that calls ``register``: nothing here changes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from imgclf import atomic
from imgclf.config import load_config
from imgclf.errors import RunDirError
from imgclf.evaluation.predictions import Predictions
from imgclf.runs import files as runfiles
from imgclf.runs import manifest

KIND_FILE = "run.json"
MAX_NESTING = 8  # ensembles of ensembles, at most this deep


@runtime_checkable
class Run(Protocol):
    """A trained classifier on disk: its classes, and what it answers for a split or new images."""

    path: Path

    @property
    def classes(self) -> list[str]: ...

    def probabilities(self, split: str, data_root: str | Path | None = None, shuffle: bool = False,
                      prepared=None, tta: str | None = None) -> Predictions: ...

    def evaluate(self, split: str = "test", data_root: str | Path | None = None, shuffle: bool = False,
                 prepared=None, tta: str | None = None) -> dict: ...

    def predict(self, inputs: list[str | Path], out: str | Path | None = None, skip_bad_images: bool = False,
                batch_size: int | None = None, tta: str | None = None) -> Predictions: ...

    def loader_probs(self, loader, tta: str | None = None) -> np.ndarray: ...

    def describe(self) -> str: ...

    def check(self) -> None:
        """Read and validate every file the run depends on (``imgclf seal`` runs this first)."""


Opener = Callable[[Path, tuple[Path, ...]], Run]
OPENERS: dict[str, Opener] = {}


def register(kind: str) -> Callable[[Opener], Opener]:
    """Decorator for a kind's opener (usually its class): ``@register("network")``."""

    def add(opener: Opener) -> Opener:
        OPENERS[kind] = opener
        return opener

    return add


def write_kind(run_dir: Path, kind: str) -> None:
    atomic.write_json(run_dir / KIND_FILE, {"kind": kind})


def recorded_kind(run_dir: Path) -> str:
    """The kind ``run.json`` records; runs written before kinds existed are told apart by their files."""
    file = run_dir / KIND_FILE
    if file.exists() or file.is_symlink():  # a FIFO or device named run.json is refused, not skipped
        data = runfiles.read_json(file)
        kind = data.get("kind") if isinstance(data, dict) else None
        kind = kind if isinstance(kind, str) else repr(kind)[:40]
    elif (run_dir / "ensemble.json").is_file():
        kind = "ensemble"
    elif (run_dir / "config.yaml").is_file():
        kind = "network" if load_config(run_dir / "config.yaml").model.head == "linear" else "classical"
    else:
        raise RunDirError(f"{run_dir} is not a run directory (no {KIND_FILE} or config.yaml); pass the --out of "
                          "a train run")
    if kind not in OPENERS:
        raise RunDirError(f"{file}: kind {kind!r} is not one of {', '.join(sorted(OPENERS))}; {runfiles.FIX}")
    return kind


def open_run(path: str | Path, outer: tuple[Path, ...] = ()) -> Run:
    """The run in ``path`` by its recorded kind, not checked against its manifest (``load_run`` does that)."""
    path = Path(path)
    return OPENERS[recorded_kind(path)](path, outer)


def load_run(path: str | Path, _outer: tuple[Path, ...] = ()) -> Run:
    """The run in ``path``, its files checked against its manifest.

    ``_outer`` holds the ensembles that led here, so an ensemble that lists itself, directly or
    through another, is an error instead of endless recursion.
    """
    path = Path(path)
    if path.resolve() in _outer:
        raise RunDirError(f"ensemble {_outer[-1]} lists {path}, which contains it: an ensemble cannot be its own "
                          "member; list trained runs only")
    if len(_outer) >= MAX_NESTING:
        raise RunDirError(f"{_outer[0]} nests ensembles more than {MAX_NESTING} deep; list trained runs instead")
    manifest.verify(path)
    return open_run(path, _outer)


def check_and_seal(path: str | Path) -> dict[str, str]:
    """``imgclf seal RUN``: validate every file of the run as loading does, then record their hashes.

    For a user who edited a sealed file on purpose; an edit that breaks a schema or disagrees with
    the rest of the run is refused here, not sealed.
    """
    manifest.refuse_unfinished(Path(path))  # its files are still being written: nothing to seal yet
    try:
        open_run(path).check()
    except RunDirError as err:  # the usual fix ends "...run 'imgclf seal RUN'": the command refusing it now
        text = str(err)
        if not text.endswith(runfiles.FIX):
            raise
        raise RunDirError(text.removesuffix(runfiles.FIX) + "edit it to agree with the run's other files, restore "
                          "it, or re-train; seal records only a run whose files agree") from None
    return manifest.seal(Path(path))
