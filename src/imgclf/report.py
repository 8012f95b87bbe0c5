"""Plots and the run summary; the only module that imports matplotlib. It draws, never computes metrics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve

from . import atomic
from .predictions import Predictions


def _save(fig, path: Path) -> None:
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)


def plot_curves(history: list[dict], path: Path, best_epoch: int | None = None) -> None:
    """Loss and each metric, train vs val, one panel each; a dotted line marks the best epoch."""
    names = sorted({k.split("_", 1)[1] for row in history for k in row if k.startswith(("train_", "val_"))},
                   key=lambda n: (n != "loss", n))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False, layout="constrained")
    epochs = [row["epoch"] for row in history]
    for ax, name in zip(axes[0], names, strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{split}_{name}") for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, ms=3, label=split)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", ls=":", lw=1, label=f"best ({best_epoch})")
        for epoch, stage in stage_starts(history):
            ax.axvline(epoch - 0.5, color="tab:purple", ls="--", lw=0.8)
            ax.annotate(stage, (epoch - 0.5, 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=7, color="tab:purple")
        ax.set(title=name.replace("_", " "), xlabel="epoch", ylabel=name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Training curves")
    _save(fig, path)


def stage_starts(history: list[dict]) -> list[tuple[int, str]]:
    """(first epoch, name) of each stage when a run has more than one."""
    starts = [(row["epoch"], row["stage"]) for i, row in enumerate(history)
              if "stage" in row and (i == 0 or row["stage"] != history[i - 1].get("stage"))]
    return starts if len(starts) > 1 else []


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, split: str) -> None:
    """Counts and row-normalised (recall per true class) side by side."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(classes) + 2.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 1, size), layout="constrained")
    for ax, data, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "normalised by true class", ".2f")):
        image = ax.imshow(data, cmap="Blues", vmin=0)
        fig.colorbar(image, ax=ax, fraction=0.046)
        ticks = range(len(classes))
        ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=f"{split}: {title}")
        ax.set_xticklabels(classes, rotation=45, ha="right")
        ax.set_yticklabels(classes)
        threshold = data.max() / 2 if data.size else 0
        for (r, c), value in np.ndenumerate(data):
            ax.text(c, r, format(value, fmt), ha="center", va="center",
                    color="white" if value > threshold else "black", fontsize=8)
    fig.suptitle("Confusion matrix")
    _save(fig, path)


def plot_roc(preds: Predictions, path: Path, split: str) -> None:
    """One-vs-rest ROC curve per class (one curve for binary tasks)."""
    fig, ax = plt.subplots(figsize=(5, 5), layout="constrained")
    classes = preds.classes[1:] if len(preds.classes) == 2 else preds.classes
    for name in classes:
        k = preds.classes.index(name)
        positives = preds.true == k
        if positives.all() or not positives.any():
            continue  # undefined without both classes present
        fpr, tpr, _ = roc_curve(positives, preds.probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {np.trapezoid(tpr, fpr):.3f})")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC ({split})",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_evaluation(preds: Predictions, metrics: dict, folder: Path, split: str) -> None:
    plot_confusion(np.array(metrics["confusion_matrix"]), preds.classes, folder / f"confusion_{split}.png", split)
    plot_roc(preds, folder / f"roc_{split}.png", split)


def plot_folds(rows: list[dict], path: Path) -> None:
    """Per-fold test (else val) metrics as points, with the mean as a line."""
    split = "test" if any(k.startswith("test_") for k in rows[0]) else "val"
    names = [k for k in rows[0] if k.startswith(f"{split}_") and all(r.get(k) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(rows) + 3), 4), layout="constrained")
    folds = [r["fold"] for r in rows]
    for name in names:
        values = [r[name] for r in rows]
        line, = ax.plot(folds, values, "o-", label=f"{name.removeprefix(split + '_')} (mean {np.mean(values):.3f})")
        ax.axhline(np.mean(values), color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="fold", ylabel=f"{split} metric", title=f"Cross-validation: {split} metrics per fold",
           xticks=folds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def write_history(history: list[dict], path: Path) -> None:
    atomic.write_rows(path, history)


def write_summary(run_path: Path, config: dict, counts: dict, metrics: dict, best_epoch: int | None) -> None:
    """A short human summary: what was trained on what, and how well."""
    lines = [f"# imgclf run `{run_path.name}`", "",
             f"- model: `{config['model']['name']}`, image size {config['data'].get('image_size')}, "
             f"channels {config['data']['channels']}, seed {config['train']['seed']}",
             f"- best epoch: {best_epoch}", "", "| split | " + " | ".join(next(iter(counts.values()), {})) + " |",
             "|---" * (1 + len(next(iter(counts.values()), {}))) + "|"]
    lines += [f"| {split} | " + " | ".join(str(n) for n in row.values()) + " |" for split, row in counts.items()]
    lines += ["", "| split | accuracy | balanced acc. | macro F1 | ROC-AUC | log loss |", "|---|---|---|---|---|---|"]
    for split, m in metrics.items():
        auc = "n/a" if m["roc_auc_ovr"] is None else f"{m['roc_auc_ovr']:.4f}"
        lines.append(f"| {split} | {m['accuracy']:.4f} | {m['balanced_accuracy']:.4f} | {m['f1_macro']:.4f} "
                     f"| {auc} | {m['log_loss']:.4f} |")
    lines += ["", "Plots: `plots/`. Per-image predictions: `predictions_<split>.csv`."]
    atomic.write_text(run_path / "summary.md", "\n".join(lines) + "\n")
