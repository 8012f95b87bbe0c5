"""``imgclf train DATA`` with no model chosen: try the candidates within a time budget, keep the best.

The candidates (``workflows.candidates``) train one after another, each into
``OUT/candidates/<name>/`` as a complete run that never reads test. The one with the best
validation macro-F1 (ties: lower validation log loss) is moved up into ``OUT`` and is the run:
only it reads the test split, once. The others stay under ``OUT/candidates/`` and appear in
metrics.json's ``baselines`` and the report, next to the majority class and the linear probe.

Time: each candidate gets a share of what is left of ``--budget`` (its ``max_seconds``;
training stops at an epoch's end and keeps its best epoch). The first, cheapest candidate always
runs; a later one is skipped, with a line saying so, when too little is left, or when validation
is already perfect (nothing can beat it). The selection is recorded in ``OUT/selection.json``.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from imgclf import atomic
from imgclf.config import Config, config_to_yaml
from imgclf.data.index import build_index
from imgclf.data.pipeline import PreparedData, prepare
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.reporting.html import write_report
from imgclf.reporting.plots import draw_evaluations, write_summary
from imgclf.runs import manifest
from imgclf.runs.base import Run, load_run, open_run
from imgclf.workflows.baselines import baseline_rows, row_metrics, write_baselines
from imgclf.workflows.candidates import (
    CANDIDATES,
    PROBE_CANDIDATE,
    SLUGS,
    candidate_config,
    pretrained_input_size,
)
from imgclf.workflows.lifecycle import mark_finished, new_run_dir
from imgclf.workflows.train import train

log = get_logger("auto")

DEFAULT_BUDGET_S = 120.0
MIN_CANDIDATE_S = 10.0  # less than this left: a candidate could not train an epoch that counts
# Share of the remaining budget each candidate may use; the last one takes what is left.
SHARES = {"linear probe": 1.0, "small CNN": 0.4, "fine-tuned EfficientNet-Lite0": 1.0}
SELECTION_FILE = "selection.json"


def train_auto(config: Config, budget_s: float = DEFAULT_BUDGET_S, evaluate_test: bool = True) -> Run:
    """Train the candidates on ``config``'s data within ``budget_s``; return the chosen run (in ``config.out``)."""
    if not budget_s > 0:
        raise ConfigError(f"--budget {budget_s:g}: give the seconds the default may spend, e.g. --budget 120")
    start = time.perf_counter()
    size = _pretrained_size(config)  # scans the data first: a missing or empty folder makes no run directory
    out = new_run_dir(config.out)
    log.info("no --model given: trying %s within %.0f s, chosen on validation macro-F1 (--model X trains one model)",
             ", then ".join(CANDIDATES), budget_s)
    tried = _train_candidates(config, out, start + budget_s, size)
    name, winner = max(tried.items(), key=lambda item: _rank(item[1]["val"]))
    log.info("chose %s: %s", name, _why(name, tried))
    run = _promote(out, winner["path"], config)
    prepared = prepare(run.index(), run.preprocess, run.config.data)  # the chosen run's images, read once
    if evaluate_test and "test" in prepared.index.splits:
        run.evaluate("test", prepared=prepared)
    rows = _rows(run, prepared, tried, name, evaluate_test)
    write_baselines(out, rows)
    write_summary(out, run.config.model_dump(mode="json"), prepared.index.counts(), run.metrics, run.meta.epoch)
    draw_evaluations(run, ("val", "test"))
    atomic.write_json(out / SELECTION_FILE, {"chosen": name, "budget_s": budget_s,
                                             "seconds": round(time.perf_counter() - start, 1),
                                             "candidates": {n: _summary(t) for n, t in tried.items()}})
    manifest.seal(out)
    mark_finished(out)
    if config.evaluate.report:
        write_report(out)
    return load_run(out)


def _pretrained_size(config: Config) -> int:
    """The pretrained candidates' input size from the training images (``candidates.pretrained_input_size``)."""
    split_seed = config.train.seed if config.data.split_seed is None else config.data.split_seed
    index = build_index(config.data, split_seed)
    if "val" not in index.splits:
        raise ConfigError("no validation images: the default chooses among its candidates on them; raise "
                          "--val-fraction, or pass --model to train one model")
    train_part = index.subset("train")
    return pretrained_input_size([train_part.abspath(i) for i in range(len(train_part))])


def _train_candidates(config: Config, out: Path, deadline: float, pretrained_size: int) -> dict[str, dict]:
    tried: dict[str, dict] = {}
    for name in CANDIDATES:
        left = deadline - time.perf_counter()
        reason = _skip_reason(tried, left)
        if reason:
            log.info("skipped %s: %s", name, reason)
            continue
        cfg = candidate_config(config, name, out / "candidates" / SLUGS[name], pretrained_size)
        cfg = _limited(cfg, left * SHARES[name])
        began = time.perf_counter()
        run = train(cfg, evaluate_test=False)
        seconds = time.perf_counter() - began
        tried[name] = {"path": run.path, "val": row_metrics(run.metrics["val"]), "seconds": seconds}
        log.info("candidate %s: val macro-F1 %.3f in %.0f s", name, tried[name]["val"]["f1_macro"], seconds)
    return tried


def _skip_reason(tried: dict[str, dict], left: float) -> str | None:
    if any(t["val"]["f1_macro"] >= 1.0 for t in tried.values()):
        return "an earlier candidate is already perfect on validation, so no candidate can beat it"
    if tried and left < MIN_CANDIDATE_S:  # the first, cheapest candidate always runs
        return f"{max(left, 0):.0f} s of the budget left (raise --budget to try it)"
    return None


def _limited(cfg: Config, seconds: float) -> Config:
    """The candidate with its time limit; report and baselines are written once, for the chosen run."""
    train_cfg = cfg.train.model_copy(update={"max_seconds": max(1.0, round(seconds, 1))})
    evaluate = cfg.evaluate.model_copy(update={"report": False, "baseline": False})
    return cfg.model_copy(update={"train": train_cfg, "evaluate": evaluate})


def _rank(val: dict) -> tuple[float, float]:
    return val["f1_macro"], -val["log_loss"]


def _why(name: str, tried: dict[str, dict]) -> str:
    return "; ".join(f"{n} val macro-F1 {t['val']['f1_macro']:.3f}"
                     f" ({t['seconds']:.0f} s){' <- best' if n == name else ''}" for n, t in tried.items())


def _promote(out: Path, source: Path, config: Config) -> Run:
    """Move the chosen candidate's files up into ``out`` (same file system: renames), pointing its config there."""
    for entry in source.iterdir():
        os.replace(entry, out / entry.name)
    shutil.rmtree(source)
    if not any(source.parent.iterdir()):  # no other candidate ran
        source.parent.rmdir()
    ran = open_run(out).config  # the user's report and baseline settings, which candidates skip
    atomic.write_text(out / "config.yaml", config_to_yaml(ran.model_copy(update={"out": str(out),
                                                                                "evaluate": config.evaluate})))
    return open_run(out)


def _rows(run: Run, prepared: PreparedData, tried: dict[str, dict], chosen: str, evaluate_test: bool) -> list[dict]:
    splits = ["val", "test"] if evaluate_test and "test" in run.metrics else ["val"]
    config = run.config
    if chosen == PROBE_CANDIDATE:  # the chosen model is the linear probe: not shown as its own baseline
        config = config.model_copy(update={"evaluate": config.evaluate.model_copy(update={"baseline": False})})
    rows = baseline_rows(prepared, run.preprocess, run.compute, config, splits)
    for name, t in tried.items():
        if name != chosen:
            rows.append({"name": name, "role": "candidate", "val": t["val"],
                         "seconds": round(t["seconds"], 1),
                         "note": f"tried by the default and not chosen; its run: candidates/{SLUGS[name]}"})
    return rows


def _summary(t: dict) -> dict:
    return {"val": t["val"], "seconds": round(t["seconds"], 1)}
