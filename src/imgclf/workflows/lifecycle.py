"""A run's life: check the config against the data, create (or reopen) the run directory, write
its files; at the end evaluate, seal and report. Shared by every kind of training.

With several processes (torchrun) every rank joins, checks and decodes (the decode cache once per
machine); rank 0 alone creates and writes the run directory and tells the others its path; at the
end every rank predicts its shard of val and test and rank 0 writes the results.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from imgclf import atomic
from imgclf.config import Config, config_to_yaml
from imgclf.config.stages import resolve_stages
from imgclf.data.index import DatasetIndex, build_index
from imgclf.data.pipeline import PreparedData, prepare, refuse_lost_classes, write_skipped
from imgclf.data.samplers import rank_seed
from imgclf.data.trainchecks import warn_imbalance, warn_leakage
from imgclf.errors import ConfigError
from imgclf.evaluation.predictions import Predictions
from imgclf.models.networks import (
    Preprocess,
    check_input_size,
    check_model_name,
    output_units,
    resolve_preprocess,
)
from imgclf.reporting.evalplots import draw_evaluations
from imgclf.reporting.html import write_report
from imgclf.reporting.plots import write_summary
from imgclf.runs import manifest
from imgclf.runs.base import KIND_FILE, Run, open_run, write_kind
from imgclf.runs.manifest import INCOMPLETE
from imgclf.runs.saved_split import load_saved_split
from imgclf.runtime import Compute, get_logger, is_main_process, release_freed_memory, seed_everything
from imgclf.training.ddp import DistSettings, backend_name, check_world, main_only, one_voice
from imgclf.training.distributed import DistContext, local_main_first
from imgclf.versions import library_versions
from imgclf.workflows import runlock
from imgclf.workflows.baselines import baseline_rows, write_baselines
from imgclf.workflows.distributed import exact_predictions
from imgclf.workflows.init_from import check_weights_file, init_weights
from imgclf.workflows.plan import plan_lines
from imgclf.workflows.settings import (
    check_binary_settings,
    check_paths,
    refuse_without_validation,
    unused_settings,
    warn_replaced_settings,
)

log = get_logger("lifecycle")


INCOMPLETE_NOTE = ("This imgclf run has not finished (it is running, failed or was killed). Continue it with\n"
                   "`imgclf train --resume DIR`, or train again with the same --out to replace it.\n")


RUN_ENTRIES = (INCOMPLETE, KIND_FILE, "config.yaml", "classes.json", "dataset.json", "split.csv", "skipped_images.csv",
               "history.csv", "metrics.json", "threshold.json", "model.safetensors", "model.json",
               "best.safetensors", "best.json", "head.skops", "summary.md", "result.json", "manifest.json",
               "report.html", "predictions_*.csv", "plots", "resume", ".*.tmp", "candidates", "selection.json")


@dataclass
class RunSetup:
    """What every kind of training starts from: the checked config, decoded data and the run directory."""

    config: Config
    out: Path
    prepared: PreparedData
    preprocess: Preprocess
    compute: Compute
    generator: torch.Generator
    init_weights: Path | None = None  # --init-from: the trained run's weights file, checked against this model
    ctx: DistContext = field(default_factory=DistContext)  # this process's place among torchrun's ranks

    @property
    def index(self) -> DatasetIndex:
        return self.prepared.index

    @property
    def meta(self) -> dict:
        n = len(self.index.classes)
        return {"model": self.config.model.model_dump(), "classes": list(self.index.classes),
                "preprocess": self.preprocess.to_dict(), "output_units": output_units(self.config.model, n)}


def setup_run(config: Config, resume_dir: Path | None = None, ctx: DistContext | None = None,
              dist: DistSettings | None = None) -> RunSetup:
    """Check the config against the data, decode the images, and create (or reopen) the run directory.

    Everything that can be refused is refused before the run directory is made: model and device
    settings first (no data read), then the world size (joining the other ranks), then the data. A
    resume reads its saved split, never a new one. Errors every rank meets alike are said by rank 0.
    """
    ctx, dist = ctx or DistContext(), dist or DistSettings()
    if resume_dir is None:  # a resumed run keeps the paths it began with
        one_voice(ctx, lambda: check_paths(config))
    compute, preprocess = one_voice(ctx, lambda: _check_settings(config))
    check_world(ctx, [cfg.batch_size for _, cfg in resolve_stages(config)], compute.device, config.train.sync_bn)
    if ctx.distributed:  # after the checks that need no other rank: a wrong setting never waits for peers
        compute = replace(compute, device=ctx.init(compute.device, dist.backend, dist.timeout_s))
        log.info("%d processes (%s): the global batch is split evenly over them%s", ctx.world_size, backend_name(),
                 "; --max-seconds ends training between epochs only (an epoch is never given up part-way)"
                 if config.train.max_seconds else "")
    else:
        ctx.init(compute.device, dist.backend, dist.timeout_s)  # checks the flags; joins nobody
    generator = seed_everything(rank_seed(config.train.seed, ctx.rank))  # rank 0 keeps the run's seed
    index, warnings = one_voice(ctx, lambda: _dataset_index(config, resume_dir))
    refit = resume_dir is None or config.model.head != "linear"  # a resumed network starts from its checkpoint
    start = one_voice(ctx, lambda: init_weights(config, index.classes, preprocess)) if refit else None
    with local_main_first(ctx):  # one rank per machine decodes; the others then read its cache entry
        prepared = one_voice(ctx, lambda: prepare(index, preprocess, config.data))
    one_voice(ctx, lambda: refuse_lost_classes(prepared))
    if resume_dir is None:
        out = Path(main_only(ctx, lambda: str(_create_run(config, prepared, warnings))))
        config = config.model_copy(update={"out": str(out), "versions": library_versions()})
    else:
        out = resume_dir
        main_only(ctx, lambda: runlock.claim(out))
    log.info("data: %s", ", ".join(f"{s} {sum(c.values())}" for s, c in prepared.index.counts().items()))
    stages = resolve_stages(config)
    for line in plan_lines(config, preprocess, stages, config.train.init_from):
        log.info("%s", line)
    for line in unused_settings(config, stages) if config.model.head == "linear" else []:
        log.warning("%s", line)
    return RunSetup(config, out, prepared, preprocess, compute, generator, start, ctx)


def _check_settings(config: Config) -> tuple[Compute, Preprocess]:
    """Model, device and stage settings, checked before any data is read."""
    check_model_name(config.model.name)
    check_weights_file(config)
    compute = Compute.resolve(config.train.device, config.train.precision, config.train.channels_last)
    resolve_stages(config)  # stage settings fail here, before any decoding
    warn_replaced_settings(config)
    preprocess = resolve_preprocess(config.model, config.data.image_size, config.data.channels,
                                    config.data.interpolation)
    check_input_size(config.model, preprocess)  # before seeding: the probe model draws no seeded numbers
    return compute, preprocess


def _create_run(config: Config, prepared: PreparedData, warnings: list[str]) -> Path:
    out = new_run_dir(config.out)
    config = config.model_copy(update={"out": str(out), "versions": library_versions()})
    _write_run_files(out, config, prepared, warnings)
    return out


def _dataset_index(config: Config, resume_dir: Path | None) -> tuple[DatasetIndex, list[str]]:
    """The split to train on (drawn now, or the resumed run's saved one) and its data warnings."""
    if resume_dir is None:
        split_seed = config.train.seed if config.data.split_seed is None else config.data.split_seed
        index = build_index(config.data, split_seed)
    else:
        index = load_saved_split(resume_dir, config.data)
    check_binary_settings(config, index.classes)
    warnings = warn_leakage([index.abspath(i) for i in range(len(index))], list(index.splits), list(index.labels))
    balanced = config.train.class_weight == "balanced" or config.train.sampler == "weighted"
    warnings += warn_imbalance(index.counts().get("train", {}), balanced)
    if "val" not in index.splits:
        refuse_without_validation(config, resolve_stages(config), resumed=resume_dir is not None)
    return index, warnings


def finish_run(s: RunSetup, evaluate_test: bool, best_epoch: int | None, val_probs: np.ndarray | None = None) -> Run:
    """Evaluate val, choose the threshold on it, evaluate test once; write the summary, seal, report.

    ``val_probs``: the saved weights' val probabilities if training computed them as ``run.probabilities``
    would (``StageRunner.final_val_probs``)."""
    run = open_run(s.out)  # not load_run: the run is sealed only at the end of this function
    if s.ctx.distributed:
        return _finish_on_ranks(s, run, evaluate_test, best_epoch)
    if "val" in s.index.splits:
        # scored once, at the threshold chosen on it, before test is read
        run.choose_threshold(s.config.evaluate.threshold, _val_predictions(s, run, val_probs))
    if evaluate_test and "test" in s.index.splits:  # the final model, once
        run.evaluate("test", prepared=s.prepared)
    # The final predictions reused the memory training kept (the same model and batches); it goes back now,
    # so that the baselines' peak (another network, other batches) does not stack on it
    release_freed_memory()
    _conclude(s, run, best_epoch, evaluate_test)
    return run


def _val_predictions(s: RunSetup, run: Run, probs: np.ndarray | None) -> Predictions:
    if probs is None:
        return run.probabilities("val", prepared=s.prepared)
    log.debug("validation predictions: the last validation's of the saved weights (computed as evaluate does)")
    val = s.index.subset("val")
    return Predictions.of_index(val, probs, run.classes)


def _finish_on_ranks(s: RunSetup, run: Run, evaluate_test: bool, best_epoch: int | None) -> Run:
    """``finish_run`` on several processes: every rank predicts its shards, rank 0 scores and writes."""
    if "val" in s.index.splits:
        val = exact_predictions(run, "val", s.prepared, s.ctx, s.compute.device)
        main_only(s.ctx, lambda: run.choose_threshold(s.config.evaluate.threshold, val))
    if evaluate_test and "test" in s.index.splits:
        test = exact_predictions(run, "test", s.prepared, s.ctx, s.compute.device)
        main_only(s.ctx, lambda: run.score(test, "test"))
    release_freed_memory()  # on every rank, as in finish_run
    main_only(s.ctx, lambda: _conclude(s, run, best_epoch, evaluate_test))
    return run


def _conclude(s: RunSetup, run: Run, best_epoch: int | None, evaluate_test: bool) -> None:
    # Baselines on the same images; the probe only for a final model (trials choose on val: seconds each)
    config = s.config if evaluate_test else s.config.model_copy(
        update={"evaluate": s.config.evaluate.model_copy(update={"baseline": False})})
    if "val" in run.metrics or "test" in run.metrics:
        splits = [split for split in ("val", "test") if split in run.metrics]
        write_baselines(s.out, baseline_rows(s.prepared, s.preprocess, s.compute, config, splits))
    write_summary(s.out, s.config.model_dump(mode="json"), s.index.counts(), run.metrics, best_epoch,
                  resolve_stages(s.config)[-1][1].restore_best)
    draw_evaluations(run, ("val", "test"))
    if is_main_process():
        manifest.seal(s.out)
        mark_finished(s.out)  # finished and sealed: the report below reads it as any later command does
    if s.config.evaluate.report and is_main_process():
        write_report(s.out)
    log.info("run written to %s", s.out)


def new_run_dir(out: str | None) -> Path:
    """An empty run directory marked INCOMPLETE until finish_run ends; an unfinished one is reused."""
    path = Path(out) if out else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file; choose a folder for the run")
    path.mkdir(parents=True, exist_ok=True)
    runlock.claim(path)  # before its files are judged: a live run's are not a killed one's
    if any(path.iterdir()):
        reuse_unfinished_run(path)
    atomic.write_text(path / INCOMPLETE, INCOMPLETE_NOTE)
    (path / "plots").mkdir(exist_ok=True)
    return path


def _write_run_files(out: Path, config: Config, prepared: PreparedData, warnings: list[str]) -> None:
    index = prepared.index
    write_kind(out, "network" if config.model.head == "linear" else "classical")
    atomic.write_text(out / "config.yaml", config_to_yaml(config))
    atomic.write_json(out / "classes.json", list(index.classes))
    atomic.write_json(out / "dataset.json", {"root": str(index.root), "counts": index.counts(),
                                             "skipped": [[str(b.path), b.reason] for b in prepared.skipped],
                                             "warnings": warnings})
    index.save(out / "split.csv")
    if prepared.skipped:
        write_skipped(prepared, out / "skipped_images.csv")


def reuse_unfinished_run(path: Path) -> None:
    """Empty a failed or killed run's directory for a new run; refuse any other non-empty folder."""
    if not (path / INCOMPLETE).is_file():
        finished = (path / "config.yaml").is_file()
        raise ConfigError(f"run directory {path} already exists and "
                          + ("holds a finished run" if finished else "is not empty (it is not an imgclf run)")
                          + "; choose another --out or delete it")
    ours = {entry for pattern in RUN_ENTRIES for entry in path.glob(pattern)}
    for entry in ours:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    kept = sorted(entry.name for entry in path.iterdir())
    log.warning("warning: %s holds an unfinished run (failed or killed); replacing its files%s "
                "(to continue it instead: imgclf train --resume %s)", path,
                f", keeping {len(kept)} imgclf did not write ({', '.join(kept[:3])})" if kept else "", path)


def mark_finished(out: Path) -> None:
    """The last step of a run: without the marker, the directory is a finished run no rerun replaces."""
    (out / INCOMPLETE).unlink(missing_ok=True)
    runlock.release(out)
