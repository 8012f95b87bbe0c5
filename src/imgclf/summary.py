"""Tables for experiments: per-run metric rows, describe() with a confidence interval, CSV output."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from scipy import stats

from . import atomic

RESULT_FILE = "result.json"  # written last in a finished fold or trial: the resume marker
HEADLINE = ("accuracy", "f1_macro", "balanced_accuracy", "roc_auc_ovr")


def fold_metrics(metrics: dict) -> dict:
    """Headline numbers per split, e.g. ``val_accuracy`` and ``test_f1_macro``."""
    return {f"{split}_{name}": metrics[split][name] for split in ("val", "test") if split in metrics
            for name in HEADLINE}


def describe(rows: list[dict], names: list[str]) -> list[dict]:
    """pandas-style describe() per metric, plus a 95% t-interval for the mean."""
    table = []
    for name in names:
        values = np.array([r[name] for r in rows if r.get(name) is not None], dtype=float)
        if not len(values):
            continue
        n, mean = len(values), float(values.mean())
        std = float(values.std(ddof=1)) if n > 1 else 0.0
        half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
        q = np.percentile(values, [25, 50, 75])
        table.append({"metric": name, "count": n, "mean": mean, "std": std, "min": float(values.min()),
                      "25%": q[0], "50%": q[1], "75%": q[2], "max": float(values.max()),
                      "ci95_low": mean - half, "ci95_high": mean + half})
    return table


def write_rows(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k in row))

    def write(fh) -> None:
        out = csv.DictWriter(fh, fieldnames=columns)
        out.writeheader()
        out.writerows(rows)

    atomic.write_with(path, write)
