"""``imgclf train DATA`` with no model chosen: try the candidates within a time budget, keep the best.

The candidates (``workflows.candidates``) train one after another, each into
``OUT/candidates/<name>/`` as a complete run that never reads test. The one with the best
validation macro-F1 (ties: lower validation log loss) is moved up into ``OUT`` and is the run:
only it reads the test split, once. The others stay under ``OUT/candidates/`` and appear in
metrics.json's ``baselines`` and the report, next to the majority class and the linear probe.

Time: ``--budget`` bounds the whole command after start-up. The first, cheapest candidate (the
linear probe) always runs, and its pace (seconds per image through the frozen backbone) prices the
rest: the closing work (test evaluation, baselines, report) is set aside from the budget, and the
fine-tune is skipped, with a line, when its feature caching and one fine-tuning epoch would not fit
in what is left. Each later candidate gets a share of the rest as its ``max_seconds``: training
ends at an epoch's end, or gives up an epoch part-way that would overrun, keeping its best epoch.
A candidate is also skipped when validation is already perfect (nothing can beat it). The
selection is recorded in ``OUT/selection.json``.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from imgclf import atomic
from imgclf.config import Config, config_to_yaml
from imgclf.config.defaults import DEFAULT_BUDGET_S
from imgclf.data.index import build_index
from imgclf.data.pipeline import PreparedData, prepare
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.reporting.evalplots import redraw_after_scoring
from imgclf.reporting.html import write_report
from imgclf.runs import manifest
from imgclf.runs.base import Run, load_run, open_run
from imgclf.workflows.baselines import PROBE_MAX_TRAIN, baseline_rows, row_metrics, write_baselines
from imgclf.workflows.candidates import (
    CANDIDATES,
    FINETUNE_CANDIDATE,
    PROBE_CANDIDATE,
    SLUGS,
    candidate_config,
    pretrained_input_size,
    weighs_balanced,
)
from imgclf.workflows.classical import head_unused_settings, train_classical
from imgclf.workflows.lifecycle import mark_finished, new_run_dir
from imgclf.workflows.settings import check_paths
from imgclf.workflows.train import train

log = get_logger("auto")

MIN_CANDIDATE_S = 10.0  # less than this left: a candidate could not train an epoch that counts
CLOSING_S = 5.0  # the closing work that does not scale with images: files, figures, report
# Share of the remaining budget each candidate may use; the last one takes what is left.
SHARES = {"linear probe": 1.0, "small CNN": 0.4, "fine-tuned EfficientNet-Lite0": 1.0}
SELECTION_FILE = "selection.json"


def train_auto(config: Config, budget_s: float = DEFAULT_BUDGET_S, evaluate_test: bool = True) -> Run:
    """Train the candidates on ``config``'s data within ``budget_s``; return the chosen run (in ``config.out``)."""
    if not budget_s > 0:
        raise ConfigError(f"--budget {budget_s:g}: give the seconds the default may spend, e.g. --budget 120")
    start = time.perf_counter()
    size, counts = _scan(config)  # scans the data first: a missing or empty folder makes no run directory
    check_paths(config)
    out = new_run_dir(config.out)
    log.info("no --model given: trying %s within %.0f s, chosen on validation macro-F1 (--model X trains one model)",
             ", then ".join(CANDIDATES), budget_s)
    if weighs_balanced(config):
        log.info("the candidates weigh classes 'balanced' (best on imbalanced data in benchmarks/imbalance.py; "
                 "all weights are 1 when classes are balanced); --class-weight none to turn it off")
    else:
        log.info("the candidates use --class-weight %s and --sampler %s as given, not the default's 'balanced' "
                 "class weights", config.train.class_weight, config.train.sampler)
    if config.train.max_seconds:
        log.info("--max-seconds %g limits each network candidate's training (the linear probe has no epochs to "
                 "stop after); --budget bounds the whole selection", config.train.max_seconds)
    tried = _train_candidates(config, out, Pace(start + budget_s, counts, config.evaluate.baseline), size)
    name, winner = max(tried.items(), key=lambda item: _rank(item[1]["val"]))
    log.info("chose %s: %s", name, _why(name, tried))
    unused = _unused_by_probe(config) if name == PROBE_CANDIDATE else []
    if unused:
        log.warning("warning: the chosen linear probe applied none of %s: it fits logistic regression on frozen "
                    "features once (pass --model X to train the network they shape)", ", ".join(unused))
    run = _promote(out, winner["path"], config)
    prepared = prepare(run.index(), run.preprocess, run.config.data)  # the chosen run's images, read once
    if evaluate_test and "test" in prepared.index.splits:
        run.evaluate("test", prepared=prepared)
    rows = _rows(run, prepared, tried, name, evaluate_test)
    write_baselines(out, rows)
    redraw_after_scoring(run, ("val", "test"))
    atomic.write_json(out / SELECTION_FILE, {"chosen": name, "budget_s": budget_s,
                                             "seconds": round(time.perf_counter() - start, 1),
                                             "candidates": {n: _summary(t) for n, t in tried.items()}})
    manifest.seal(out)
    mark_finished(out)
    if config.evaluate.report:
        write_report(out)
    log.info("run written to %s (the chosen %s, moved up from %s)", out, name, winner["path"].relative_to(out))
    return load_run(out)


def _scan(config: Config) -> tuple[int, dict[str, int]]:
    """The pretrained candidates' input size (``candidates.pretrained_input_size``) and the images per split."""
    split_seed = config.train.seed if config.data.split_seed is None else config.data.split_seed
    index = build_index(config.data, split_seed)
    if "val" not in index.splits:
        raise ConfigError("no validation images: the default chooses among its candidates on them; raise "
                          "--val-fraction, or pass --model to train one model")
    train_part = index.subset("train")
    size = pretrained_input_size([train_part.abspath(i) for i in range(len(train_part))])
    return size, {split: len(index.subset(split)) for split in ("train", "val", "test") if split in index.splits}


@dataclass
class Pace:
    """The budget's deadline, and the seconds per image through the frozen backbone once the probe ran."""

    deadline: float
    counts: dict[str, int]
    baseline: bool = True  # the linear-probe baseline runs at the close (--no-baseline: it does not)
    per_image: float | None = None

    def learn(self, probe_seconds: float) -> None:
        """The probe read train and val once through the backbone: its time prices every later pass."""
        self.per_image = probe_seconds / max(1, self.counts["train"] + self.counts["val"])

    def left(self) -> float:
        """Seconds left for candidates: the closing work (test and baselines' passes, report) set aside."""
        return self.deadline - time.perf_counter() - self.closing()

    def closing(self) -> float:
        """The chosen model's test pass, and the probe baseline's pass over every split."""
        if self.per_image is None:
            return 0.0
        sample = min(self.counts["train"], 2 * PROBE_MAX_TRAIN)  # the probe's sample: at most about twice its limit
        probe = sample + self.counts["val"] + self.counts.get("test", 0)
        passes = self.counts.get("test", 0) + (probe if self.baseline else 0)
        return CLOSING_S + self.per_image * passes

    def finetune_minimum(self, views: int) -> float:
        """Caching ``views`` augmented views and val, then one fine-tuning epoch (backward ~ 2 forwards)."""
        n_train, n_val = self.counts["train"], self.counts["val"]
        return (self.per_image or 0.0) * ((views + 3) * n_train + 2 * n_val)


def _train_candidates(config: Config, out: Path, pace: Pace, pretrained_size: int) -> dict[str, dict]:
    tried: dict[str, dict] = {}
    for name in CANDIDATES:
        cfg = candidate_config(config, name, out / "candidates" / SLUGS[name], pretrained_size)
        left = pace.left()
        reason = _skip_reason(name, cfg, tried, left, pace)
        if reason:
            log.info("skipped %s: %s", name, reason)
            continue
        began = time.perf_counter()
        limited = _limited(cfg, left * SHARES[name])
        run = (train_classical(limited, evaluate_test=False, candidate=True) if cfg.model.head != "linear"
               else train(limited, evaluate_test=False))
        seconds = time.perf_counter() - began
        tried[name] = {"path": run.path, "val": row_metrics(run.metrics["val"]), "seconds": seconds}
        log.info("candidate %s: val macro-F1 %.3f in %.0f s", name, tried[name]["val"]["f1_macro"], seconds)
        if name == PROBE_CANDIDATE:
            pace.learn(seconds)
    return tried


def _skip_reason(name: str, cfg: Config, tried: dict[str, dict], left: float, pace: Pace) -> str | None:
    if any(t["val"]["f1_macro"] >= 1.0 for t in tried.values()):
        return "an earlier candidate is already perfect on validation, so no candidate can beat it"
    if tried and left < MIN_CANDIDATE_S:  # the first, cheapest candidate always runs
        return f"{max(left, 0):.0f} s of the budget left (raise --budget to try it)"
    if name == FINETUNE_CANDIDATE and pace.per_image is not None:
        need = pace.finetune_minimum(cfg.train.feature_views or 1)
        if need > left:
            return (f"at the linear probe's pace, caching its features and one fine-tuning epoch need about "
                    f"{need:.0f} s, and {max(left, 0):.0f} s of the budget are left (raise --budget to try it)")
    return None


def _limited(cfg: Config, seconds: float) -> Config:
    """The candidate with its time limit (its share, or the user's --max-seconds when smaller); report
    and baselines are written once, for the chosen run."""
    share = max(1.0, round(seconds, 1))
    limit = None if cfg.model.head != "linear" else min(share, cfg.train.max_seconds or share)  # sklearn: no epochs
    train_cfg = cfg.train.model_copy(update={"max_seconds": limit})
    evaluate = cfg.evaluate.model_copy(update={"report": False, "baseline": False})
    return cfg.model_copy(update={"train": train_cfg, "evaluate": evaluate})


def _rank(val: dict) -> tuple[float, float]:
    return val["f1_macro"], -val["log_loss"]


def _unused_by_probe(config: Config) -> list[str]:
    """The training flags given that the chosen linear probe never applied (as a candidate it says none)."""
    weighted = ["--sampler weighted"] if config.train.sampler == "weighted" else []
    return head_unused_settings(config, "logreg") + weighted


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
