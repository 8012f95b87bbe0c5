"""One run on many processes (torchrun + DDP), with evaluation that counts every image exactly once.

Phase 2 wires these pieces; for one process every helper is a no-op, so it trains exactly as before.
- ``ctx = DistContext.from_env()`` (RANK via ``imgclf.logs.get_rank``, the one source of truth);
  ``device = ctx.init(compute.device, backend, timeout_s)``: nccl on CUDA, gloo otherwise, one
  GPU per LOCAL_RANK; a rank that cannot join ends within the timeout with a one-line ImgclfError.
- Batches and training order: ``data.samplers`` (``--batch-size`` is the global batch; seeded
  samplers, ``set_sampler_epoch`` every epoch); augmentation may differ per rank (``rank_seed``).
- Evaluation: ``exact_probs`` predicts unpadded shards with the plain module and gathers rows in
  dataset order to every rank; decisions still go through ``broadcast_decision``.
- Caches: ``with local_main_first(ctx): prepare(...)``; data/cache.py also locks each key (fcntl).
  Rank-0 writes: ``with main_first(ctx): if ctx.is_main: ...`` (long waits never hit the timeout).
- Models: ``wrap`` after each stage's ``apply_freeze`` (DDP records ``requires_grad`` when built);
  ``unwrap`` for state dicts and optimiser groups; ``sync_buffers`` before saving. Every collective
  runs on every rank, never inside ``if ctx.is_main``. fp16: ``GradScaling``.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from imgclf.config.defaults import DEFAULT_DIST_TIMEOUT_S, DIST_BACKENDS
from imgclf.data.datasets import make_loader
from imgclf.data.samplers import ShardView, eval_shard, place_rows
from imgclf.errors import ConfigError, ImgclfError
from imgclf.evaluation.evaluate import predict_probs
from imgclf.logs import get_logger, get_rank
from imgclf.models.objective import Objective
from imgclf.runtime import Compute

log = get_logger("distributed")

WAIT_TIMEOUT_S = 24 * 3600.0  # waiting while another rank builds a cache or writes the run (leader_first)


def _env_int(name: str, default: int, minimum: int) -> int:
    raw = os.environ.get(name) or str(default)
    value = int(raw) if raw.isdecimal() else -1
    if value < minimum:
        raise ConfigError(f"environment variable {name}={raw!r} is not a whole number >= {minimum}; "
                          "start imgclf with torchrun, which sets RANK, WORLD_SIZE and LOCAL_RANK")
    return value


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; ``world_size`` 1 (no torchrun) makes every helper a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> DistContext:
        world = _env_int("WORLD_SIZE", 1, 1)
        _env_int("RANK", 0, 0)  # checked here so get_rank() below can trust it
        rank, local = get_rank(), _env_int("LOCAL_RANK", 0, 0)
        if rank >= world:
            raise ConfigError(f"RANK={rank} but WORLD_SIZE={world}; start imgclf with torchrun, which sets both")
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:  # writes the run directory, logs and reports
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:  # builds the caches of its machine
        return self.local_rank == 0

    def device_for(self, device: torch.device) -> torch.device:
        """The device this rank computes on: ``cuda:LOCAL_RANK`` when ``device`` is CUDA under torchrun."""
        if not self.distributed or device.type == "cpu":
            return device
        if device.type != "cuda":
            raise ConfigError(f"distributed training runs on CPUs or CUDA GPUs, not {device.type}; use --device cpu")
        if device.index is not None:
            raise ConfigError(f"--device {device} picks one GPU, but under torchrun each rank uses cuda:LOCAL_RANK; "
                              "pass --device cuda or auto")
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {self.local_rank} has no GPU: this machine has "
                              f"{torch.cuda.device_count()}; lower --nproc-per-node")
        return torch.device("cuda", self.local_rank)

    def init(self, device: torch.device, backend: str = "auto",
             timeout_s: float = DEFAULT_DIST_TIMEOUT_S) -> torch.device:
        """Join the process group (a no-op for one process) and return this rank's device."""
        device = self.device_for(device)
        backend = resolve_backend(backend, device)
        if not math.isfinite(timeout_s) or timeout_s <= 0:
            raise ConfigError(f"--dist-timeout {timeout_s} must be a positive number of seconds")
        if not self.distributed or dist.is_initialized():
            return device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                    device_id=device if backend == "nccl" else None)
            self.barrier()  # every rank is there, or this times out
        except (RuntimeError, ValueError) as err:  # DistError is a RuntimeError
            where, why = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}", " ".join(str(err).split())
            raise ImgclfError(f"rank {self.rank} of {self.world_size} could not join the others at {where} within "
                              f"{timeout_s:g} s ({why[:200]}); check that every rank started and can reach that "
                              "address, or raise --dist-timeout") from None
        return device

    def barrier(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier(device_ids=[self.local_rank] if dist.get_backend() == "nccl" else None)

    def destroy(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def resolve_backend(backend: str, device: torch.device) -> str:
    """'auto' -> nccl on CUDA, gloo otherwise; nccl without CUDA is a ConfigError."""
    if backend not in DIST_BACKENDS:
        raise ConfigError(f"--dist-backend {backend!r} is unknown; use one of {', '.join(DIST_BACKENDS)}")
    if backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("--dist-backend nccl needs CUDA GPUs; use gloo (or auto) on the CPU")
    return backend


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for one process)."""
    gathered: list[Any] = [obj] if not ctx.distributed else [None] * ctx.world_size
    if ctx.distributed:
        dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_decision(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank: early stopping and best-epoch choices can never split the job."""
    box = [value]
    if ctx.distributed:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_by_index(ctx: DistContext, indices: np.ndarray, rows: np.ndarray, total: int) -> np.ndarray:
    """Every rank's rows for dataset ``indices``, as one ``total``-row array in dataset order (``place_rows``)."""
    return place_rows(gather_objects(ctx, (np.asarray(indices, dtype=np.int64), np.asarray(rows))), total)


def exact_probs(model: nn.Module, objective: Objective, dataset, batch_size: int, compute: Compute,
                ctx: DistContext, tta: str = "none", workers: int | None = None) -> np.ndarray:
    """N x K probabilities for ``dataset`` (as ``predict_probs``), each rank predicting its unpadded shard.
    One process predicts exactly as before; otherwise every rank gets all rows in dataset order."""
    # Never DDP's forward: it may broadcast buffers, a collective whose count would differ per rank.
    model = unwrap(model) if isinstance(getattr(model, "_orig_mod", model), DistributedDataParallel) else model
    sync_buffers(ctx, model)
    if not ctx.distributed:
        return predict_probs(model, objective, make_loader(dataset, batch_size, workers=workers), compute, tta)
    indices = eval_shard(len(dataset), ctx.rank, ctx.world_size, batch_size)
    loader = make_loader(ShardView(dataset, indices), batch_size, workers=workers)
    local = predict_probs(model, objective, loader, compute, tta)
    return gather_by_index(ctx, indices, local, len(dataset))


@contextmanager
def leader_first(ctx: DistContext, leads: bool) -> Iterator[None]:
    """Ranks where ``leads`` run the block first, the others after them; every rank must enter.

    The others wait on a gloo group whose timeout is a day, not ``--dist-timeout``: decoding 100k
    images may take longer. A leader that fails still releases them, to meet the same clean error.
    """
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WAIT_TIMEOUT_S)) \
        if ctx.distributed and dist.is_initialized() else None
    if group is not None and not leads:
        dist.barrier(group=group)
    try:
        yield
    finally:
        if group is not None:
            if leads:
                dist.barrier(group=group)
            dist.destroy_process_group(group)


def local_main_first(ctx: DistContext):
    """``with local_main_first(ctx): prepared = prepare(...)``: LOCAL_RANK 0 builds, its machine's others read."""
    return leader_first(ctx, ctx.is_local_main)


def main_first(ctx: DistContext):
    """``with main_first(ctx): if ctx.is_main: write(...)``: nobody goes on before rank 0's files exist."""
    return leader_first(ctx, ctx.is_main)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile: its state dict has no ``module.``/``_orig_mod.`` prefix."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def wrap(model: nn.Module, ctx: DistContext, device: torch.device, sync_bn: bool = False,
         sample: torch.Tensor | None = None) -> nn.Module:
    """DDP around ``model`` (``model`` itself for one process); build it again after ``requires_grad`` changes.
    ``sample`` (two inputs on ``device``) lets a probe pass decide ``find_unused_parameters``."""
    if not ctx.distributed:
        if sync_bn:
            log.warning("warning: --sync-bn has no effect with one process; its BatchNorm already sees the whole batch")
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA GPUs (torch's SyncBatchNorm does not run on the CPU); "
                              "drop --sync-bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    unused = unused_parameters(model, sample) if sample is not None else []
    if unused:
        log.info("%d trainable parameter tensor(s) get no gradient (%s%s); DDP looks for unused parameters",
                 len(unused), ", ".join(unused[:3]), ", ..." if len(unused) > 3 else "")
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=bool(unused))


def unused_parameters(model: nn.Module, sample: torch.Tensor) -> list[str]:
    """Trainable parameters that one training-mode pass on ``sample`` leaves without a gradient.
    The probe leaves no trace: module modes, buffers and RNG states are restored."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return []
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.random.fork_rng(devices=[sample.device] if sample.device.type == "cuda" else []):
            out = model.train()(sample)
            outs = [t for t in (out if isinstance(out, list | tuple) else [out]) if t.requires_grad]
            grads = torch.autograd.grad(sum(t.float().sum() for t in outs), [p for _, p in trainable],
                                        allow_unused=True) if outs else [None] * len(trainable)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for module, mode in modes.items():
            module.training = mode
    return [name for (name, _), grad in zip(trainable, grads, strict=True) if grad is None]


def sync_buffers(ctx: DistContext, model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank: each rank's last training batch moved its own,
    and DDP only broadcasts them when a training forward pass starts. Evaluation and saving need one model."""
    if ctx.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def replicas_agree(ctx: DistContext, model: nn.Module) -> bool:
    """Whether every rank holds bit-identical weights: SHA-256 of the plain state dict, compared across ranks."""
    digest = hashlib.sha256()
    for key, tensor in unwrap(model).state_dict().items():
        digest.update(key.encode() + b"\0" + tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return len(set(gather_objects(ctx, digest.hexdigest()))) == 1


class GradScaling:
    """Loss scaling for fp16 autocast, whose small gradients otherwise underflow to zero. Enabled only for
    fp16; for fp32 and bf16 (fp32's exponent range) these are the plain calls. Its state goes in resume."""

    def __init__(self, device: torch.device, precision: str):
        self.enabled = precision == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.enabled)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step unless a gradient is inf/NaN (then the scale halves and this step is skipped)."""
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scaler.load_state_dict(state)
