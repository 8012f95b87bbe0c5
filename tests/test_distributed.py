"""Distributed building blocks (issue 18): process group, shards, exact evaluation, DDP wrapping, loss scaling.

The multi-process tests fork real ranks with the environment torchrun gives them (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and join them over gloo on the CPU, under a timeout, so a
hang fails the test instead of blocking CI.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import multiprocessing
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from imgclf.config.stages import per_rank_batch
from imgclf.data.cache import DecodedImages, decode_all
from imgclf.data.datasets import AugmentedBatches, CachedImages
from imgclf.data.samplers import (
    DistributedWeightedSampler,
    ShardView,
    eval_shard,
    place_rows,
    rank_seed,
    set_sampler_epoch,
    train_shard_sampler,
)
from imgclf.data.transforms import build_eval_transform
from imgclf.errors import ConfigError, DataError, ImgclfError
from imgclf.evaluation.evaluate import predict_probs
from imgclf.logs import get_rank
from imgclf.models.objective import Objective
from imgclf.runtime import Compute
from imgclf.training.distributed import (
    DistContext,
    GradScaling,
    broadcast_decision,
    exact_probs,
    gather_by_index,
    gather_objects,
    local_main_first,
    main_first,
    replicas_agree,
    resolve_backend,
    unused_parameters,
    unwrap,
    wrap,
)

from imagefactory import make_class_folders

CPU = torch.device("cpu")
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ---------------------------------------------------------------- one process: everything is a no-op


def test_without_torchrun_one_process_runs_and_every_helper_is_a_no_op(monkeypatch):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    ctx = DistContext.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.distributed, ctx.is_main) == (0, 1, 0, False, True)
    assert ctx.init(CPU, "auto", 5) == CPU and not torch.distributed.is_initialized()
    ctx.barrier()
    ctx.destroy()
    assert gather_objects(ctx, {"a": 1}) == [{"a": 1}]
    assert broadcast_decision(ctx, "stop") == "stop"
    model = nn.Linear(2, 2)
    assert wrap(model, ctx, CPU) is model and unwrap(model) is model
    assert replicas_agree(ctx, model)
    ran = []
    with local_main_first(ctx):
        ran.append(True)
    assert ran == [True]


def test_exact_probs_of_one_process_equal_todays_predict_probs():
    dataset, model = _toy_dataset(11), _toy_model()
    plain = predict_probs(model, Objective(3), DataLoader(dataset, batch_size=4), Compute(CPU))
    np.testing.assert_array_equal(exact_probs(model, Objective(3), dataset, 4, Compute(CPU), DistContext()), plain)


def test_the_torchrun_environment_is_read_with_rank_from_the_one_source_logs_uses(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    ctx = DistContext.from_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 8, 1) == (get_rank(), 8, 1)
    assert ctx.distributed and not ctx.is_main and not ctx.is_local_main


@pytest.mark.parametrize(("env", "fragment"), [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE='0'"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK='-1'"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 but WORLD_SIZE=2"),
    ({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
])
def test_a_bad_torchrun_environment_is_a_one_line_config_error(monkeypatch, env, fragment):
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as err:
        DistContext.from_env()
    assert fragment in str(err.value) and "torchrun" in str(err.value) and "\n" not in str(err.value)


def test_backend_device_and_timeout_choices():
    assert resolve_backend("auto", CPU) == "gloo"
    assert resolve_backend("auto", torch.device("cuda")) == "nccl"
    assert resolve_backend("gloo", torch.device("cuda")) == "gloo"
    with pytest.raises(ConfigError, match="nccl needs CUDA GPUs; use gloo"):
        resolve_backend("nccl", CPU)
    with pytest.raises(ConfigError, match="'mpi' is unknown; use one of auto, nccl, gloo"):
        resolve_backend("mpi", CPU)
    two = DistContext(rank=1, world_size=2, local_rank=1)
    assert two.device_for(CPU) == CPU
    with pytest.raises(ConfigError, match="each rank uses cuda:LOCAL_RANK; pass --device cuda or auto"):
        two.device_for(torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="not mps; use --device cpu"):
        two.device_for(torch.device("mps"))
    with pytest.raises(ConfigError, match="--dist-timeout 0 must be a positive number"):
        two.init(CPU, "gloo", 0)
    assert not torch.distributed.is_initialized()


def test_the_global_batch_splits_evenly_over_ranks_or_is_a_one_line_error():
    assert [per_rank_batch(12, w) for w in (1, 2, 3, 4, 6)] == [12, 6, 4, 3, 2]
    with pytest.raises(ConfigError) as err:
        per_rank_batch(10, 3)
    assert str(err.value) == ("--batch-size 10 is the global batch and cannot be split evenly over 3 processes; "
                              "use a multiple of 3 (e.g. 9 or 12)")
    with pytest.raises(ConfigError, match=r"multiple of 4 \(e.g. 4\)"):
        per_rank_batch(2, 4)


# ---------------------------------------------------------------- shards and samplers


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_shards_are_unpadded_runs_of_whole_batches_covering_every_index_once_in_order(world):
    for batch in (1, 3, 4):
        for length in range(0, 14):
            shards = [eval_shard(length, r, world, batch) for r in range(world)]
            assert np.concatenate(shards).tolist() == list(range(length))
            assert all(len(s) == 0 or s[0] % batch == 0 for s in shards)  # one process's batches, whole
            assert max(map(len, shards)) - min(map(len, shards)) <= batch
    assert [eval_shard(11, r, 3, 4).tolist() for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert [eval_shard(11, r, 2, 4).tolist() for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]


def test_place_rows_counts_a_padded_index_once_and_refuses_a_missing_one():
    rows = np.arange(22, dtype=np.float64).reshape(11, 2)
    padded = [np.array(list(s)) for s in (train_shard_sampler(11, r, 3, 0) for r in range(3))]  # 12 with a repeat
    assert sum(map(len, padded)) == 12
    np.testing.assert_array_equal(place_rows([(idx, rows[idx]) for idx in padded], 11), rows)
    with pytest.raises(RuntimeError, match="1 of 11 items received no rows"):
        place_rows([(np.arange(10), rows[:10])], 11)
    assert place_rows([(np.zeros(0, dtype=np.int64), np.zeros((0, 2)))], 0).shape == (0, 2)


def test_shard_view_keeps_positions_local_and_indices_say_whose_row_it_is():
    dataset = _toy_dataset(11)
    view = ShardView(dataset, eval_shard(11, 1, 2, 4))
    assert len(view) == 7
    image, target, position = view[2]
    assert position == 2 and torch.equal(image, dataset[6][0]) and target == dataset[6][1]


def test_the_training_shards_are_seeded_equal_in_length_and_reshuffled_by_set_epoch():
    shards = [train_shard_sampler(11, r, 3, seed=7) for r in range(3)]
    assert {len(s) for s in shards} == {4}
    first = [list(s) for s in shards]
    assert set().union(*map(set, first)) == set(range(11))
    assert first == [list(s) for s in (train_shard_sampler(11, r, 3, seed=7) for r in range(3))]
    for s in shards:
        s.set_epoch(1)
    assert [list(s) for s in shards] != first


def test_the_weighted_per_rank_draws_union_to_the_seeded_global_draw():
    targets = np.array([0] * 9 + [1] * 2)  # 9:2, so the draw must favour class 1 per image
    for world in (1, 2, 3):
        ranks = [DistributedWeightedSampler(targets, r, world, seed=5) for r in range(world)]
        for epoch in (0, 3):
            for sampler in ranks:
                sampler.set_epoch(epoch)
            draws = [list(s) for s in ranks]
            assert {len(d) for d in draws} == {math.ceil(11 / world)}
            interleaved = [d[i] for i in range(len(draws[0])) for d in draws]
            assert interleaved == ranks[0].global_draw().tolist()
    big = DistributedWeightedSampler(np.array([0] * 900 + [1] * 100), 0, 1, seed=0)
    share = float((np.array([0] * 900 + [1] * 100)[big.global_draw().numpy()] == 1).mean())
    assert 0.4 < share < 0.6  # class balanced, not 10 %


def test_each_rank_gets_its_own_augmentation_seed_and_rank_0_keeps_the_runs():
    seeds = [rank_seed(42, r) for r in range(4)]
    assert seeds[0] == 42 and len(set(seeds)) == 4 and seeds == [rank_seed(42, r) for r in range(4)]


def test_set_sampler_epoch_reaches_a_sampler_through_augmented_batches():
    sampler = train_shard_sampler(11, 0, 2, seed=0)
    loader = AugmentedBatches(DataLoader(_toy_dataset(11), batch_size=2, sampler=sampler), lambda x: x, CPU)
    set_sampler_epoch(loader, 4)
    assert sampler.epoch == 4
    set_sampler_epoch(DataLoader(_toy_dataset(3), batch_size=2), 4)  # a plain loader: nothing to tell


# ---------------------------------------------------------------- models


class _Net(nn.Module):
    """Conv features with BatchNorm, a frozen layer, a head, and optionally a trainable layer forward never uses."""

    def __init__(self, spare: bool = False):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.frozen = nn.Linear(4, 4).requires_grad_(False)
        self.head = nn.Linear(4, 3)
        self.spare = nn.Linear(4, 3) if spare else None

    def forward(self, x):
        return self.head(self.frozen(self.features(x)))


def test_the_unused_parameter_probe_skips_frozen_ones_and_leaves_no_trace():
    torch.manual_seed(0)
    sample = torch.randn(2, 3, 8, 8)
    assert unused_parameters(_Net(), sample) == []
    model = _Net(spare=True).eval()
    model.features[1].train()  # a mixed mode must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert unused_parameters(model, sample) == ["spare.weight", "spare.bias"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == [False, False, False, True, False, False, False, False,
                                                     False, False, False]
    assert all(p.grad is None for p in model.parameters())


class _Compiled(nn.Module):
    """What torch.compile returns, in the one respect unwrap reads: the model as the ``_orig_mod`` submodule.

    (The real OptimizedModule costs seconds of imports; this test is about the prefix.)
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self._orig_mod = model


def test_unwrap_removes_the_compile_prefix_and_sync_bn_on_the_cpu_is_refused():
    model = _Net()
    compiled = _Compiled(model)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap(compiled) is model
    with pytest.raises(ConfigError, match="--sync-bn needs CUDA GPUs"):
        wrap(model, DistContext(0, 2, 0), CPU, sync_bn=True)


def test_sync_bn_with_one_process_warns_that_it_does_nothing(caplog):
    model = _Net()
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert wrap(model, DistContext(), CPU, sync_bn=True) is model
    assert "warning: --sync-bn has no effect with one process" in caplog.text


# ---------------------------------------------------------------- fp16 loss scaling, on the CPU


def _sgd_step(scaling: GradScaling | None, poison: bool = False) -> tuple[nn.Linear, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(8, 4)).square().mean() * (math.inf if poison else 1.0)
    if scaling is None:
        loss.backward()
        optimizer.step()
    else:
        scaling.backward(loss)
        scaling.step(optimizer)
    return model, optimizer


def test_grad_scaling_is_on_only_for_fp16_and_steps_exactly_like_the_plain_calls():
    plain, _ = _sgd_step(None)
    for precision, enabled in (("fp16", True), ("bf16", False), ("fp32", False)):
        scaling = GradScaling(CPU, precision)
        assert scaling.enabled is enabled and scaling.scaler.is_enabled() is enabled
        scaled, _ = _sgd_step(scaling)
        for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_grad_scaling_skips_a_step_with_inf_gradients_and_halves_the_scale():
    scaling = GradScaling(CPU, "fp16")
    torch.manual_seed(0)
    untouched = nn.Linear(4, 2)
    model, _ = _sgd_step(scaling, poison=True)
    assert all(torch.equal(a, b) for a, b in zip(untouched.parameters(), model.parameters(), strict=True))
    assert scaling.scaler.get_scale() == 65536.0 / 2
    state = scaling.state_dict()
    again = GradScaling(CPU, "fp16")
    again.load_state_dict(state)
    assert again.scaler.get_scale() == 32768.0


# ---------------------------------------------------------------- real ranks (gloo, fresh interpreters)


def _toy_dataset(n: int):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 8, 8, generator=generator)
    return [(images[i], i % 3, i) for i in range(n)]


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    return _Net().eval()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(world: int, ranks: list[int], target, *args, timeout: float = 240) -> list[int]:
    """Fork ``ranks`` of a ``world``-rank job, each with torchrun's environment, to run ``target(*args)``.

    Forked, not fresh interpreters: each child starts with imgclf imported, so the test stays short on
    a busy 2-core machine. A rank still alive after ``timeout`` fails the test (every rank is ended).
    """
    port, fork = _free_port(), multiprocessing.get_context("fork")
    procs = [fork.Process(target=_as_rank, args=(rank, world, port, target, *args)) for rank in ranks]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    try:
        for proc in procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        assert not any(proc.is_alive() for proc in procs), f"a rank of {world} hung for {timeout} s"
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    return [proc.exitcode for proc in procs]


def _as_rank(rank: int, world: int, port: int, target, *args) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # as torchrun's OMP_NUM_THREADS=1
    target(*args)


def _join_rank(out: Path, timeout_s: float) -> None:
    """A rank whose peer never comes; its ImgclfError is what the CLI would print."""
    ctx = DistContext.from_env()
    try:
        ctx.init(CPU, "auto", timeout_s=timeout_s)
    except ImgclfError as err:
        (out / f"rank{ctx.rank}.txt").write_text(str(err), encoding="utf-8")
        sys.exit(2)


def _collectives_rank(out: Path, data: Path) -> None:
    ctx = DistContext.from_env()
    ctx.init(CPU, "auto", timeout_s=60)
    result = {**_waits(ctx, out), **_collective_checks(ctx, data)}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(result), encoding="utf-8")
    ctx.destroy()


def _decode_counted(ctx: DistContext, data: Path) -> tuple[DecodedImages, int]:
    """Every rank asks for the same 11 images on an empty cache; how many times did this rank decode them?"""
    builds: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: builds.append(record.getMessage())
    logger = logging.getLogger("imgclf.cache")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        paths = sorted(p for p in (data / "images").rglob("*") if p.is_file())[:11]
        with local_main_first(ctx):
            decoded = decode_all(paths, 16, 3, data / f"cache{ctx.world_size}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return decoded, sum("decoding 11 images once" in message for message in builds)


def _collective_checks(ctx: DistContext, data: Path) -> dict:
    decoded, builds = _decode_counted(ctx, data)
    targets = np.arange(11) % 3
    dataset = CachedImages(decoded.file, np.arange(11), targets, build_eval_transform([0.5] * 3, [0.25] * 3))
    probs = exact_probs(_toy_model(), Objective(3), dataset, 4, Compute(CPU), ctx)
    padded = np.array(list(train_shard_sampler(11, ctx.rank, ctx.world_size, seed=0)))
    weighted = DistributedWeightedSampler(targets, ctx.rank, ctx.world_size, seed=9)
    weighted.set_epoch(2)
    draws = gather_objects(ctx, list(weighted))
    return {"probs": probs.tolist(), "builds": builds, "cache": str(decoded.file),
            "dedup_equal": bool(np.array_equal(gather_by_index(ctx, padded, probs[padded], 11), probs)),
            "weighted_union": [d[i] for i in range(len(draws[0])) for d in draws],
            "weighted_global": weighted.global_draw().tolist(),
            "decision": broadcast_decision(ctx, {"stop": ctx.rank == 0, "from": ctx.rank}),
            **_ddp_training(ctx, dataset)}


def _set_collective_timeout(seconds: float) -> None:
    """The default group's timeout from now on (``set_timeout`` in newer torch, ``_set_pg_timeout`` in older)."""
    setter = getattr(torch.distributed, "set_timeout", None) or torch.distributed.distributed_c10d._set_pg_timeout
    setter(datetime.timedelta(seconds=seconds))


def _waits(ctx: DistContext, out: Path) -> dict:
    """Leaders that take longer than the collective timeout, or fail, never strand the other ranks."""
    if ctx.distributed:  # a plain barrier would now give up while the leader works
        _set_collective_timeout(2)
    with local_main_first(ctx):
        if ctx.is_local_main and ctx.distributed:
            time.sleep(4)  # a slow cache build
    with main_first(ctx):
        if ctx.is_main:
            (out / "written by rank 0").write_text("run files", encoding="utf-8")
        saw_rank0_file = (out / "written by rank 0").exists()
    released = False
    try:
        with local_main_first(ctx):
            if ctx.is_local_main:
                raise DataError("cannot read image x.png")
            released = True
    except DataError:
        released = True
    if ctx.distributed:
        _set_collective_timeout(60)
    return {"saw_rank0_file": saw_rank0_file, "released": released}


def _ddp_training(ctx: DistContext, dataset) -> dict:
    """Two epochs of DDP with fp16 loss scaling's code path; weights must agree bit for bit across ranks."""
    torch.manual_seed(ctx.rank)  # different on purpose: DDP must start every rank from rank 0's weights
    model = _Net(spare=True)
    ddp = wrap(model, ctx, CPU, sample=torch.zeros(2, 3, 16, 16))
    sampler = train_shard_sampler(len(dataset), ctx.rank, ctx.world_size, seed=0)
    loader = DataLoader(dataset, batch_size=per_rank_batch(6, ctx.world_size), sampler=sampler)
    optimizer = torch.optim.SGD((p for p in unwrap(ddp).parameters() if p.requires_grad), lr=0.1)
    scaling = GradScaling(CPU, "fp16")
    objective = Objective(3)
    for epoch in (1, 2):
        set_sampler_epoch(loader, epoch)
        for images, targets, _ in loader:
            optimizer.zero_grad(set_to_none=True)
            scaling.backward(objective.loss(ddp(images), targets))
            scaling.step(optimizer)
    differed = not replicas_agree(ctx, ddp)  # each rank's last batch moved its own BatchNorm statistics
    gathered = exact_probs(ddp, objective, dataset, 4, Compute(CPU), ctx)  # syncs the buffers first
    alone = predict_probs(unwrap(ddp), objective, DataLoader(dataset, batch_size=4), Compute(CPU))
    return {"differed": differed, "agree": replicas_agree(ctx, ddp), "trained_exact": np.array_equal(gathered, alone),
            "find_unused": bool(getattr(ddp, "find_unused_parameters", False)),
            "keys": sorted(unwrap(ddp).state_dict()), "ddp_keys": sorted(ddp.state_dict())}


def test_ranks_evaluate_exactly_train_in_step_and_build_the_cache_once_at_world_sizes_1_2_3(tmp_path):
    """World size 1 runs here, in this process, exactly as a run without torchrun; 2 and 3 as real ranks.

    Every rank starts on an empty decode cache; the leader waits include one longer than the collective timeout.
    """
    make_class_folders(tmp_path / "images", per_class=4)  # 12 images; the ranks use 11
    for world in (1, 2, 3):
        (tmp_path / f"out{world}").mkdir()
    results = {1: [{**_waits(DistContext(), tmp_path / "out1"), **_collective_checks(DistContext(), tmp_path)}]}
    for world in (2, 3):
        assert _run_ranks(world, list(range(world)), _collectives_rank, tmp_path / f"out{world}", tmp_path) == \
            [0] * world
        results[world] = [json.loads((tmp_path / f"out{world}" / f"rank{r}.json").read_text()) for r in range(world)]
    reference = results[1][0]["probs"]
    assert len(reference) == 11 and not np.isnan(reference).any()
    for world, ranks in results.items():
        assert sum(r["builds"] for r in ranks) == 1, f"world {world}: the cache was decoded more than once"
        assert len({r["cache"] for r in ranks}) == 1
        for r in ranks:
            assert r["probs"] == reference, f"world {world}: predictions differ from one process"
            assert r["dedup_equal"] and r["weighted_union"] == r["weighted_global"]
            assert r["decision"] == {"stop": True, "from": 0}
            assert r["agree"] and not any(k.startswith("module.") for k in r["keys"])
            assert r["differed"] is (world > 1) and r["trained_exact"]
            assert r["saw_rank0_file"] and r["released"]
            assert r["find_unused"] is (world > 1)  # the spare layer; one process has no DDP at all
        if world > 1:
            assert all(k.startswith("module.") for k in ranks[0]["ddp_keys"])


def test_a_rank_whose_peer_never_joins_ends_within_the_timeout_with_one_line(tmp_path):
    """Rank 0 alone waits for a worker that never comes; rank 1 alone (another job) finds no rank 0 to reach.

    ``_run_ranks``'s timeout is the hang guard: the ranks must end on their own, with the error the CLI prints.
    """
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert _run_ranks(2, [0], _join_rank, tmp_path / "a", 2.0, timeout=120) == [2]
    assert _run_ranks(2, [1], _join_rank, tmp_path / "b", 2.0, timeout=120) == [2]
    for rank, folder in ((0, "a"), (1, "b")):
        message = (tmp_path / folder / f"rank{rank}.txt").read_text(encoding="utf-8")
        assert message.startswith(f"rank {rank} of 2 could not join the others at 127.0.0.1:")
        assert "within 2 s" in message and message.endswith("or raise --dist-timeout")
        assert "\n" not in message and len(message) < 500
