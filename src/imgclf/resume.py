"""Exact resume: the end-of-epoch training state, saved so a killed run continues where it was.

Written after every epoch, each file atomically: ``last.safetensors`` (weights),
``last_state.pt`` (optimizer and schedule state dicts and the torch RNG states: tensors and
numbers only, read back with ``torch.load(weights_only=True)``), then ``last.json`` (stage,
epoch, early-stopping state, history, numpy/python RNG states), which names the epoch the other
two files must hold: it is written last, so a kill between the writes resumes from the previous
consistent epoch's view of the files or fails clearly, never silently mixes epochs.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from . import atomic
from .checkpoint import load_weights, save_weights
from .errors import RunDirError

STATE_JSON, STATE_TENSORS, STATE_WEIGHTS = "last.json", "last_state.pt", "last.safetensors"
BEST_COPY = "last_best.safetensors"  # the best weights as of the saved epoch (the live best file may be newer)


def capture_rng(generator: torch.Generator) -> tuple[dict, dict]:
    """(tensors, JSON-able) RNG states of torch, the data generator, numpy and python."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch_rng": torch.get_rng_state(), "data_rng": generator.get_state()}
    plain = {"numpy_rng": [kind, keys.tolist(), pos, has_gauss, cached],
             "python_rng": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    return tensors, plain


def restore_rng(generator: torch.Generator, tensors: dict, plain: dict) -> None:
    torch.set_rng_state(tensors["torch_rng"])
    generator.set_state(tensors["data_rng"])
    kind, keys, pos, has_gauss, cached = plain["numpy_rng"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, state, gauss = plain["python_rng"]
    random.setstate((version, tuple(state), gauss))


def save_state(out: Path, model: torch.nn.Module, generator: torch.Generator, fit_state: dict, info: dict,
               best_file: Path) -> None:
    """``fit_state``: optimizer/schedule state dicts; ``info``: stage, epochs, stopper, history."""
    tensors, plain = capture_rng(generator)
    save_weights(model, out / STATE_WEIGHTS, {"epoch": info["epoch"]})
    if info["stopper"]["best_epoch"] == info["epoch"] and best_file.exists():
        _copy_weights(best_file, out / BEST_COPY)
    with atomic.atomic_path(out / STATE_TENSORS) as tmp:
        torch.save({**fit_state, **tensors, "epoch": info["epoch"]}, tmp)
    atomic.write_json(out / STATE_JSON, {**info, **plain})


def load_state(out: Path, model: torch.nn.Module) -> tuple[dict, dict]:
    """Load the last weights into ``model``; return (tensor state, JSON state), checked consistent."""
    try:
        info = json.loads((out / STATE_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunDirError(f"{out} has no {STATE_JSON}: it never finished an epoch; start it again") from None
    except json.JSONDecodeError as err:
        raise RunDirError(f"{out / STATE_JSON} is damaged ({err.msg}); start the run again") from None
    try:
        tensors = torch.load(out / STATE_TENSORS, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RunDirError(f"{out / STATE_TENSORS} is damaged ({str(err).splitlines()[0][:120]})") from None
    if tensors.get("epoch") != info["epoch"]:
        raise RunDirError(f"{out}: training state files are from different epochs; start the run again")
    load_weights(model, out / STATE_WEIGHTS)
    return tensors, info


def restore_best_file(out: Path, best_file: Path, info: dict) -> None:
    """Undo a best checkpoint written after the saved epoch (the run died before saving that epoch)."""
    meta = json.loads(best_file.with_suffix(".json").read_text(encoding="utf-8")) if best_file.exists() else {}
    if meta.get("epoch") != info["stopper"]["best_epoch"] and (out / BEST_COPY).exists():
        _copy_weights(out / BEST_COPY, best_file)


def _copy_weights(source: Path, target: Path) -> None:
    for src, dst in ((source, target), (source.with_suffix(".json"), target.with_suffix(".json"))):
        with atomic.atomic_path(dst) as tmp:
            tmp.write_bytes(src.read_bytes())
