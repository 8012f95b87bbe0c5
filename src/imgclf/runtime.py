"""Process-level compute settings: seeding, device and precision. No module-level mutable state."""

from __future__ import annotations

import random

import numpy as np
import torch

from .logs import get_logger, get_rank, is_main_process, setup_logging

__all__ = [
    "autocast",
    "derive_seed",
    "get_logger",
    "get_rank",
    "is_main_process",
    "resolve_device",
    "resolve_precision",
    "seed_everything",
    "setup_logging",
]


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch Generator for data order and sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def derive_seed(base: int, key: str) -> int:
    """A stable per-fold or per-trial seed from the base seed and a name; same inputs, same seed."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{base}:{key}".encode()).digest()[:4], "big") % 2**31


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError(f"device={name!r} but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on a GPU that supports it, else fp32 (CPU default until measured otherwise)."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` ('fp32' is a no-op)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
