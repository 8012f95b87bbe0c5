"""Plots and the run summary: the figures of training (curves, folds, Grad-CAM, feature maps) and how every
figure is saved; ``evalplots`` draws the evaluation figures with them. They draw, never compute metrics."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from imgclf import atomic
from imgclf.logs import get_logger
from imgclf.safeio import printable

# Every figure of report.html is drawn at DPI for a page column PAGE_WIDTH_PX wide (html.py's CSS uses the
# same width), so the browser shows each PNG at its natural size: a PAGE_WIDTH_PX-wide figure fills the column,
# a HALF_WIDTH_PX one sits next to another. No text is set below SMALL_PT: 8 pt at 110 DPI is 12 px on screen.
DPI = 110
PAGE_WIDTH_PX = 1100
HALF_WIDTH_PX = 540
SMALL_PT = 8


def literal_text(draw):
    """``draw`` with every text set as written: a class or file name holding ``$`` signs is not mathtext (which
    would fail to parse, or set it as a formula)."""
    return matplotlib.rc_context({"text.parse_math": False})(draw)


MISSING_GLYPH = re.compile(r"Glyph (\d+) .*missing from font")
log = get_logger("plots")
LAYOUT_PASSES = 3  # at most: constrained layout need not settle in one


def save_figure(fig, path: Path) -> None:
    """Lay out and render, then write the pixels (as ``savefig`` would, without its extra hidden draw).

    Constrained layout can swing between passes (rotated tick labels next to fixed-aspect images): a pass
    that leaves any text outside the figure, cut off in the PNG, is followed by another, up to LAYOUT_PASSES."""
    fig.set_dpi(DPI)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        for _ in range(LAYOUT_PASSES):
            fig.canvas.draw()
            if fits_inside(fig):
                break
    missing = sorted({chr(int(m[1])) for w in said if (m := MISSING_GLYPH.search(str(w.message)))})
    for other in (w for w in said if not MISSING_GLYPH.search(str(w.message))):  # said as they would have been
        warnings.warn_explicit(other.message, other.category, other.filename, other.lineno)
    if missing:  # matplotlib's own warning is two raw lines per character and figure; this one, once a command
        log.warning("warning: the figures' font has no glyph for %s (in a class or file name): shown as boxes",
                    ", ".join(missing[:5]))
    with atomic.atomic_path(path) as tmp:
        matplotlib.image.imsave(tmp, np.asarray(fig.canvas.buffer_rgba()), format="png", dpi=DPI)
    plt.close(fig)


def fits_inside(fig) -> bool:
    """Whether everything drawn (axes, their labels, legends, titles) lies within the figure's edges."""
    drawn, edges = fig.get_tightbbox(fig.canvas.get_renderer()), fig.bbox_inches
    return edges.x0 <= drawn.x0 and drawn.x1 <= edges.x1 and edges.y0 <= drawn.y0 and drawn.y1 <= edges.y1


def inches(px: float) -> float:
    return px / DPI


CURVE_COLUMNS = 3  # panels per row of curves.png (loss, accuracy, precision, recall, F1, ...), wrapping


def curve_names(history: list[dict]) -> list[str]:
    """The metrics a history has for train or val (``loss``, ``accuracy``, ``f1_macro``...), loss first."""
    return sorted({k.split("_", 1)[1] for row in history for k in row
                   if k.startswith(("train_", "val_")) and k != "train_seconds"},
                  key=lambda n: (n != "loss", n))


@literal_text
def plot_curves(history: list[dict], path: Path, best_epoch: int | None = None, best_label: str = "best epoch") -> None:
    """Loss and each metric, train vs val, one titled panel each; a dotted line marks the best epoch (``best_label``
    says by what, and whether the model kept it).

    One figure title and one legend for all panels; the figure is as wide as the report's column."""
    names = curve_names(history)
    columns = min(CURVE_COLUMNS, len(names))
    rows = -(-len(names) // columns)
    width = inches(PAGE_WIDTH_PX if columns == CURVE_COLUMNS else HALF_WIDTH_PX * columns / 2)
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
            ax.axvline(best_epoch, color="gray", ls=":", lw=1, label=f"{best_label} ({best_epoch})")
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
    save_figure(fig, path)


@literal_text
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
    save_figure(fig, path)


def stage_starts(history: list[dict]) -> list[tuple[int, str]]:
    """(first epoch, name) of each stage when a run has more than one."""
    starts = [(row["epoch"], row["stage"]) for i, row in enumerate(history)
              if "stage" in row and (i == 0 or row["stage"] != history[i - 1].get("stage"))]
    return starts if len(starts) > 1 else []


@literal_text
def plot_folds(rows: list[dict], path: Path) -> None:
    """Per-fold test (else val) metrics as points, with the mean as a line."""
    split = "test" if any(k.startswith("test_") for k in rows[0]) else "val"
    names = [k for k in rows[0] if k.startswith(f"{split}_") and all(r.get(k) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(min(max(5, 0.5 * len(rows) + 3), inches(PAGE_WIDTH_PX)), 4), layout="constrained")
    folds = [r["fold"] for r in rows]
    for name in names:
        values = [r[name] for r in rows]
        line, = ax.plot(folds, values, "o-", label=f"{name.removeprefix(split + '_')} (mean {np.mean(values):.3f})")
        ax.axhline(np.mean(values), color=line.get_color(), ls=":", lw=1)
    ax.set(xlabel="fold", ylabel=f"{split} metric", title=f"Cross-validation: {split} metrics per fold",
           xticks=folds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=SMALL_PT, loc="best")
    save_figure(fig, path)


def write_history(history: list[dict], path: Path) -> None:
    atomic.write_rows(path, history)


def _best_epoch_line(config: dict, best_epoch: int | None, kept_best: bool) -> str:
    """Which epoch is best by what, and whether the model's weights are that epoch's."""
    kept = "" if kept_best or best_epoch is None else "; the model keeps the last epoch's weights (restore-best off)"
    return f"best epoch by {config['train'].get('monitor', 'val_loss')}: {best_epoch}{kept}"


def write_summary(run_path: Path, config: dict, counts: dict, metrics: dict, best_epoch: int | None,
                  kept_best: bool = True) -> None:
    """A short human summary: what was trained on what, and how well."""
    lines = [f"# imgclf run `{run_path.name}`", "",
             f"- model: `{config['model']['name']}`, image size {config['data'].get('image_size')}, "
             f"channels {config['data']['channels']}, seed {config['train']['seed']}",
             f"- {_best_epoch_line(config, best_epoch, kept_best)}", "",
             "| split | " + " | ".join(next(iter(counts.values()), {})) + " |",
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


@literal_text
def save_overlay(explanation, classes: list[str], path: Path) -> None:
    """The image and its Grad-CAM overlay side by side, titled with the explained class."""
    e = explanation
    fig, axes = plt.subplots(1, 2, figsize=(6, 3.2), layout="constrained")
    gray = e.image.shape[2] == 1
    axes[0].imshow(e.image[..., 0] if gray else e.image, cmap="gray" if gray else None)
    axes[1].imshow(overlay(e.image, e.heatmap))
    axes[0].set_title(printable(Path(e.path).name), fontsize=SMALL_PT)  # a name's bytes may not be UTF-8
    axes[1].set_title(f"Grad-CAM: {classes[e.target]} ({e.probs[e.target]:.2f})", fontsize=SMALL_PT)
    for ax in axes:
        ax.axis("off")
    save_figure(fig, path)


@literal_text
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
    save_figure(fig, path)
