"""How one training run uses the building blocks of ``distributed``: checks, rank-0 work, samplers, features, RNG.

With one process every function here does what the single-process code did before, so a run
without torchrun trains exactly as it always has.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import TensorDataset

from imgclf.config.defaults import DEFAULT_DIST_TIMEOUT_S
from imgclf.config.stages import SYNC_BN_NEEDS_CUDA, per_rank_batch
from imgclf.data.datasets import weighted_sampler
from imgclf.data.samplers import DistributedWeightedSampler, eval_shard, train_shard_sampler
from imgclf.errors import ConfigError, ImgclfError, PeerError
from imgclf.logs import get_logger
from imgclf.training.distributed import (
    DistContext,
    broadcast_decision,
    gather_by_index,
    main_first,
)
from imgclf.training.features import extract_features

log = get_logger("ddp")
T = TypeVar("T")


@dataclass(frozen=True)
class DistSettings:
    """``--dist-backend`` and ``--dist-timeout``: how the ranks join; no result depends on them."""

    backend: str = "auto"
    timeout_s: float = DEFAULT_DIST_TIMEOUT_S


PEER_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Timed out", "NCCL", "Broken pipe")


def lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another rank died or hung (several processes only)."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        return False
    return isinstance(err, dist.DistError) or any(sign in str(err) for sign in PEER_SIGNS)


def one_voice(ctx: DistContext, check: Callable[[], T]) -> T:
    """A check every rank makes alike: rank 0 says why it fails, the others stop without repeating it."""
    try:
        return check()
    except ImgclfError as err:
        if ctx.is_main or isinstance(err, PeerError):
            raise
        raise PeerError(str(err)) from None


def main_only(ctx: DistContext, work: Callable[[], T]) -> T:
    """``work()`` on rank 0 alone, its result (or its error) on every rank, nobody on before it ends.

    Rank 0's ImgclfError or OSError is raised there as it is; the others raise a PeerError.
    """
    if not ctx.distributed:
        return work()
    outcome: tuple[str, Any] = ("error", "rank 0 did not answer")
    failure: BaseException | None = None
    with main_first(ctx):
        if ctx.is_main:
            try:
                outcome = ("ok", work())
            except (ImgclfError, OSError) as err:
                outcome, failure = ("error", str(err)), err
    outcome = broadcast_decision(ctx, outcome)
    if failure is not None:
        raise failure
    if outcome[0] == "error":
        raise PeerError(f"rank 0 failed: {outcome[1]}")
    return outcome[1]


def check_world(ctx: DistContext, batch_sizes: list[int], device: torch.device, sync_bn: bool) -> None:
    """What the world size asks of the settings, before any data is read or the run directory made."""
    def check() -> None:
        for batch in batch_sizes:
            per_rank_batch(batch, ctx.world_size)
        if sync_bn and ctx.distributed and device.type != "cuda":
            raise ConfigError(SYNC_BN_NEEDS_CUDA)

    one_voice(ctx, check)
    if sync_bn and not ctx.distributed:
        log.warning("warning: --sync-bn has no effect with one process; its BatchNorm already sees the whole batch")


def backend_name() -> str:
    return dist.get_backend() if dist.is_initialized() else "not joined"


def broadcast_module(ctx: DistContext, model: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank: each rank seeded its own initialisation, and a frozen
    backbone is never wrapped in DDP, which would otherwise make them agree."""
    if ctx.distributed:
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor.data, src=0)


def rank_batch(ctx: DistContext, global_batch: int) -> int:
    return per_rank_batch(global_batch, ctx.world_size)


def train_sampler(ctx: DistContext, targets: np.ndarray, weighted: bool, seed: int, generator: torch.Generator):
    """The training sampler: today's for one process; for many, each rank's seeded shard (class-balanced
    draws with ``weighted``), reshuffled by ``set_sampler_epoch``."""
    if not ctx.distributed:
        return weighted_sampler(targets, generator) if weighted else None
    if weighted:
        return DistributedWeightedSampler(targets, ctx.rank, ctx.world_size, seed)
    return train_shard_sampler(len(targets), ctx.rank, ctx.world_size, seed)


def shard_features(ctx: DistContext, backbone: nn.Module, dataset, shard_loader: Callable[[np.ndarray], Any],
                   compute, views: int, batch_size: int) -> TensorDataset:
    """Backbone features of every item of ``dataset`` (``views`` passes), each rank extracting its own shard.

    ``shard_loader(indices)`` gives the loader of those items; rows come back to every rank, placed as
    one process lays them out (view-major), so each image's features are computed exactly once.
    """
    n = len(dataset)
    indices = eval_shard(n, ctx.rank, ctx.world_size, batch_size)
    rows = np.zeros((0,), dtype=np.float32)
    global_rows = np.zeros(0, dtype=np.int64)
    if len(indices):
        local = extract_features(backbone, shard_loader(indices), compute, views)
        feats, positions = local.tensors[0].numpy(), local.tensors[2].numpy()
        view = np.arange(len(feats)) // len(indices)
        rows, global_rows = feats, view * n + indices[positions]
    features = gather_by_index(ctx, global_rows, rows, views * n)
    targets = np.tile(np.asarray(dataset.targets, dtype=np.int64), views)
    return TensorDataset(torch.from_numpy(features), torch.from_numpy(targets),
                         torch.from_numpy(np.tile(np.arange(n, dtype=np.int64), views)))
