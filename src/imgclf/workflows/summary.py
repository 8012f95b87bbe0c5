"""Tables for experiments: per-run metric rows, describe() with a confidence interval, CSV output."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from imgclf import atomic
from imgclf.config import build_config
from imgclf.errors import ConfigError, RunDirError
from imgclf.logs import get_logger
from imgclf.runs.base import Run, load_run
from imgclf.runs.files import read_json
from imgclf.runs.manifest import INCOMPLETE
from imgclf.workflows import runlock
from imgclf.workflows.train import train

RESULT_FILE = "result.json"  # written last in a finished fold or trial: the resume marker
EXPERIMENT_FILE = "experiment.json"  # {"kind": "cv" | "grid", "plan": its folds or grid hashed}: resumable
SETTINGS_KEY = "settings"  # result.json's record of the config the fold or trial was trained with
HEADLINE = ("accuracy", "f1_macro", "balanced_accuracy", "roc_auc_ovr", "log_loss")  # per fold or trial
log = get_logger("experiments")
BOUNDED_SCORES = ("accuracy", "balanced_accuracy", "f1", "precision", "recall", "roc_auc", "auc", "sensitivity",
                  "specificity", "ppv", "npv")


def fold_metrics(metrics: dict) -> dict:
    """Headline numbers per split, e.g. ``val_accuracy`` and ``test_f1_macro`` (None where a split lacks one)."""
    return {f"{split}_{name}": metrics[split].get(name) for split in ("val", "test") if split in metrics
            for name in HEADLINE}


def train_job(config_values: dict, evaluate_test: bool, extra: dict[str, Any] | None = None) -> dict:
    """Train one fold or trial (a picklable job for any backend) and return its headline metrics.

    Resumable: a finished job is read back, its numbers from its run's metrics.json, read and checked as any
    command reads a run (``result.json`` only marks it done and records its settings and seconds). An unfinished
    one (killed before its result file) is trained again in its folder as ``train`` reuses an unfinished run's:
    imgclf's own files are replaced, any other file is kept and named.
    """
    out = Path(config_values["out"])
    done = out / RESULT_FILE
    settings = comparable(json.loads(json.dumps(config_values, default=str)))  # as result.json stores them
    row = {"run": str(out), "seed": config_values["train"]["seed"], **(extra or {})}  # --out as spelt now
    if done.exists():
        return {**row, **_finished(out, done, settings, evaluate_test)}
    if (out / "config.yaml").is_file() and not (out / INCOMPLETE).exists():  # killed after the run, before its record
        atomic.write_text(out / INCOMPLETE, "the fold or trial has no result.json: trained again\n")
    start = time.perf_counter()
    run = train(build_config(config_values), evaluate_test=evaluate_test)
    result = {**row, "seconds": round(time.perf_counter() - start, 2), **fold_metrics(run.metrics)}
    atomic.write_json(done, {**result, SETTINGS_KEY: settings})
    return result


def _finished(out: Path, done: Path, settings: dict, evaluate_test: bool) -> dict:
    """A finished fold's or trial's seconds, from ``done``, and metrics, from the run (``load_run`` checks its
    files), never from the record, which nothing checks."""
    result = read_json(done)
    if not isinstance(result, dict) or Path(str(result.get("run"))).name != out.name:
        raise RunDirError(f"{done} is not the record of {out.name}; delete {out} to train it again")
    check_same_settings(done, result.get(SETTINGS_KEY), settings)
    run = load_run(out)
    _check_same_rule(run, settings)
    seconds = result.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds < float("inf"):
        raise RunDirError(f"{done}: seconds is {seconds!r}, not a number of seconds; delete {out} to train it again")
    metrics = run.metrics  # a grid's best trial was scored on test after its row was made: not in it
    scored = metrics if evaluate_test else {split: m for split, m in metrics.items() if split == "val"}
    return {"seconds": seconds, **fold_metrics(scored)}


def _check_same_rule(run: Run, settings: dict) -> None:
    """A fold or trial whose threshold was re-chosen since (``evaluate --threshold``) decides by another rule than
    the one asked for now: its numbers would be pooled under a rule they were not made by."""
    rule, asked = run.threshold_rule, settings.get("evaluate", {}).get("threshold", "argmax")
    if rule != asked:
        raise RunDirError(f"{run.path} now decides by --threshold {rule} (re-chosen with imgclf evaluate), this run "
                          f"asks {asked}; re-choose it there (imgclf evaluate {run.path} --threshold {asked}), or "
                          f"delete {run.path} to train it again")


def open_experiment(out: Path, kind: str, plan: str, what: str) -> None:
    """Claim ``out`` for a cv or grid: an empty or new folder, or one this kind of experiment wrote before with
    the same ``plan`` (the hash of its folds, or of its grid; ``what`` names them for the message), which it then
    continues. Any other folder is the user's, and its files (a summary.csv of theirs) are not replaced; another
    plan's folds or trials would be pooled or ranked with this one's, so it is refused. While the command runs,
    no other imgclf command writes there (``runlock``)."""
    marker = out / EXPERIMENT_FILE
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the {kind}")
    out.mkdir(parents=True, exist_ok=True)
    runlock.claim(out, kind)
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    earlier = any(out.glob(f"*/{RESULT_FILE}")) or any(out.glob(f"trials/*/{RESULT_FILE}"))
    written = read_json(marker) if marker.is_file() else None
    if written is not None and (not isinstance(written, dict) or written.get("kind") != kind):
        raise ConfigError(f"--out {out} holds an imgclf experiment of another kind; choose another --out")
    if written is None and held and not earlier:
        raise ConfigError(f"--out {out} already holds files ({', '.join(held[:3])}) that no imgclf {kind} wrote; "
                          "choose another --out, or empty it")
    if written is not None and written.get("plan", plan) != plan:  # a marker from before plans were kept: any
        raise ConfigError(f"--out {out} holds a {kind} over other {what}; its results would be mixed with this "
                          "one's, so choose another --out (or delete it to start over)")
    atomic.write_json(marker, {"kind": kind, "plan": plan})


# what may differ between two spellings of one experiment: where it is written, how paths were typed, how
# many loader processes and which cache folder; none of them changes a result
NOT_COMPARED = {"out", "versions", "workers", "cache_dir"}


def comparable(values: Any) -> Any:
    """Settings as two runs of the same experiment must agree on them (without NOT_COMPARED and *_as_typed)."""
    if not isinstance(values, dict):
        return values
    return {k: comparable(v) for k, v in values.items() if k not in NOT_COMPARED and not k.endswith("_as_typed")}


def check_same_settings(done: Path, saved: Any, asked: dict) -> None:
    """A finished fold or trial is reused only for the very settings it was trained with; one from before
    result.json recorded them is reused with a warning (as a run from before manifests opens with one)."""
    if saved is None:
        log.warning("warning: %s does not record its settings (an older imgclf): reused as it is; delete it to "
                    "train it again with the settings asked now", done.parent)
        return
    if comparable(saved) == asked:
        return
    why = f"{first_difference(comparable(saved), asked)} differs" if isinstance(saved, dict) else "damaged record"
    raise ConfigError(f"{done.parent} was trained with other settings than asked now ({why}); it is reused only "
                      f"to finish the same experiment: pass a new --out, or delete {done.parent.parent} to start "
                      "again")


def first_difference(saved: Any, asked: Any, key: str = "") -> str:
    """The first setting (``train.epochs: 1 -> 3``) where two nested settings dicts differ."""
    if isinstance(saved, dict) and isinstance(asked, dict):
        for name in sorted(set(saved) | set(asked)):
            if saved.get(name) != asked.get(name):
                return first_difference(saved.get(name), asked.get(name), f"{key}.{name}" if key else name)
    return f"{key}: {saved!r} -> {asked!r}"


def describe(rows: list[dict], names: list[str]) -> list[dict]:
    """pandas-style describe() per metric, plus a 95% t-interval for the mean clipped to the metric's range.

    A t-interval is symmetric, so with few folds near a bound it would reach past it (accuracy 1.03);
    a score cannot, so the interval stops at the bound (``metric_range``).
    """
    table = []
    for name in names:
        values = np.array([r[name] for r in rows if r.get(name) is not None], dtype=float)
        if not len(values):
            continue
        n, mean = len(values), float(values.mean())
        std = float(values.std(ddof=1)) if n > 1 else 0.0
        half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
        q = np.percentile(values, [25, 50, 75])
        low, high = metric_range(name)
        table.append({"metric": name, "count": n, "mean": mean, "std": std, "min": float(values.min()),
                      "25%": q[0], "50%": q[1], "75%": q[2], "max": float(values.max()),
                      "ci95_low": max(mean - half, low), "ci95_high": min(mean + half, high)})
    return table


def metric_range(name: str) -> tuple[float, float]:
    """The values a column can take: [0, 1] for scores and proportions, [0, inf) for losses and times."""
    base = name.split("_", 1)[1] if name.startswith(("val_", "test_", "train_")) else name
    if base.startswith(BOUNDED_SCORES):
        return 0.0, 1.0
    if base.endswith(("loss", "seconds", "ece")):
        return 0.0, float("inf")
    return float("-inf"), float("inf")
