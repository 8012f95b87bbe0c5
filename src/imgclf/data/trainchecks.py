"""What ``train`` checks of its dataset before it trains, cheaply, and warns about: identical files in two splits
(leakage), identical files under two labels, and training classes far apart in size."""

from __future__ import annotations

from pathlib import Path

from imgclf.data.audit import crosses_splits, exact_duplicates
from imgclf.logs import get_logger
from imgclf.safeio import printable

log = get_logger("audit")


def warn_leakage(paths: list[Path], splits: list[str], labels: list[str] | None = None) -> list[str]:
    """Byte-identical images in two splits (leakage inflates test metrics) or under two labels (one of them is
    wrong, and the model is taught both). Returns the warnings logged."""
    groups = exact_duplicates(paths, splits)
    messages = []
    leaks = [g for g in groups if crosses_splits(g)]
    if leaks:
        messages.append(f"{len(leaks)} image(s) appear in more than one split (leakage inflates test metrics), e.g. "
                        + " = ".join(f"{s}:{p}" for s, p in leaks[0]) + "; run imgclf audit for the list")
    label_of = dict(zip(map(str, paths), labels or [], strict=False))
    conflicts = [g for g in groups if len({label_of.get(p) for _, p in g}) > 1] if labels else []
    if conflicts:
        messages.append(f"{len(conflicts)} image(s) are byte-identical files under different labels, e.g. "
                        + " = ".join(f"{printable(label_of[p])}:{p}" for _, p in conflicts[0])
                        + "; keep each under its one right class")
    for message in messages:
        log.warning("warning: %s", message)
    return messages


def warn_imbalance(train_counts: dict[str, int], balanced: bool, limit: float = 3.0) -> list[str]:
    """A warning when the largest training class is ``limit`` times the smallest and nothing balances them."""
    if balanced or not train_counts or min(train_counts.values()) == 0:
        return []
    ratio = max(train_counts.values()) / min(train_counts.values())
    if ratio < limit:
        return []
    message = (f"training classes are imbalanced ({ratio:.1f}x between largest and smallest); "
               "consider --class-weight balanced or --sampler weighted, and read balanced accuracy")
    log.warning("warning: %s", message)
    return [message]
