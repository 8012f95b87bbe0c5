"""A binary operating point: the decision threshold on the positive class's probability, chosen on
validation predictions for a stated goal, never on the test split.

Rules: ``max_f1`` (best F1 of the positive class), ``youden`` (max sensitivity + specificity - 1),
``sensitivity:S`` (the highest threshold whose sensitivity is at least S: screening, where a missed
case costs most), and ``argmax`` (no threshold: the most probable class).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import precision_recall_curve, roc_curve

from imgclf.errors import ConfigError


def choose_threshold(is_positive: np.ndarray, score: np.ndarray, rule: str) -> float | None:
    """The threshold on ``score`` (positive-class probability) that ``rule`` picks; None for argmax."""
    if rule == "argmax":
        return None
    if is_positive.all() or not is_positive.any():
        raise ConfigError(f"threshold rule {rule!r} needs both classes in the validation split; "
                          "raise --val-fraction or use --threshold argmax")
    if rule == "max_f1":
        precision, recall, thresholds = precision_recall_curve(is_positive, score)
        f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                       where=precision + recall > 0)[:-1]
        return float(thresholds[int(np.argmax(f1))])
    fpr, tpr, thresholds = roc_curve(is_positive, score, drop_intermediate=False)
    thresholds = np.minimum(thresholds, 1.0)  # the first threshold is +inf: "predict nothing positive"
    if rule == "youden":
        return float(thresholds[int(np.argmax(tpr - fpr))])
    target = float(rule.split(":", 1)[1])
    reaching = np.flatnonzero(tpr >= target - 1e-12)
    return float(thresholds[reaching[0]])  # thresholds fall as tpr rises: the first is the highest


def positive_index(classes: list[str], positive_class: str | None) -> int:
    """The positive class of a binary task: the configured one, else the second in sorted order."""
    return classes.index(positive_class) if positive_class else 1
