"""Ensembles of trained runs, as a run directory of their own.

Methods: ``soft`` (mean of the members' probabilities), ``weighted`` (a weighted mean, weights
fitted on validation by minimising log loss over the simplex) and ``majority`` (each member votes
for its class; the vote shares are the probabilities, ties broken by the mean probabilities).
Members must share their classes and their split (the same images in train, val and test), so
the ensemble's validation and test sets are exactly theirs. Each member predicts with its own
model and preprocessing, so different architectures and image sizes combine.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from imgclf.errors import ConfigError, RunDirError
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.runs import files as runfiles
from imgclf.runs import manifest
from imgclf.runs.base import Run, load_run, register
from imgclf.runs.files import MAX_MEMBERS
from imgclf.runs.network import NetworkRun

ENSEMBLE_FILE = "ensemble.json"
METHODS = ("soft", "weighted", "majority")
log = get_logger("ensemble")
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


def check_listed_once(paths: list[Path], who: str) -> None:
    """Each run once: a run listed twice would count its vote twice and load its model twice."""
    resolved = [p.resolve() for p in paths]
    twice = next((p for p, r in zip(paths, resolved, strict=True) if resolved.count(r) > 1), None)
    if twice is not None:
        raise RunDirError(f"{who} {twice} twice; an ensemble lists each run once")


def count_models(runs: list[Run], who: str) -> int:
    """The trained models behind ``runs``, those of listed ensembles counted too; at most MAX_MEMBERS, which
    bounds what predicting loads however the ensembles nest (a count over it stops at once)."""
    total = 0
    for run in runs:
        total += run.model_count if isinstance(run, EnsembleRun) else 1
        if total > MAX_MEMBERS:
            raise RunDirError(f"{who} holds more than {MAX_MEMBERS} trained runs in all (listed ensembles' members "
                              "counted); list fewer runs")
    return total


@register("ensemble")
class EnsembleRun(NetworkRun):
    """The ``ensemble`` kind: evaluate, predict and report as for a run; the members do the predicting."""

    def __init__(self, path: str | Path, outer: tuple[Path, ...] = ()):
        super().__init__(path)
        self.chain = (*outer, self.path.resolve())  # this ensemble and the ones that contain it

    @cached_property
    def spec(self) -> runfiles.EnsembleFile:
        return runfiles.read_ensemble(self.path / ENSEMBLE_FILE)

    @cached_property
    def members(self) -> list[Run]:
        missing = [p for p in self.spec.members if not Path(p).is_dir()]
        if missing:
            raise RunDirError(f"ensemble member {missing[0]} is gone; the ensemble needs its members' directories")
        check_listed_once([Path(p) for p in self.spec.members], f"{self.path / ENSEMBLE_FILE} lists")
        runs = [load_run(p, self.chain) for p in self.spec.members]
        self._refuse_changed(runs)
        count_models(runs, f"ensemble {self.path}")
        odd = next((r for r in runs if r.classes != self.classes), None)
        if odd is not None:
            raise RunDirError(f"ensemble member {odd.path} has classes {odd.classes}, the ensemble {self.classes}; "
                              "re-create the ensemble")
        return runs

    def _refuse_changed(self, runs: list[Run]) -> None:
        """Each member as it was when the ensemble was made (its weights fitted, its test scored): a member
        re-trained, re-sealed after an edit or replaced by another run at its path is refused, not used."""
        if self.spec.member_seals is None:
            log.warning("warning: ensemble %s was made before imgclf recorded its members' seals, so a changed or "
                        "replaced member would not be noticed; re-create it to have them checked", self.path)
            return
        kept = self.spec.member_seals
        changed = next((run for i, run in enumerate(runs)
                        if i >= len(kept) or manifest.probability_seal(run.path) != kept[i]), None)
        if changed is not None:
            raise RunDirError(f"ensemble member {changed.path} changed since the ensemble was made (its sealed "
                              "files differ); re-create the ensemble with imgclf ensemble")

    @property
    def model_count(self) -> int:
        return count_models(self.members, f"ensemble {self.path}")

    def combined(self, parts: list[Predictions]) -> Predictions:
        probs = combine([p.probs for p in parts], self.spec.method, self.spec.weights)
        return Predictions(parts[0].paths, self.classes, parts[0].true, probs, label_note=parts[0].label_note)

    def is_own_tta(self, tta: str | None) -> bool:
        return tta is None or all(member.is_own_tta(tta) for member in self.members)

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
        raise ConfigError(f"{self.path} is an ensemble: it has no single model; give one of its members (its "
                          f"{ENSEMBLE_FILE} lists them)")

    @property
    def head(self):
        return None

    def describe(self) -> str:
        names = ", ".join(Path(p).name for p in self.spec.members)
        weights = self.spec.weights
        how = f"weights {', '.join(f'{w:.2f}' for w in weights)} fitted on validation" if weights else "equal weights"
        return f"{self.spec.method}-vote ensemble of {len(self.members)} runs ({names}), {how}"

    def check(self) -> None:
        _ = self.config, self.classes, self.threshold, self.metrics, self.spec, self.members
