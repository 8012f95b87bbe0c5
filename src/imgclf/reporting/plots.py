"""Plots and the run summary; the only module that imports matplotlib. It draws, never computes metrics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from imgclf import atomic
from imgclf.evaluation.metrics import reliability
from imgclf.evaluation.predictions import Predictions

# Every figure of report.html is drawn at DPI for a page column PAGE_WIDTH_PX wide (html.py's CSS uses the
# same width), so the browser shows each PNG at its natural size: a PAGE_WIDTH_PX-wide figure fills the column,
# a HALF_WIDTH_PX one sits next to another. No text is set below SMALL_PT: 8 pt at 110 DPI is 12 px on screen.
DPI = 110
PAGE_WIDTH_PX = 1100
HALF_WIDTH_PX = 540
SMALL_PT = 8


def _save(fig, path: Path) -> None:
    """Lay out and render once, then write the pixels: ``savefig`` would run the constrained layout twice."""
    fig.set_dpi(DPI)
    fig.canvas.draw()
    with atomic.atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, np.asarray(fig.canvas.buffer_rgba()), format="png", dpi=DPI)
    plt.close(fig)


def _inches(px: float) -> float:
    return px / DPI


CURVE_COLUMNS = 3  # panels per row of curves.png (loss, accuracy, precision, recall, F1, ...), wrapping


def curve_names(history: list[dict]) -> list[str]:
    """The metrics a history has for train or val (``loss``, ``accuracy``, ``f1_macro``...), loss first."""
    return sorted({k.split("_", 1)[1] for row in history for k in row
                   if k.startswith(("train_", "val_")) and k != "train_seconds"},
                  key=lambda n: (n != "loss", n))


def plot_curves(history: list[dict], path: Path, best_epoch: int | None = None) -> None:
    """Loss and each metric, train vs val, one titled panel each; a dotted line marks the best epoch.

    One figure title and one legend for all panels; the figure is as wide as the report's column."""
    names = curve_names(history)
    columns = min(CURVE_COLUMNS, len(names))
    rows = -(-len(names) // columns)
    width = _inches(PAGE_WIDTH_PX if columns == CURVE_COLUMNS else HALF_WIDTH_PX * columns / 2)
    fig = plt.figure(figsize=(width, 2.6 * rows + 0.5), layout="constrained")
    grid = fig.add_gridspec(rows, columns)
    axes = [fig.add_subplot(grid[k // columns, k % columns]) for k in range(len(names))]  # no empty panels
    epochs = [row["epoch"] for row in history]
    for ax, name in zip(axes, names, strict=True):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [row.get(f"{split}_{name}") for row in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, ms=3, label=split,
                        color="C0" if split == "train" else "C1")
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", ls=":", lw=1, label=f"best epoch ({best_epoch})")
        for epoch, stage in stage_starts(history):
            ax.axvline(epoch - 0.5, color="tab:purple", ls="--", lw=0.8)
            ax.annotate(stage, (epoch - 0.5, 1), xycoords=("data", "axes fraction"), rotation=90,
                        va="top", ha="right", fontsize=SMALL_PT, color="tab:purple")
        ax.set_title(name.replace("_", " "), fontsize=11)
        ax.set_xlabel("epoch", fontsize=9)
        ax.tick_params(labelsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    handles = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels(),
                                                                          strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="outside upper right", ncols=len(handles), fontsize=9)
    fig.suptitle("Training curves", x=0.01, ha="left", fontsize=12, fontweight="bold")
    _save(fig, path)


def plot_overlaid(name: str, histories: dict[str, list[dict]], path: Path) -> None:
    """One metric of several runs on one axis: val solid, train dashed, one colour per run."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2), layout="constrained")
    for i, (run, history) in enumerate(histories.items()):
        colour = f"C{i % 10}"
        for split, style in (("val", "-"), ("train", "--")):
            points = [(row["epoch"], row[f"{split}_{name}"]) for row in history
                      if row.get(f"{split}_{name}") is not None]
            if points:
                ax.plot(*zip(*points, strict=True), style, color=colour, lw=1.4, label=f"{run} ({split})")
    ax.set(title=name.replace("_", " "), xlabel="epoch", ylabel=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def stage_starts(history: list[dict]) -> list[tuple[int, str]]:
    """(first epoch, name) of each stage when a run has more than one."""
    starts = [(row["epoch"], row["stage"]) for i, row in enumerate(history)
              if "stage" in row and (i == 0 or row["stage"] != history[i - 1].get("stage"))]
    return starts if len(starts) > 1 else []


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, split: str) -> None:
    """Counts and row-normalised (recall per true class) panels: side by side when both fit the report's
    column at a readable cell size, else one above the other; cells shrink with many classes, never their text
    below SMALL_PT."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n, label_in = len(classes), 0.55 + 0.075 * min(max(len(c) for c in classes), 24)  # tick labels, 9 pt
    column_in, extra_in = _inches(PAGE_WIDTH_PX), label_in + 0.9  # a panel: labels, cells, colour bar
    cell_in = 0.6 if 2 * (extra_in + 0.6 * n) <= column_in else float(np.clip((column_in - extra_in) / n, 0.4, 0.6))
    side_by_side = 2 * (extra_in + cell_in * n) <= column_in
    panel = (extra_in + cell_in * n, label_in + 0.5 + cell_in * n)
    fig, axes = plt.subplots(*((1, 2) if side_by_side else (2, 1)), layout="constrained",
                             figsize=(panel[0] * (2 if side_by_side else 1), panel[1] * (1 if side_by_side else 2)))
    text_pt = float(np.clip(cell_in * 17, SMALL_PT, 10))  # "0.333" fits a cell
    for ax, data, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "share of each true class", ".3f")):
        image = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if data is norm else None)  # shares on one scale
        fig.colorbar(image, ax=ax, fraction=0.046).ax.tick_params(labelsize=9)
        ticks = range(n)
        ax.set_xticks(ticks, classes, rotation=45, ha="right", fontsize=9)
        ax.set_yticks(ticks, classes, fontsize=9)
        ax.set_xlabel("predicted", fontsize=9)
        ax.set_ylabel("true", fontsize=9)
        ax.set_title(f"Confusion matrix ({split})\n{title}", fontsize=11)
        threshold = (1 if data is norm else data.max()) / 2
        for (r, c), value in np.ndenumerate(data):
            ax.text(c, r, format(value, fmt), ha="center", va="center",
                    color="white" if value > threshold else "black", fontsize=text_pt)
    _save(fig, path)


def one_vs_rest(preds: Predictions, positive: int | None = None):
    """(class name, is-this-class, its probability) per class with both outcomes present; binary
    tasks give the positive class only."""
    ks = [positive if positive is not None else 1] if len(preds.classes) == 2 else range(len(preds.classes))
    for k in ks:
        hits = preds.true == k
        if hits.any() and not hits.all():
            yield preds.classes[k], hits, preds.probs[:, k]


def plot_roc(preds: Predictions, path: Path, split: str, positive: int | None = None,
             threshold: float | None = None) -> None:
    """One-vs-rest ROC curve per class (one curve for binary tasks, with the operating point)."""
    fig, ax = plt.subplots(figsize=(_inches(HALF_WIDTH_PX),) * 2, layout="constrained")
    for name, hits, score in one_vs_rest(preds, positive):
        fpr, tpr, _ = roc_curve(hits, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(hits, score):.3f})")
        if threshold is not None:
            called = score >= threshold
            ax.plot((called & ~hits).sum() / (~hits).sum(), (called & hits).sum() / hits.sum(), "o", color="black",
                    label=f"threshold {threshold:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           title=f"ROC ({split})", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(loc="lower right", fontsize=SMALL_PT)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_pr(preds: Predictions, path: Path, split: str, positive: int | None = None) -> None:
    """One-vs-rest precision-recall curve per class, with average precision (the PR AUC)."""
    fig, ax = plt.subplots(figsize=(_inches(HALF_WIDTH_PX),) * 2, layout="constrained")
    for name, hits, score in one_vs_rest(preds, positive):
        precision, recall, _ = precision_recall_curve(hits, score)
        line, = ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(hits, score):.3f})")
        ax.axhline(hits.mean(), color=line.get_color(), ls=":", lw=0.8)  # a random classifier's precision
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"Precision-recall ({split})",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.legend(loc="lower left", fontsize=SMALL_PT)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_reliability(bins: list[dict], ece: float, path: Path, split: str) -> None:
    """Accuracy against confidence per bin (a calibrated model sits on the diagonal), counts below.
    Empty bins have no accuracy: they are left out of both panels, not drawn at zero."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(_inches(HALF_WIDTH_PX), 6), height_ratios=[3, 1], sharex=True,
                                      layout="constrained")
    filled = [b for b in bins if b["count"]]
    width = bins[0]["high"] - bins[0]["low"]
    top.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
            edgecolor="black", alpha=0.7, label="accuracy of the bin")
    top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="tab:red",
             label="at the bin's mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    top.set(ylabel="accuracy", title=f"Reliability ({split}): ECE {ece:.3f}", ylim=(0, 1.02))
    top.legend(fontsize=SMALL_PT, loc="best")
    bottom.bar([b["low"] for b in filled], [b["count"] for b in filled], width=width, align="edge", color="gray")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set(xlabel="confidence (top class)", ylabel="images", xlim=(0, 1))
    _save(fig, path)


def plot_evaluation(preds: Predictions, metrics: dict, folder: Path, split: str, positive: int | None = None) -> None:
    plot_confusion(np.array(metrics["confusion_matrix"]), preds.classes, folder / f"confusion_{split}.png", split)
    plot_roc(preds, folder / f"roc_{split}.png", split, positive, metrics.get("threshold"))
    plot_pr(preds, folder / f"pr_{split}.png", split, positive)
    bins = reliability(preds.confidence, preds.probs.argmax(axis=1) == preds.true)
    plot_reliability(bins, metrics["ece"], folder / f"reliability_{split}.png", split)


def plot_folds(rows: list[dict], path: Path) -> None:
    """Per-fold test (else val) metrics as points, with the mean as a line."""
    split = "test" if any(k.startswith("test_") for k in rows[0]) else "val"
    names = [k for k in rows[0] if k.startswith(f"{split}_") and all(r.get(k) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(min(max(5, 0.5 * len(rows) + 3), _inches(PAGE_WIDTH_PX)), 4), layout="constrained")
    folds = [r["fold"] for r in rows]
    for name in names:
        values = [r[name] for r in rows]
        line, = ax.plot(folds, values, "o-", label=f"{name.removeprefix(split + '_')} (mean {np.mean(values):.3f})")
        ax.axhline(np.mean(values), color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="fold", ylabel=f"{split} metric", title=f"Cross-validation: {split} metrics per fold",
           xticks=folds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=SMALL_PT, loc="best")
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


def as_rgb(image: np.ndarray) -> np.ndarray:
    """An ``H x W x 1`` gray image as three equal channels; RGB unchanged."""
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A heatmap in [0, 1] blended over an ``H x W x C`` uint8 image (jet: red is most attended)."""
    rgb = as_rgb(image)
    colours = matplotlib.colormaps["jet"](heatmap)[..., :3] * 255
    return (rgb * (1 - alpha) + colours * alpha).clip(0, 255).astype(np.uint8)


def save_overlay(explanation, classes: list[str], path: Path) -> None:
    """The image and its Grad-CAM overlay side by side, titled with the explained class."""
    e = explanation
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2), layout="constrained")
    gray = e.image.shape[2] == 1
    axes[0].imshow(e.image[..., 0] if gray else e.image, cmap="gray" if gray else None)
    axes[1].imshow(overlay(e.image, e.heatmap))
    axes[0].set_title(Path(e.path).name, fontsize=SMALL_PT)
    axes[1].set_title(f"Grad-CAM: {classes[e.target]} ({e.probs[e.target]:.2f})", fontsize=SMALL_PT)
    for ax in axes:
        ax.axis("off")
    _save(fig, path)


def save_feature_maps(maps: list[tuple[str, np.ndarray]], path: Path) -> None:
    """One row per layer, one panel per channel (each scaled to its own range)."""
    columns = max(4, *(len(m) for _, m in maps))
    fig = plt.figure(figsize=(columns * 0.9, len(maps) * 1.25), layout="constrained")
    for band, (name, channels) in zip(fig.subfigures(len(maps), 1, squeeze=False)[:, 0], maps, strict=True):
        band.suptitle(name, fontsize=7, x=0.01, ha="left")  # a band per layer: its title takes no panel's width
        for k, ax in enumerate(band.subplots(1, columns, squeeze=False)[0]):
            ax.axis("off")
            if k < len(channels):
                ax.imshow(channels[k], cmap="viridis")
    fig.suptitle("Feature maps", fontsize=9)
    _save(fig, path)


def draw_evaluations(run, splits) -> None:
    """The confusion matrix, ROC, PR and reliability plots of each scored split, from its saved predictions."""
    metrics = run.metrics
    for split in splits:
        csv_file = run.path / f"predictions_{split}.csv"
        if split in metrics and csv_file.is_file():
            plot_evaluation(Predictions.from_csv(csv_file), metrics[split], run.path / "plots", split, run.positive)
