"""How sure the numbers are: 95% intervals, and whether the probabilities can be taken at face value.

Proportions (accuracy, sensitivity, specificity) get Wilson score intervals, which stay inside
[0, 1] and behave at small n and at 0% or 100%, unlike the normal approximation. ROC-AUC gets a
seeded percentile bootstrap over images. (Calibration, reliability bins and ECE, is in ``metrics``.)
"""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, rankdata

from imgclf.evaluation.metrics import roc_auc
from imgclf.evaluation.operating import positive_index
from imgclf.evaluation.predictions import Predictions

LEVEL = 0.95


def wilson(successes: int, n: int) -> list[float] | None:
    """[low, high] Wilson score interval of ``successes / n``; None when n is 0."""
    if n == 0:
        return None
    ci = binomtest(int(successes), int(n)).proportion_ci(LEVEL, method="wilson")
    return [float(ci.low), float(ci.high)]


def bootstrap_auc(y: np.ndarray, probs: np.ndarray, resamples: int, seed: int) -> list[float] | None:
    """Percentile interval of (macro one-vs-rest) ROC-AUC over resamples of the images; seeded.

    All resamples are scored at once with the rank form of AUC (Mann-Whitney U, ties counted
    half), which is what scikit-learn's roc_auc_score computes, without its per-call overhead.
    Resamples that miss a class have no AUC and are dropped.
    """
    if resamples == 0 or roc_auc(y, probs) is None:
        return None
    rng = np.random.default_rng(seed)
    take = rng.integers(0, len(y), (resamples, len(y)))
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    per_class = np.stack([rank_auc(y[take] == k, probs[take, k]) for k in classes])
    values = per_class.mean(axis=0)
    values = values[np.isfinite(values)]
    alpha = (1 - LEVEL) / 2
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))]


def rank_auc(is_positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """ROC-AUC of each row of ``score`` (R x N) against ``is_positive`` (R x N); NaN for a one-class row."""
    ranks = rankdata(score, axis=1)  # average ranks: ties count half
    n_pos = is_positive.sum(axis=1)
    n_neg = is_positive.shape[1] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((ranks * is_positive).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def confidence_intervals(preds: Predictions, positive_class: str | None, resamples: int, seed: int) -> dict:
    """95% intervals: accuracy; sensitivity and specificity (of the positive class, or of each class
    against the rest); ROC-AUC."""
    y, p = preds.true, preds.pred
    out: dict = {"level": LEVEL, "accuracy": wilson(int((y == p).sum()), len(y)),
                 "roc_auc": bootstrap_auc(y, preds.probs, resamples, seed), "auc_resamples": resamples}
    if len(preds.classes) == 2:
        out.update(_sensitivity_specificity(y, p, positive_index(preds.classes, positive_class)))
    else:
        out["per_class"] = {name: _sensitivity_specificity(y, p, k) for k, name in enumerate(preds.classes)}
    return out


def _sensitivity_specificity(y: np.ndarray, p: np.ndarray, positive: int) -> dict:
    actual, called = y == positive, p == positive
    return {"sensitivity": wilson(int((actual & called).sum()), int(actual.sum())),
            "specificity": wilson(int((~actual & ~called).sum()), int((~actual).sum()))}
