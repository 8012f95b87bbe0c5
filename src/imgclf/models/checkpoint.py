"""Weights as safetensors plus JSON metadata: data, never pickled code."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as tensors_bytes
from torch import nn

from imgclf import atomic
from imgclf.errors import RunDirError
from imgclf.safeio import require_regular


def save_weights(model: nn.Module, path: Path, metadata: dict) -> None:
    """Write ``path`` (safetensors) and ``path.with_suffix('.json')`` atomically."""
    with atomic.atomic_path(path) as tmp:
        write_safetensors(tmp, model_state(model))
    atomic.write_json(path.with_suffix(".json"), metadata)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as a safetensors file, written by Python: a full disk is an OSError naming the file (as the
    CLI's one line says it), where safetensors' own writer raised its SafetensorError."""
    with atomic.naming(path), open(path, "wb") as fh:
        fh.write(tensors_bytes(tensors))


def write_torch(path: Path, value: object) -> None:
    """``value`` through torch.save into a file Python writes: a full disk is an OSError, not torch's RuntimeError
    ("unexpected pos")."""
    with atomic.naming(path), open(path, "wb") as fh:
        torch.save(value, fh)


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the tensors."""
    try:
        require_regular(path, RunDirError, "re-train or restore it")
        with safe_open(str(path), framework="pt") as fh:
            return {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}  # noqa: SIM118 - not a dict
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; the run has no saved weights") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise RunDirError(f"{path} is damaged or truncated ({err}); re-train or restore it") from None


def check_fits(skeleton: nn.Module, path: Path) -> None:
    """``skeleton`` (the config's model built on the meta device, costing no memory) holds exactly the
    tensors stored in ``path``: an edited config cannot make the real model bigger than its weights."""
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    stored = stored_shapes(path)
    if wanted != stored:
        odd = next((k for k in wanted if stored.get(k) != wanted[k]), None) or next(k for k in stored
                                                                                 if k not in wanted)
        raise RunDirError(f"{path} does not fit the model in its config ({odd}: config {wanted.get(odd)}, "
                          f"weights {stored.get(odd)}); restore the run's config.yaml or re-train")


def load_weights(model: nn.Module, path: Path) -> None:
    try:
        require_regular(path, RunDirError, "re-train or restore it")
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


def fill_skeleton(skeleton: nn.Module, path: Path) -> nn.Module | None:
    """``skeleton`` (built on the meta device: no memory, no random initialisation) made real on the CPU
    with the weights in ``path``, which must fit it (``check_fits``). The strict load overwrites every
    parameter and buffer the storage was made for; a model holding a tensor the file cannot fill (a
    non-persistent buffer, a tensor attribute or one in a list or dict, a shared parameter) gives None:
    build it the ordinary way. Initialising a model only to overwrite it cost VGG16 seconds of its start."""
    saved = skeleton.state_dict().keys()
    tensors = [*skeleton.named_parameters(remove_duplicate=False), *skeleton.named_buffers(remove_duplicate=False)]
    shared = len(tensors) != len([*skeleton.named_parameters(), *skeleton.named_buffers()])
    if shared or any(name not in saved for name, _ in tensors) or any(
            _holds_tensor(value) for module in skeleton.modules() for key, value in vars(module).items()
            if key not in _REGISTERED):
        return None
    model = skeleton.to_empty(device="cpu")
    load_weights(model, path)
    return model


_REGISTERED = {"_parameters", "_buffers", "_modules"}  # nn.Module's own tables, which the load fills


def _holds_tensor(value) -> bool:
    """A tensor outside the module's parameters and buffers: itself, or one level down in a container."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return any(isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) for v in value)
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter)
