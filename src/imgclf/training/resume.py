"""Exact resume: the end-of-epoch training state, saved so a killed run continues where it was.

After every epoch the whole state goes into ``resume/.epoch_N.tmp/`` and is committed by one atomic
directory rename to ``resume/epoch_N/``; older epochs are then removed. A kill at any moment leaves
at least one complete epoch directory, never a mix of epochs. Each holds:
``weights.safetensors``; ``best.safetensors`` + ``best.json`` (the best weights as of that epoch,
since the live best file may be newer when the run dies); ``state.pt`` (optimizer and schedule
state dicts and torch RNG states: tensors and numbers only, read with ``weights_only=True``); and
``state.json`` (stage, epoch, early stopping, history, numpy/python RNG states). A run of several
processes adds ``ranks.pt``: every rank's RNG states (rank 0's are also those above), and
``world_size`` in state.json, so each rank resumes its own augmentation and dropout streams.

``StateWriter`` writes in a background thread, so an epoch's state goes to disk while the next epoch
trains (on the notebook CNN, 228 MB and ~0.9 s a save, most of it waiting on the disk): the snapshot
(a CPU copy of the weights, optimizer state and RNG states, the best file linked) is taken on the
training thread first, one write is in flight at a time, and a write's error (a full disk) is
raised on the training thread at the next save or when training ends, as a synchronous save's would
be. Until that write is committed, a kill resumes from the epoch before, as a kill mid-save did.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import save_file

from imgclf import atomic
from imgclf.errors import RunDirError
from imgclf.logs import get_logger
from imgclf.models.checkpoint import load_weights

STATE_DIR = "resume"
RANKS_FILE = "ranks.pt"
log = get_logger("resume")


class _Stopper(BaseModel):
    best: float | None
    best_epoch: int | None = Field(ge=1)
    bad: int = Field(ge=0)


class ResumeInfo(BaseModel):
    """state.json, checked before any of it steers training (a tampered file is an error, not a crash)."""

    model_config = ConfigDict(extra="allow")
    epoch: int = Field(ge=1)
    stage_index: int = Field(ge=0, le=100)
    stage_epoch: int = Field(ge=0)
    stage_done: bool
    history: list[dict[str, float | int | str | None]]
    stopper: _Stopper
    numpy_rng: tuple[str, list[int], int, int, float]
    python_rng: tuple[int, list[int], float | None]
    world_size: int = Field(1, ge=1, le=1 << 20)  # processes that trained it (several: ranks.pt)


def capture_rng(generator: torch.Generator) -> tuple[dict, dict]:
    """(tensors, JSON-able) RNG states of torch, the data generator, numpy and python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    tensors = {"torch_rng": torch.get_rng_state(), "data_rng": generator.get_state()}
    plain = {"numpy_rng": [kind, keys.tolist(), pos, has_gauss, cached], "python_rng": [version, list(state), gauss]}
    return tensors, plain


def restore_rng(generator: torch.Generator, tensors: dict, plain: dict) -> None:
    try:
        torch.set_rng_state(tensors["torch_rng"])
        generator.set_state(tensors["data_rng"])
        kind, keys, pos, has_gauss, cached = plain["numpy_rng"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
        version, state, gauss = plain["python_rng"]
        random.setstate((version, tuple(state), gauss))
    except (RuntimeError, ValueError, TypeError, OverflowError) as err:
        raise RunDirError(f"the saved random-number states are damaged ({str(err)[:100]}); start the run again") \
            from None


def save_state(out: Path, model: torch.nn.Module, generator: torch.Generator, fit_state: dict, info: dict,
               best_file: Path, rank_states: list[tuple[dict, dict]] | None = None) -> None:
    """``fit_state``: optimizer/schedule state dicts; ``info``: stage, epochs, stopper, history;
    ``rank_states``: every rank's ``capture_rng`` when several processes train."""
    snapshot_state(out, model, generator, fit_state, info, best_file, rank_states)()


def snapshot_state(out: Path, model: torch.nn.Module, generator: torch.Generator, fit_state: dict, info: dict,
                   best_file: Path, rank_states: list[tuple[dict, dict]] | None = None) -> Callable[[], None]:
    """``save_state``'s snapshot, taken now; the returned function writes and commits it (any thread)."""
    folder = out / STATE_DIR
    final, tmp = folder / f"epoch_{info['epoch']:05d}", folder / f".epoch_{info['epoch']:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors, plain = capture_rng(generator)
    weights = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)  # safetensors' layout
               for k, v in model.state_dict().items()}
    if best_file.exists():
        _snapshot(best_file, tmp / "best.safetensors")
        _snapshot(best_file.with_suffix(".json"), tmp / "best.json")
    state = _cpu_copy({**fit_state, **tensors, "epoch": info["epoch"]})
    ranks = [{**rank_tensors, **rank_plain} for rank_tensors, rank_plain in rank_states or []]
    text = json.dumps({**info, **plain, **({"world_size": len(ranks)} if ranks else {})})

    def commit() -> None:
        save_file(weights, str(tmp / "weights.safetensors"))
        torch.save(state, tmp / "state.pt")
        if ranks:
            torch.save(ranks, tmp / RANKS_FILE)
        (tmp / "state.json").write_text(text, encoding="utf-8")
        for name in os.listdir(tmp):
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)  # the same epoch again, after a resume
        os.replace(tmp, final)
        for old in folder.glob("epoch_*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    return commit


def _cpu_copy(value):
    """``value`` with every tensor copied to the CPU, so training may go on changing its own. Each copy keeps
    its tensor's memory layout: torch's fused Adam pairs a channels-last weight's elements with its moments' by
    memory order, so moments resumed contiguous would update the wrong elements."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", memory_format=torch.preserve_format, copy=True)
    if isinstance(value, dict):
        return {k: _cpu_copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(v) for v in value)
    return value


class StateWriter:
    """``save_state`` in a background thread, one write at a time (see the module's docstring)."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, *args, **kwargs) -> None:
        """``save_state``'s arguments: snapshot now, write while the caller goes on."""
        self.wait()
        commit = snapshot_state(*args, **kwargs)
        self._thread = threading.Thread(target=self._write, args=(commit,), name="imgclf-state-writer")
        self._thread.start()

    def _write(self, commit: Callable[[], None]) -> None:
        try:
            commit()
        except BaseException as err:  # handed to the training thread by wait()
            self._error = err

    def wait(self) -> None:
        """Until the write in flight is committed; raise its error, if it had one."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error


def _snapshot(source: Path, target: Path) -> None:
    """``source`` as it is now: a hard link (the best file is only ever replaced whole, by an atomic
    rename, so the link keeps this version), or a copy where the file system has no hard links."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def latest_state(out: Path) -> Path:
    complete = sorted((out / STATE_DIR).glob("epoch_*"))
    if not complete:
        raise RunDirError(f"{out} has no saved training state: it never finished an epoch; start it again")
    return complete[-1]


def load_state(out: Path, model: torch.nn.Module) -> tuple[dict, dict]:
    """Load the newest complete epoch's weights into ``model``; return (tensor state, JSON state)."""
    folder = latest_state(out)
    try:
        info = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        ResumeInfo.model_validate(info)
        tensors = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        if not all(isinstance(tensors.get(k), torch.Tensor) for k in ("torch_rng", "data_rng")):
            raise ValueError("state.pt lacks the RNG states")
    except ValidationError as err:
        first = err.errors()[0]
        raise RunDirError(f"{folder / 'state.json'}: {'.'.join(map(str, first['loc']))}: {first['msg']}; "
                          "start the run again") from None
    except Exception as err:
        raise RunDirError(f"training state in {folder} is damaged ({str(err).splitlines()[0][:120]}); "
                          f"start the run again") from None
    if tensors.get("epoch") != info.get("epoch"):
        raise RunDirError(f"{folder}: state files are from different epochs; start the run again")
    load_weights(model, folder / "weights.safetensors")
    return tensors, info


def restore_best_file(out: Path, best_file: Path) -> None:
    """Put back the best weights as of the saved epoch (a newer best may have been written before the kill)."""
    folder = latest_state(out)
    pairs = ((folder / "best.safetensors", best_file), (folder / "best.json", best_file.with_suffix(".json")))
    for source, target in pairs:
        if source.exists():
            with atomic.atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)


def for_rank(out: Path, resume: tuple[dict, dict], rank: int, world_size: int,
             generator: torch.Generator) -> tuple[dict, dict]:
    """``load_state``'s answer with this rank's own RNG states in place of rank 0's.

    A rank the saved run did not have (it resumes on more processes) keeps its freshly seeded streams.
    """
    tensors, info = resume
    saved = info.get("world_size", 1)
    if saved != world_size:
        log.warning("warning: %s trained on %d process(es) and resumes on %d: from here on the batches and "
                    "augmentation differ from an uninterrupted %d-process run", out, saved, world_size, saved)
    if rank == 0:
        return resume
    states = _rank_states(latest_state(out)) if saved > 1 else []
    if rank < len(states):
        state = states[rank]
        return ({**tensors, "torch_rng": state["torch_rng"], "data_rng": state["data_rng"]},
                {**info, "numpy_rng": state["numpy_rng"], "python_rng": state["python_rng"]})
    fresh_tensors, fresh_plain = capture_rng(generator)
    return {**tensors, **fresh_tensors}, {**info, **fresh_plain}


def _rank_states(folder: Path) -> list[dict]:
    """ranks.pt, checked: a list of RNG-state dicts (the values are checked by ``restore_rng``)."""
    path = folder / RANKS_FILE
    try:
        states = torch.load(path, map_location="cpu", weights_only=True)
        keys = ("torch_rng", "data_rng", "numpy_rng", "python_rng")
        if not isinstance(states, list) or not all(isinstance(s, dict) and all(k in s for k in keys)
                                                   for s in states):
            raise ValueError("not a list of per-rank RNG states")
    except Exception as err:
        raise RunDirError(f"{path} is damaged or missing ({str(err).splitlines()[0][:120]}); start the run again") \
            from None
    return states
