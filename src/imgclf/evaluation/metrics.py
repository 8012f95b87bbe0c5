"""Metrics computed from Predictions only (scikit-learn), so every report agrees with the CSV."""

from __future__ import annotations

import warnings

import numpy as np
import sklearn
from sklearn import metrics as skm

from imgclf.evaluation.operating import positive_index
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger

log = get_logger("metrics")


def compute_metrics(preds: Predictions, positive_class: str | None = None) -> dict:
    """Accuracy, balanced accuracy, classification report, confusion matrix, ROC-AUC, log loss.

    For 2 classes also sensitivity, specificity, PPV and NPV of ``positive_class`` (default: the
    second class in sorted order, as scikit-learn's pos_label=1).
    """
    y, p, probs = preds.true, preds.pred, preds.probs
    labels = list(range(len(preds.classes)))
    # Every keyword below is this function's own: checking them (not the arrays, still checked) was 40% of its time
    with warnings.catch_warnings(), sklearn.config_context(skip_parameter_validation=True):
        warnings.simplefilter("ignore")  # undefined precision for absent classes is reported as 0
        report = skm.classification_report(y, p, labels=labels, target_names=preds.classes,
                                           output_dict=True, zero_division=0)
        out = {
            "n": len(y),
            "accuracy": skm.accuracy_score(y, p),
            "balanced_accuracy": skm.balanced_accuracy_score(y, p),
            "precision_macro": report["macro avg"]["precision"],
            "recall_macro": report["macro avg"]["recall"],
            "f1_macro": report["macro avg"]["f1-score"],
            "precision_weighted": report["weighted avg"]["precision"],
            "recall_weighted": report["weighted avg"]["recall"],
            "f1_weighted": report["weighted avg"]["f1-score"],
            "log_loss": skm.log_loss(y, probs, labels=labels),
            "roc_auc_ovr": roc_auc(y, probs),
            "per_class": {c: report[c] for c in preds.classes},
            "confusion_matrix": skm.confusion_matrix(y, p, labels=labels).tolist(),
            "classes": list(preds.classes),
            "ece": expected_calibration_error(preds.confidence, y == preds.probs.argmax(axis=1)),
        }
    if len(preds.classes) == 2:
        out.update(binary_metrics(y, p, preds.classes, positive_class))
    return out


def warn_absent_classes(metrics: dict, split: str) -> None:
    """A class with no image in the split still counts in the macro averages, as 0: said, since balanced accuracy
    leaves it out and the two then disagree (macro recall 0.333 beside balanced accuracy 0.5)."""
    absent = [name for name, row in metrics["per_class"].items() if row["support"] == 0]
    if absent and metrics["n"]:
        log.warning("warning: %s has no image of class(es) %s: their precision, recall and F1 count as 0 in %s's "
                    "macro averages (balanced accuracy leaves them out)", split, ", ".join(map(repr, absent)), split)


def validation_row(m: dict) -> dict[str, float]:
    """The validation columns of history.csv (and the names --monitor accepts) from ``compute_metrics``."""
    out = {"val_loss": m["log_loss"], "val_accuracy": m["accuracy"],
           "val_balanced_accuracy": m["balanced_accuracy"], "val_precision_macro": m["precision_macro"],
           "val_recall_macro": m["recall_macro"], "val_f1_macro": m["f1_macro"]}
    if m["roc_auc_ovr"] is not None:
        out["val_auc"] = m["roc_auc_ovr"]
    return out


def macro_scores(true: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, float]:
    """Macro precision, recall and F1 of decided classes, as ``compute_metrics`` scores them (absent classes
    count as 0). The training loop scores each epoch's own predictions with it: no extra pass."""
    with sklearn.config_context(skip_parameter_validation=True):  # the keywords are this function's own
        precision, recall, f1, _ = skm.precision_recall_fscore_support(
            true, pred, labels=list(range(num_classes)), average="macro", zero_division=0)
    return {"precision_macro": float(precision), "recall_macro": float(recall), "f1_macro": float(f1)}


def f1_and_log_loss(true: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """Macro-F1 of the argmax decisions and log loss, as ``compute_metrics`` scores them, at a tenth of its cost:
    what a search that compares many candidates on validation needs."""
    f1 = macro_scores(true, probs.argmax(axis=1), probs.shape[1])["f1_macro"]
    with sklearn.config_context(skip_parameter_validation=True):
        return f1, float(skm.log_loss(true, probs, labels=list(range(probs.shape[1]))))


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> list[dict]:
    """Per equal-width bin of top-label confidence: its range, count, mean confidence and accuracy."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                     "confidence": float(confidence[inside].mean()) if n else None,
                     "accuracy": float(correct[inside].mean()) if n else None})
    return rows


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> float:
    """Count-weighted mean |accuracy - confidence| over the ``reliability`` bins (top label)."""
    gaps = [r["count"] * abs(r["accuracy"] - r["confidence"]) for r in reliability(confidence, correct, bins)
            if r["count"]]
    return float(sum(gaps) / max(len(confidence), 1))


def save_and_score(preds: Predictions, path, positive_class: str | None = None) -> tuple[Predictions, dict]:
    """Write ``preds`` as CSV and compute metrics from that file as read back, so the two agree by construction."""
    preds.to_csv(path)
    saved = Predictions.from_csv(path)
    return saved, compute_metrics(saved, positive_class)


def roc_auc(y: np.ndarray, probs: np.ndarray) -> float | None:
    """One-vs-rest macro ROC-AUC; None when a class is absent from ``y`` (AUC is undefined)."""
    present = np.unique(y)
    if len(present) < probs.shape[1]:
        return None
    if probs.shape[1] == 2:
        return float(skm.roc_auc_score(y, probs[:, 1]))
    return float(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def binary_metrics(y: np.ndarray, p: np.ndarray, classes: list[str], positive_class: str | None) -> dict:
    positive = positive_index(classes, positive_class)
    tp = int(((p == positive) & (y == positive)).sum())
    tn = int(((p != positive) & (y != positive)).sum())
    fp = int(((p == positive) & (y != positive)).sum())
    fn = int(((p != positive) & (y == positive)).sum())
    ratio = lambda a, b: a / (a + b) if a + b else 0.0  # noqa: E731
    return {"positive_class": classes[positive], "tp": tp, "tn": tn, "fp": fp, "fn": fn,
            "sensitivity": ratio(tp, fn), "specificity": ratio(tn, fp), "ppv": ratio(tp, fp), "npv": ratio(tn, fn)}
