"""``train(config) -> Run``: the one function behind ``imgclf train`` and ``imgclf demo``.

Under torchrun (``imgclf train --nproc N`` starts it) every rank calls ``train``: it joins the
others, trains its shard of each global batch in DDP, and rank 0 writes the run. One process
trains exactly as it always has.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from imgclf import atomic
from imgclf.config import Config
from imgclf.config.stages import resolve_stages
from imgclf.errors import ConfigError, RunDirError
from imgclf.models.checkpoint import load_weights, save_weights
from imgclf.models.networks import (
    build_model,
)
from imgclf.models.objective import Objective, balanced_class_weights
from imgclf.reporting.plots import plot_curves, write_history
from imgclf.runs.base import Run, open_run
from imgclf.runs.files import read_model_file
from imgclf.runs.manifest import INCOMPLETE, MANIFEST_FILE
from imgclf.runs.network import MODEL_FILE
from imgclf.runtime import get_logger, is_main_process
from imgclf.training.averaging import BestWeights, average_if_better
from imgclf.training.ddp import DistSettings, broadcast_module, main_only, one_voice
from imgclf.training.distributed import DistContext, local_main_first
from imgclf.training.fit import count
from imgclf.training.resume import for_rank, load_state, refuse_edited_config, restore_best_file
from imgclf.training.stages import StageRunner
from imgclf.workflows.classical import train_classical
from imgclf.workflows.lifecycle import RunSetup, finish_run, setup_run

log = get_logger("train")

# What imgclf writes into a run directory: replaced when an unfinished run's --out is reused.


def resume_training(run_dir: str | Path, dist: DistSettings | None = None) -> Run:
    """Continue a killed ``train`` from its last completed epoch (``imgclf train --resume RUN``)."""
    run_dir = Path(run_dir)
    if (run_dir / "candidates").is_dir() and not (run_dir / "config.yaml").exists():
        raise RunDirError(f"{run_dir} is a default run (no --model) stopped while it tried its candidates, which "
                          f"cannot be resumed; run the same `imgclf train DATA --out {run_dir}` again: it starts over "
                          "in that folder")
    if run_dir.is_dir() and not (run_dir / INCOMPLETE).exists() and (run_dir / MANIFEST_FILE).is_file():
        raise RunDirError(f"{run_dir} has finished: --resume continues a killed or failed run (re-finishing this one "
                          "would score test again and drop an evaluate --threshold); to train on from it: imgclf "
                          f"train DATA --init-from {run_dir} --out NEW")
    config = open_run(run_dir).config
    refuse_edited_config(run_dir)
    return train(config, resume_dir=run_dir, dist=dist)


def train(config: Config, evaluate_test: bool = True, resume_dir: Path | None = None,
          dist: DistSettings | None = None) -> Run:
    """Scan, split, decode, train with early stopping, then evaluate val and test once; return the Run.

    ``evaluate_test=False`` leaves the test split untouched (model selection: grid trials). A
    scikit-learn head (``model.head`` svm, logreg, knn, rf) is fitted on frozen backbone features.
    ``dist``: how the ranks join when torchrun started several (RANK, WORLD_SIZE in the environment).
    """
    ctx = DistContext.from_env()
    if config.model.head != "linear":
        if ctx.distributed:
            one_voice(ctx, lambda: _refuse_head(config.model.head))
        return train_classical(config, evaluate_test, resume_dir=resume_dir)
    try:
        s = setup_run(config, resume_dir, ctx, dist)
        with atomic.naming(s.out):  # a write that names no file names the run
            return _fit_and_finish(s, evaluate_test, resume_dir)
    finally:
        ctx.destroy()


def _refuse_head(head: str) -> None:
    raise ConfigError(f"--head {head} fits a scikit-learn model in one process; run it without torchrun or --nproc")


def _fit_and_finish(s: RunSetup, evaluate_test: bool, resume_dir: Path | None) -> Run:
    config, out, index, ctx = s.config, s.out, s.index, s.ctx
    # A resumed run takes its weights from the saved state, an --init-from run from its source run:
    # no pretrained download first.
    with local_main_first(ctx):  # a download once per machine
        model = one_voice(ctx, lambda: build_model(config.model, len(index.classes), s.preprocess,
                                                   load_pretrained=resume_dir is None and s.init_weights is None))
    if resume_dir is None and s.init_weights is not None:
        load_weights(model, s.init_weights)
    model = s.compute.prepare(model)
    broadcast_module(ctx, model)  # several processes: every rank starts from rank 0's weights
    objective = Objective(len(index.classes), sigmoid=s.meta["output_units"] == 1,
                          class_weights=_class_weights(config, index.subset("train").targets, index.classes),
                          label_smoothing=config.train.label_smoothing)
    keep_best = resolve_stages(config)[-1][1].restore_best  # the last stage decides what the run ends with
    weights_path = out / (MODEL_FILE if keep_best else "best.safetensors")
    best = {"epoch": None}
    recent_bests = BestWeights(config.train.average_best)

    def save_best(epoch: int) -> None:
        best["epoch"] = epoch
        recent_bests.add(model, epoch)
        if is_main_process():
            save_weights(model, weights_path, {**s.meta, "epoch": epoch})

    start = time.perf_counter()

    def load_best() -> None:
        ctx.barrier()  # rank 0 has written the file
        load_weights(model, weights_path)

    def on_epoch(history: list[dict]) -> None:
        if ctx.is_main:
            write_history(history, out / "history.csv")

    runner = StageRunner(model, objective, s.prepared, config, s.preprocess, s.compute, s.generator, save_best,
                         load_best=load_best, on_epoch=on_epoch, out=out, best_file=weights_path, ctx=ctx)
    resume = None
    if resume_dir is not None:
        resume = for_rank(out, load_state(out, model), ctx.rank, ctx.world_size, s.generator)
        main_only(ctx, lambda: restore_best_file(out, weights_path, model, read_model_file))
        best["epoch"] = resume[1]["stopper"]["best_epoch"]
        log.info("resuming %s after epoch %d", out, resume[1]["epoch"])
    history = runner.run(resume)
    log.info("trained %s in %.1f s", count(len(history), "epoch"), time.perf_counter() - start)
    averaged = keep_best and len(recent_bests) > 1 and average_if_better(model, recent_bests, runner, s.meta,
                                                                          weights_path)  # every rank validates
    val_probs = None if averaged else runner.final_val_probs(saved_at_best=keep_best)

    def write_final() -> None:
        if not keep_best:
            save_weights(model, out / MODEL_FILE, {**s.meta, "epoch": len(history)})
        kept = "" if keep_best else ", not kept"
        plot_curves(history, atomic.inner_folder(out, "plots") / "curves.png", best["epoch"],
                    f"best {config.train.monitor}{kept}")

    main_only(ctx, write_final)
    return finish_run(s, evaluate_test, best["epoch"], val_probs)


def _class_weights(config: Config, targets, classes) -> torch.Tensor | None:
    if config.train.class_weight == "none":
        return None
    weights = balanced_class_weights(targets, len(classes))
    log.info("class weights (balanced): %s", ", ".join(f"{c}={w:.3f}" for c, w in zip(classes, weights, strict=True)))
    return torch.as_tensor(weights, dtype=torch.float32)
