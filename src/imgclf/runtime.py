"""Process-level compute settings: seeding, device and precision. No module-level mutable state."""

from __future__ import annotations

import contextlib
import ctypes
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch

from imgclf.errors import ConfigError
from imgclf.logs import get_logger, get_rank, is_main_process, setup_logging

__all__ = [
    "autocast",
    "derive_seed",
    "exact_fp32",
    "get_logger",
    "get_rank",
    "is_main_process",
    "keep_freed_memory",
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
    """The device ``name`` names, refused with a one-line ConfigError when this machine does not have it.

    Checked before the run directory exists, so a wrong --device never leaves a half-made run behind.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use --device auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is visible; use --device cpu or auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"device={name!r} but this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1}); "
                          "use --device cuda or auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name!r} but Apple MPS is not available here; use --device cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported; use --device auto, cpu, cuda, cuda:N or mps")
    return device


def cpu_supports_bf16() -> bool:
    """Whether oneDNN has native bf16 kernels here (AVX-512 BF16 / AMX); else bf16 is emulated and slow."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 where the hardware computes it natively (GPU or a bf16 CPU), else fp16 (GPU) or fp32.

    Measured on a 2-core AVX-512 BF16 CPU, training at batch 32: bf16 autocast with channels_last
    is 2.5x fp32 for the simple CNN at 150 px and 1.8x for efficientnet_b0 at 224 px.
    """
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to the OS.

    By default every tensor over 32 MB is its own ``mmap``, unmapped when freed: a training step that
    makes and frees the same large tensors (the notebook CNN's 76 MB dense-layer gradient, its first
    feature map) then page-faults and zero-fills ~300 MB afresh, ~80k page faults a step. With mmap off
    and no trimming, the heap reuses those pages; the process's memory stays at its peak rather than
    falling back between steps. Measured on the notebook CNN, one thread: 80-87 -> 128-138 img/s.
    The reuse settles after a few steps: torch's posix_memalign asks for a little more than the block it
    freed, so the heap first grows by a few copies of a large tensor (3 to 9 rounds of a 64 MB tensor).
    Returns whether it applied (False where the C library is not glibc).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):  # no C library by that name (TypeError: Windows)
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def release_freed_memory() -> None:
    """Hand the memory ``keep_freed_memory`` kept back to the OS (glibc's ``malloc_trim``) once training and
    the final predictions (which reuse it) are over, so that the closing work (baselines, report) does not add
    its peak on top of it."""
    with contextlib.suppress(OSError, AttributeError, TypeError):  # not glibc: it kept nothing
        ctypes.CDLL(None).malloc_trim(0)


@dataclass(frozen=True)
class Compute:
    """Where and how tensors are computed: device, autocast precision, memory format."""

    device: torch.device
    precision: str = "fp32"
    channels_last: bool = False

    @classmethod
    def resolve(cls, device: str, precision: str, channels_last: bool | None) -> Compute:
        dev = resolve_device(device)
        if dev.type == "cuda":  # TF32 matmuls/convolutions: fp32 accuracy for training, much faster
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        elif dev.type == "cpu":  # its large tensors come from malloc, step after step
            keep_freed_memory()
        return cls(dev, resolve_precision(precision, dev), True if channels_last is None else channels_last)

    def batch(self, images: torch.Tensor) -> torch.Tensor:
        """Move a batch to the device, in the memory format the model was given."""
        if self.channels_last and images.ndim == 4:
            return images.to(self.device, memory_format=torch.channels_last, non_blocking=True)
        return images.to(self.device, non_blocking=True)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def autocast(self):
        return autocast(self.device, self.precision)

    def inference(self) -> Compute:
        """The same device and memory format in fp32: how every prediction that is scored or saved computes
        (per-epoch validation included), so the best epoch's numbers equal metrics.json's and the torch
        engine equals the fp32 ONNX graph."""
        return replace(self, precision="fp32")


@contextmanager
def exact_fp32(device: torch.device) -> Iterator[None]:
    """Full fp32 on CUDA while predicting: TF32 (on for training, and cuDNN's default) moves probabilities
    by ~1e-3; restored afterwards. Nothing to do on other devices."""
    if device.type != "cuda":
        yield
        return
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` ('fp32' is a no-op)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
