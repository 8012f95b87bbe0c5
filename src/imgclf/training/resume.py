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
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imgclf import atomic
from imgclf.errors import RunDirError
from imgclf.logs import get_logger
from imgclf.models.checkpoint import check_fits, load_weights, model_state, write_safetensors, write_torch
from imgclf.safeio import read_capped, require_regular

STATE_DIR = "resume"
RANKS_FILE = "ranks.pt"
CONFIG_FILE = "config.yaml"
MAX_STATE_BYTES = 16 << 20  # state.json: RNG states and the history, some kB an epoch
OPTIMIZER_STATE_RATIO = 4  # state.pt's size, at most, in weights: Adam keeps two tensors a parameter
STATE_KEYS = frozenset({"optimizer", "schedule", "scaler", "torch_rng", "data_rng", "epoch"})  # what state.pt holds
MAX_SAFETENSORS_HEADER = 16 << 20  # a weights file's JSON header: names, shapes and offsets, some kB
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
    folder = atomic.inner_folder(out, STATE_DIR)
    final, tmp = folder / f"epoch_{info['epoch']:05d}", folder / f".epoch_{info['epoch']:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors, plain = capture_rng(generator)
    write_safetensors(tmp / "weights.safetensors", model_state(model))
    if best_file.exists():
        _snapshot(best_file, tmp / "best.safetensors")
        _snapshot(best_file.with_suffix(".json"), tmp / "best.json")
    write_torch(tmp / "state.pt", {**fit_state, **tensors, "epoch": info["epoch"]})
    if rank_states:
        write_torch(tmp / RANKS_FILE, [{**rank_tensors, **rank_plain} for rank_tensors, rank_plain in rank_states])
        info = {**info, "world_size": len(rank_states)}
    if (out / CONFIG_FILE).is_file():  # the settings this epoch was trained with, as resume will read them
        info = {**info, "config_sha256": hashlib.sha256((out / CONFIG_FILE).read_bytes()).hexdigest()}
    (tmp / "state.json").write_text(json.dumps({**info, **plain}), encoding="utf-8")
    for name in os.listdir(tmp):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # the same epoch again, after a resume
    os.replace(tmp, final)
    for old in folder.glob("epoch_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


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


def refuse_edited_config(out: Path) -> None:
    """A killed run continues with the settings its epochs were trained with: a config.yaml edited since its last
    saved epoch is refused (it was obeyed: a plan of 4 epochs trained 2, and config.yaml no longer said how)."""
    try:
        folder = latest_state(out)
        recorded = json.loads(read_capped(folder / "state.json", MAX_STATE_BYTES, RunDirError, "start the run again"))
    except (RunDirError, ValueError):
        return  # load_state names a missing or damaged state
    digest = recorded.get("config_sha256") if isinstance(recorded, dict) else None
    if digest and hashlib.sha256((out / CONFIG_FILE).read_bytes()).hexdigest() != digest:
        raise RunDirError(f"{out / CONFIG_FILE} changed since epoch {recorded.get('epoch')} was saved; the run "
                          "continues with the settings it trained with: put the file back, or train anew with the new "
                          f"settings (imgclf train --config {out / CONFIG_FILE} --out NEW)")


def load_state(out: Path, model: torch.nn.Module) -> tuple[dict, dict]:
    """Load the newest complete epoch's weights into ``model``; return (tensor state, JSON state)."""
    folder = latest_state(out)
    try:
        info = json.loads(read_capped(folder / "state.json", MAX_STATE_BYTES, RunDirError, "start the run again"))
        ResumeInfo.model_validate(info)
        limit = OPTIMIZER_STATE_RATIO * tensor_bytes(model) + MAX_STATE_BYTES
        tensors = torch.load(_capped(folder / "state.pt", limit), map_location="cpu", weights_only=True)
        if not isinstance(tensors, dict) or not all(isinstance(tensors.get(k), torch.Tensor)
                                                    for k in ("torch_rng", "data_rng")):
            raise ValueError("state.pt lacks the RNG states")
        if unknown := sorted(map(str, tensors.keys() - STATE_KEYS))[:3]:
            raise ValueError(f"state.pt holds entries imgclf never writes ({', '.join(unknown)})")
    except ValidationError as err:
        first = err.errors()[0]
        raise RunDirError(f"{folder / 'state.json'}: {'.'.join(map(str, first['loc']))}: {first['msg']}; "
                          "start the run again") from None
    except RunDirError:  # read_capped's: already one line naming the file
        raise
    except Exception as err:
        raise RunDirError(f"training state in {folder} is damaged ({str(err).splitlines()[0][:120]}); "
                          f"start the run again") from None
    if tensors.get("epoch") != info.get("epoch"):
        raise RunDirError(f"{folder}: state files are from different epochs; start the run again")
    load_weights(model, folder / "weights.safetensors")
    return tensors, info


def restore_best_file(out: Path, best_file: Path, model: torch.nn.Module, check_meta: Callable[[Path], object]) -> None:
    """Put back the best weights as of the saved epoch (a newer best may have been written before the kill), once
    they are known to fit ``model`` (names, shapes, and a size no bigger than those tensors need) and their
    metadata passes ``check_meta``: a planted file is refused by its own name, and the run's files are kept."""
    folder = latest_state(out)
    weights, meta = folder / "best.safetensors", folder / "best.json"
    if os.path.lexists(weights):
        check_fits(model, weights)
        needed, size = tensor_bytes(model) + MAX_SAFETENSORS_HEADER, weights.stat().st_size
        if size > needed:
            raise RunDirError(f"{weights} is {size:,} bytes, more than the model's weights need ({needed:,}); "
                              "start the run again")
    if os.path.lexists(meta):
        check_meta(meta)
    for source, target in ((weights, best_file), (meta, best_file.with_suffix(".json"))):
        if os.path.lexists(source):
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
        states = torch.load(_capped(path, MAX_STATE_BYTES), map_location="cpu", weights_only=True)
        keys = ("torch_rng", "data_rng", "numpy_rng", "python_rng")
        if not isinstance(states, list) or not all(isinstance(s, dict) and all(k in s for k in keys)
                                                   for s in states):
            raise ValueError("not a list of per-rank RNG states")
    except Exception as err:
        raise RunDirError(f"{path} is damaged or missing ({str(err).splitlines()[0][:120]}); start the run again") \
            from None
    return states


def tensor_bytes(model: torch.nn.Module) -> int:
    """The bytes of ``model``'s saved tensors (its state dict)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _capped(path: Path, limit: int) -> Path:
    """``path`` if it is a regular file (a FIFO would block torch.load) of at most ``limit`` bytes."""
    require_regular(path, RunDirError, "start the run again")
    if (size := path.stat().st_size) > limit:
        raise ValueError(f"{path.name} is {size:,} bytes, more than imgclf writes for this model")
    return path
