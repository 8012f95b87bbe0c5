"""Ensembles of trained runs, as a run directory of their own.

Methods: ``soft`` (mean of the members' probabilities), ``weighted`` (a weighted mean, weights
fitted on validation by minimising log loss over the simplex) and ``majority`` (each member votes
for its class; the vote shares are the probabilities, ties broken by the mean probabilities).
Members must share their classes and their split (the same images in train, val and test), so
the ensemble's validation and test sets are exactly theirs. Each member predicts with its own
model and preprocessing, so different architectures and image sizes combine.
"""

from __future__ import annotations

import shutil
from functools import cached_property
from pathlib import Path

import numpy as np
from scipy.optimize import minimize
from scipy.special import softmax

from . import atomic, manifest, runfiles
from .config import config_to_yaml
from .errors import ConfigError, RunDirError
from .predictions import Predictions
from .run import Run

ENSEMBLE_FILE = "ensemble.json"
METHODS = ("soft", "weighted", "majority")
TIE_BREAK = 1e-6  # how much the mean probability counts in a majority vote: only to break ties


def combine(member_probs: list[np.ndarray], method: str, weights: np.ndarray | None = None) -> np.ndarray:
    """N x K ensemble probabilities from each member's N x K probabilities."""
    stack = np.stack(member_probs)  # M x N x K
    if method == "majority":
        k = stack.shape[2]
        votes = np.eye(k)[stack.argmax(axis=2)].mean(axis=0) + TIE_BREAK * stack.mean(axis=0)
        return votes / votes.sum(axis=1, keepdims=True)
    w = np.full(len(member_probs), 1 / len(member_probs)) if weights is None else np.asarray(weights)
    return np.tensordot(w, stack, axes=1)


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
        if (run.path / "split.csv").read_bytes() != (first.path / "split.csv").read_bytes():
            raise ConfigError(f"{run.path} split its images differently from {first.path}; ensemble runs that "
                              "share a split (same data and --split-seed, or the same train/val/test folders)")


def create_ensemble(run_dirs: list[str | Path], out: str | Path, method: str = "soft",
                    evaluate_test: bool = True) -> EnsembleRun:
    """Write an ensemble run directory, fit its weights on validation, evaluate val (and test once)."""
    if method not in METHODS:
        raise ConfigError(f"unknown ensemble method {method!r}; use one of {', '.join(METHODS)}")
    from .run import load_run

    runs = [load_run(p) for p in run_dirs]
    check_members(runs)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty; choose another --out")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    first = runs[0]
    for name in ("classes.json", "dataset.json", "split.csv"):
        shutil.copyfile(first.path / name, out / name)
    config = first.config.model_copy(update={"out": str(out)})
    atomic.write_text(out / "config.yaml", config_to_yaml(config))
    has_val = "val" in first.index().splits
    val = [r.probabilities("val") for r in runs] if has_val else []
    weights = None
    if method == "weighted":
        if not val:
            raise ConfigError("weighted ensembles fit their weights on validation; the runs have no val split")
        weights = fit_weights([v.probs for v in val], val[0].true).tolist()
    atomic.write_json(out / ENSEMBLE_FILE, {"members": [str(r.path.resolve()) for r in runs], "method": method,
                                            "weights": weights, "fitted_on": "val" if weights else None})
    ensemble = EnsembleRun(out)
    if val:
        ensemble.choose_threshold(config.evaluate.threshold, ensemble.combined(val))
    if evaluate_test and "test" in first.index().splits:
        ensemble.evaluate("test")
    manifest.seal(out)
    if config.evaluate.report:
        from .htmlreport import write_report

        write_report(out)
    return ensemble


class EnsembleRun(Run):
    """An ensemble directory: evaluate, predict and report as for a run; the members do the predicting."""

    def __init__(self, path: str | Path, chain: tuple[Path, ...] = ()):
        super().__init__(path)
        self.chain = chain or (self.path.resolve(),)  # this ensemble and the ones that contain it

    @cached_property
    def spec(self) -> runfiles.EnsembleFile:
        return runfiles.read_ensemble(self.path / ENSEMBLE_FILE)

    @cached_property
    def members(self) -> list[Run]:
        from .run import load_run

        missing = [p for p in self.spec.members if not Path(p).is_dir()]
        if missing:
            raise RunDirError(f"ensemble member {missing[0]} is gone; the ensemble needs its members' directories")
        runs = [load_run(p, self.chain) for p in self.spec.members]
        odd = next((r for r in runs if r.classes != self.classes), None)
        if odd is not None:
            raise RunDirError(f"ensemble member {odd.path} has classes {odd.classes}, the ensemble {self.classes}; "
                              "re-create the ensemble")
        return runs

    def combined(self, parts: list[Predictions]) -> Predictions:
        probs = combine([p.probs for p in parts], self.spec.method, self.spec.weights)
        return Predictions(parts[0].paths, self.classes, parts[0].true, probs)

    def probabilities(self, split: str, data_root=None, shuffle: bool = False, prepared=None,
                      tta: str | None = None) -> Predictions:
        return self.combined([m.probabilities(split, data_root, shuffle, None, tta) for m in self.members])

    def predict(self, inputs, out=None, skip_bad_images: bool = False, batch_size: int | None = None,
                tta: str | None = None) -> Predictions:
        parts = [m.predict(inputs, None, skip_bad_images, batch_size, tta).at_threshold(None, 0)
                 for m in self.members]
        preds = self.combined(parts).at_threshold(self.threshold, self.positive)
        if out:
            preds.to_csv(Path(out))
        return preds

    @property
    def model(self):
        raise ConfigError(f"{self.path} is an ensemble: it has no single model; explain or export its members")

    @property
    def head(self):
        return None

    def describe(self) -> str:
        names = ", ".join(Path(p).name for p in self.spec.members)
        weights = self.spec.weights
        how = f"weights {', '.join(f'{w:.2f}' for w in weights)} fitted on validation" if weights else "equal weights"
        return f"{self.spec.method}-vote ensemble of {len(self.members)} runs ({names}), {how}"
