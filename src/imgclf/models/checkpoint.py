"""Weights as safetensors plus JSON metadata: data, never pickled code."""

from __future__ import annotations

from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from imgclf import atomic
from imgclf.errors import RunDirError


def save_weights(model: nn.Module, path: Path, metadata: dict) -> None:
    """Write ``path`` (safetensors) and ``path.with_suffix('.json')`` atomically."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic.atomic_path(path) as tmp:
        save_file(state, str(tmp))
    atomic.write_json(path.with_suffix(".json"), metadata)


def load_weights(model: nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; the run has no saved weights") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise RunDirError(f"{path} is damaged or truncated ({err}); re-train or restore it") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[0]
        raise RunDirError(f"{path} does not fit the model in its config ({first})") from None
