"""Runs on several processes: exact predictions of a run's split, ``evaluate`` under torchrun, and
``imgclf train --nproc N``, which starts the same command through torch's own launcher.

``--nproc N`` is ``torchrun --standalone --nproc-per-node N -m imgclf ARGS`` run in this process
(torch.distributed.run; no process management of ours). On the CPU each process gets an equal
share of the cores (OMP_NUM_THREADS, unless already set), where torchrun alone would give each 1.
"""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from imgclf.data.pipeline import PreparedData, prepare
from imgclf.data.transforms import build_eval_transform
from imgclf.errors import ConfigError, ImgclfError, RunDirError
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.reporting.evalplots import redraw_after_scoring
from imgclf.reporting.html import refresh_report
from imgclf.runs.base import load_run
from imgclf.runs.network import NetworkRun
from imgclf.runtime import exact_fp32
from imgclf.training.ddp import DistSettings, main_only, one_voice
from imgclf.training.distributed import DistContext, exact_probs, local_main_first

log = get_logger("distributed")


def exact_predictions(run: NetworkRun, split: str, prepared: PreparedData, ctx: DistContext,
                      device: torch.device, tta: str | None = None) -> Predictions:
    """``run.probabilities(split)`` with every rank predicting its unpadded shard on ``device``; all get all.

    The same batches as one process (the run's batch size, in dataset order) and the run's own
    prediction settings (fp32), so the same digits.
    """
    if split not in prepared.index.splits:
        raise RunDirError(f"the run has no {split!r} split (it has {sorted(set(prepared.index.splits))})")
    pre = run.preprocess
    dataset = prepared.dataset(split, build_eval_transform(pre.mean, pre.std))
    compute = replace(run.compute, device=device)
    model = run.model.to(device)
    with exact_fp32(device):
        probs = exact_probs(model, run.objective, dataset, run.batch_size, compute, ctx,
                            tta or run.config.evaluate.tta, run.config.data.workers)
    return Predictions.of_index(prepared.index.subset(split), probs, run.classes)


def evaluate_on_ranks(run_dir: str | Path, split: str, data_root: str | None, tta: str | None,
                      threshold: str | None, dist: DistSettings) -> tuple[NetworkRun, float | None, dict]:
    """``imgclf evaluate`` under torchrun: (run, the threshold chosen when ``threshold`` is given, metrics).

    Rank 0 alone writes predictions_<split>.csv, metrics.json, plots and the report.
    """
    ctx = DistContext.from_env()
    try:
        run = one_voice(ctx, lambda: load_run(run_dir))
        if type(run) is not NetworkRun:  # an ensemble or a --head run is a NetworkRun subclass
            one_voice(ctx, _refuse_kind)
        one_voice(ctx, lambda: run.refuse_threshold_on_other_tta(threshold, tta))
        device = ctx.init(run.compute.device, dist.backend, dist.timeout_s)
        with local_main_first(ctx):
            prepared = one_voice(ctx, lambda: prepare(run.index(data_root), run.preprocess, run.config.data))
        chosen = None
        if threshold:
            val = exact_predictions(run, "val", prepared, ctx, device, tta)
            chosen = main_only(ctx, lambda: run.choose_threshold(threshold, val, run.foreign_root(data_root)))
        if threshold and split == "val":
            metrics = main_only(ctx, lambda: run.metrics["val"])
        else:
            preds = exact_predictions(run, split, prepared, ctx, device, tta)
            metrics = main_only(ctx, lambda: run.score(preds, split, tta, run.foreign_root(data_root)))
        main_only(ctx, lambda: _draw_and_report(run, set(run.metrics) if threshold else {split}))
        return run, chosen, metrics
    finally:
        ctx.destroy()


def _draw_and_report(run: NetworkRun, splits: set[str]) -> None:
    redraw_after_scoring(run, splits)
    refresh_report(run)


def _refuse_kind() -> None:
    raise ConfigError("under torchrun, evaluate runs network runs only (an ensemble or a --head run evaluates on "
                      "one process); run it without torchrun")


def launch(nproc: int, argv: list[str]) -> int:
    """``imgclf ARGV`` on ``nproc`` local processes through torch.distributed.run; its exit status.

    The command line has split every stage's global batch over ``nproc`` before (``cli.checks``).
    A rank that ends with an error has said why itself; a rank killed by a signal is said here.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be 1 or more processes")
    if os.environ.get("WORLD_SIZE") or os.environ.get("TORCHELASTIC_RUN_ID"):
        raise ConfigError("--nproc starts torchrun itself; under torchrun drop --nproc")
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        os.environ["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m", "imgclf", *argv])
    try:
        run(args)
    except ChildFailedError as err:
        # a signal first, and another than the SIGTERM with which torchrun stops the others
        killed = sorted((failure.exitcode == -signal.SIGTERM, rank) for rank, failure in err.failures.items()
                        if failure.exitcode < 0)
        if not killed:
            return err.get_first_failure()[1].exitcode
        rank = killed[0][1]
        failure = err.failures[rank]
        raise ImgclfError(f"rank {rank} of {nproc} (pid {failure.pid}) was killed by "
                          f"{_signal_name(-failure.exitcode)}, so torchrun stopped the others; continue from the "
                          "last complete epoch with imgclf train --resume RUN") from None
    return 0


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
