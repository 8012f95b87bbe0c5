"""Create an ensemble run: check the members agree, fit the weights on validation, evaluate, report."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax

from imgclf import atomic
from imgclf.config import config_to_yaml
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.reporting.evalplots import draw_evaluations
from imgclf.reporting.html import write_report
from imgclf.runs import manifest
from imgclf.runs.base import Run, load_run, write_kind
from imgclf.runs.ensemble import ENSEMBLE_FILE, METHODS, EnsembleRun, check_listed_once, count_models
from imgclf.runs.manifest import file_sha256

log = get_logger("ensemble")


def fit_weights(member_probs: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise the log loss of the weighted mean of ``member_probs``."""
    stack = np.stack(member_probs)
    rows = np.arange(len(y))

    def loss(logits: np.ndarray) -> float:
        p = np.tensordot(softmax(logits), stack, axes=1)[rows, y]
        return float(-np.log(np.clip(p, 1e-12, 1)).mean())

    result = minimize(loss, np.zeros(len(member_probs)), method="L-BFGS-B")
    # The optimum often sits on a vertex (one member alone), which softmax weights only approach:
    # also try each vertex, so the fitted mix is never worse on validation than its best member.
    candidates = [softmax(result.x), *np.eye(len(member_probs))]
    return min(candidates, key=lambda w: loss(np.log(np.clip(w, 1e-300, 1))))


def check_members(runs: list[Run]) -> None:
    """Same classes and the same split in every member, else a one-line error naming the odd run."""
    if len(runs) < 2:
        raise ConfigError("an ensemble needs at least two runs")
    first = runs[0]
    for run in runs[1:]:
        if run.classes != first.classes:
            raise ConfigError(f"{run.path} has classes {run.classes}, {first.path} has {first.classes}; "
                              "ensemble runs trained on the same classes")
        if file_sha256(run.path / "split.csv") != file_sha256(first.path / "split.csv"):  # streamed
            raise ConfigError(f"{run.path} split its images differently from {first.path}; ensemble runs that "
                              "share a split (same data and --split-seed, or the same train/val/test folders)")
        if scoring(run) != scoring(first):
            log.warning("warning: the ensemble scores as %s does (%s), not as %s (%s)", first.path,
                        scoring_words(first), run.path, scoring_words(run))


def scoring(run: Run) -> tuple:
    """The evaluation settings an ensemble takes from its first member: its config's, and the threshold rule
    it decides by now (a rule re-chosen with ``evaluate --threshold`` lives in threshold.json). The positive
    class is the one it names (unset: the second in sorted order), so "dog" and unset agree on cat/dog."""
    positive = run.classes[run.positive] if len(run.classes) == 2 else run.config.data.positive_class
    return positive, run.threshold_rule, run.config.evaluate.bootstrap


def scoring_words(run: Run) -> str:
    positive, threshold, bootstrap = scoring(run)
    return f"positive class {positive or 'none'}, threshold {threshold}, bootstrap {bootstrap}"


def create_ensemble(run_dirs: list[str | Path], out: str | Path, method: str = "soft",
                    evaluate_test: bool = True) -> EnsembleRun:
    """Write an ensemble run directory, fit its weights on validation, evaluate val (and test once)."""
    if method not in METHODS:
        raise ConfigError(f"unknown ensemble method {method!r}; use one of {', '.join(METHODS)}")
    check_listed_once([Path(p) for p in run_dirs], "imgclf ensemble: you gave")
    runs = [load_run(p) for p in run_dirs]
    count_models(runs, "the ensemble")
    check_members(runs)
    thresholded = [str(r.path) for r in runs if r.threshold is not None]
    if method == "majority" and thresholded:
        log.warning("warning: a majority vote counts each member's most probable class, not the decision %s makes "
                    "at its own threshold; --method soft averages probabilities and decides at one threshold",
                    ", ".join(thresholded))
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty; choose another --out")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    first = runs[0]
    for name in ("classes.json", "dataset.json", "split.csv"):
        shutil.copyfile(first.path / name, out / name)
    rule = first.threshold_rule  # the ensemble's config.yaml says the rule it decides by
    config = first.config.model_copy(update={"out": str(out), "evaluate": first.config.evaluate.model_copy(
        update={"threshold": rule})})
    atomic.write_text(out / "config.yaml", config_to_yaml(config))
    write_kind(out, "ensemble")
    has_val = "val" in first.index().splits
    val = [r.probabilities("val") for r in runs] if has_val else []
    weights = None
    if method == "weighted":
        if not val:
            raise ConfigError("weighted ensembles fit their weights on validation; the runs have no val split")
        weights = fit_weights([v.probs for v in val], val[0].true).tolist()
    atomic.write_json(out / ENSEMBLE_FILE, {"members": [str(r.path.resolve()) for r in runs], "method": method,
                                            "weights": weights, "fitted_on": "val" if weights else None,
                                            "member_seals": [manifest.probability_seal(r.path) for r in runs]})
    ensemble = EnsembleRun(out)
    if val:
        ensemble.choose_threshold(config.evaluate.threshold, ensemble.combined(val))
    if evaluate_test and "test" in first.index().splits:
        ensemble.evaluate("test")
    draw_evaluations(ensemble, ("val", "test"))
    manifest.seal(out)
    if config.evaluate.report:
        write_report(out)
    return ensemble
