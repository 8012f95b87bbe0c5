"""The evaluation figures of a scored split: confusion matrix, ROC, precision-recall and reliability, drawn
from its saved predictions and metrics (never computed here), at the report's sizes (``plots``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from imgclf import atomic
from imgclf.errors import RunDirError
from imgclf.evaluation.metrics import reliability
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.reporting import plots
from imgclf.reporting.plots import HALF_WIDTH_PX, PAGE_WIDTH_PX, SMALL_PT, MaxNLocator, inches, literal_text, plt
from imgclf.runs.files import read_dataset

log = get_logger("plots")


NUMBER_CELL_IN = 0.4  # a cell this wide holds "0.333" at SMALL_PT
LABEL_CELL_IN = 0.15  # a row this tall holds a 9 pt class name


def confusion_layout(n: int, longest_name: int) -> tuple[float, float, bool, bool, bool]:
    """(cell size, class-name margin (inches), side by side, numbers in cells, class names on the axes).

    Cells are 0.6 in while both panels fit the report's column side by side; then one above the other,
    shrinking to fit the column's width. A cell too small for its number (or a row for its class name)
    goes without: the figure stays one column wide however many classes there are."""
    column_in = inches(PAGE_WIDTH_PX)

    def cell(label_in: float) -> float:
        extra_in = label_in + 0.9  # a panel: labels, cells, colour bar
        return 0.6 if 2 * (extra_in + 0.6 * n) <= column_in else min(0.6, (column_in - extra_in) / n)

    named_in = 0.55 + 0.075 * min(longest_name, 24)  # tick labels, 9 pt
    labelled = cell(named_in) >= LABEL_CELL_IN  # decided with the names' margin: without it, there is no room
    label_in = named_in if labelled else 0.55  # else the axis titles only, and the cells get the rest
    size = cell(label_in)
    return size, label_in, 2 * (label_in + 0.9 + size * n) <= column_in, size >= NUMBER_CELL_IN, labelled


@literal_text
def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, split: str) -> None:
    """Counts and row-normalised (recall per true class) panels: side by side when both fit the report's
    column at a readable cell size, else one above the other; cells shrink with many classes, never their text
    below SMALL_PT: a warning says when the cells' numbers or the class names had to be left out."""
    cm = np.asarray(cm)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    n = len(classes)
    cell_in, label_in, side_by_side, numbered, labelled = confusion_layout(n, max(len(c) for c in classes))
    panel = (label_in + 0.9 + cell_in * n, label_in + 0.5 + cell_in * n)
    fig, axes = plt.subplots(*((1, 2) if side_by_side else (2, 1)), layout="constrained",
                             figsize=(panel[0] * (2 if side_by_side else 1), panel[1] * (1 if side_by_side else 2)))
    text_pt = float(np.clip(cell_in * 17, SMALL_PT, 10))  # "0.333" fits a cell
    for ax, data, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], norm, "share of each true class", ".3f")):
        image = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if data is norm else None,  # shares on one scale
                          aspect="auto")  # the figure size makes cells square; "equal" can swing the layout
        fig.colorbar(image, ax=ax, fraction=0.046).ax.tick_params(labelsize=9)
        ticks = range(n) if labelled else []
        ax.set_xticks(ticks, classes if labelled else [], rotation=45, ha="right", fontsize=9)
        ax.set_yticks(ticks, classes if labelled else [], fontsize=9)
        ax.set_xlabel("predicted", fontsize=9)
        ax.set_ylabel("true", fontsize=9)
        ax.set_title(f"Confusion matrix ({split})\n{title}", fontsize=11)
        threshold = (1 if data is norm else data.max()) / 2
        for (r, c), value in np.ndenumerate(data) if numbered else ():
            ax.text(c, r, format(value, fmt), ha="center", va="center",
                    color="white" if value > threshold else "black", fontsize=text_pt)
    plots.save_figure(fig, path)
    left_out = [what for what, kept in (("numbers", numbered), ("class names", labelled)) if not kept]
    if left_out:
        log.warning("warning: %s: %d classes leave its cells too small for their %s; the counts are in "
                    "metrics.json's confusion_matrix, in classes.json's order", path.name, n, " and ".join(left_out))


def one_vs_rest(preds: Predictions, positive: int | None = None):
    """(class name, is-this-class, its probability) per class with both outcomes present; binary
    tasks give the positive class only."""
    ks = [positive if positive is not None else 1] if len(preds.classes) == 2 else range(len(preds.classes))
    for k in ks:
        hits = preds.true == k
        if hits.any() and not hits.all():
            yield preds.classes[k], hits, preds.probs[:, k]


NAMED_CURVES = 8  # one-vs-rest curves a legend names; with more classes, the lowest-scoring ones
NAMED_COLOURS = [f"C{k}" for k in (0, 1, 2, 3, 4, 5, 6, 8)]  # the colour cycle without its grey (C7)
GREY_CURVE = {"color": "0.7", "lw": 0.6}  # a class's curve left out of the legend


def named_curves(scores: dict[str, float]) -> set[str]:
    """The classes whose curves get a colour and a legend entry: all of them, or with more than NAMED_CURVES,
    the NAMED_CURVES lowest-scoring (the ones to look at); the legend's title says the rest are grey."""
    if len(scores) <= NAMED_CURVES:
        return set(scores)
    return set(sorted(scores, key=scores.get)[:NAMED_CURVES])


def legend_or_note(ax, scores: dict[str, float], named: set[str], what: str, split: str, loc: str) -> None:
    """The curves' legend (titled, when some classes are left out of it, with which ones it names), or where a
    split has no curve (it holds one class: nothing is ranked against anything), a note that says so, not an
    empty frame and matplotlib's "no artists" warning."""
    if scores:
        title = None if len(named) == len(scores) else f"the {len(named)} lowest {what} of {len(scores)}; others grey"
        ax.legend(loc=loc, fontsize=SMALL_PT, title=title, title_fontsize=SMALL_PT)
    else:
        ax.text(0.5, 0.5, f"no curve: every {split} image is of one class", ha="center", va="center",
                fontsize=SMALL_PT, transform=ax.transAxes)


def curve_styles(names: list[str], named: set[str]) -> list[tuple[str, dict]]:
    """(class, line style) in drawing order: the grey curves first, below the named ones in their colours."""
    colours = iter(NAMED_COLOURS)
    styled = [(name, {"color": next(colours)} if name in named else GREY_CURVE) for name in names]
    return sorted(styled, key=lambda pair: pair[0] in named)


@literal_text
def plot_roc(preds: Predictions, path: Path, split: str, positive: int | None = None,
             threshold: float | None = None) -> None:
    """One-vs-rest ROC curve per class (one curve for binary tasks, with the operating point)."""
    fig, ax = plt.subplots(figsize=(inches(HALF_WIDTH_PX),) * 2, layout="constrained")
    curves = {name: (hits, score, roc_auc_score(hits, score)) for name, hits, score in one_vs_rest(preds, positive)}
    scores = {name: c[2] for name, c in curves.items()}
    named = named_curves(scores)
    for name, style in curve_styles(list(curves), named):
        hits, score, auc = curves[name]
        fpr, tpr, _ = roc_curve(hits, score)
        ax.plot(fpr, tpr, **style, **({"label": f"{name} (AUC {auc:.3f})"} if name in named else {}))
        if threshold is not None:
            called = score >= threshold
            ax.plot((called & ~hits).sum() / (~hits).sum(), (called & hits).sum() / hits.sum(), "o", color="black",
                    label=f"threshold {threshold:.3f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    ax.set(xlabel="false positive rate (1 - specificity)", ylabel="true positive rate (sensitivity)",
           title=f"ROC ({split})", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    legend_or_note(ax, scores, named, "AUC", split, "lower right")
    ax.grid(alpha=0.3)
    plots.save_figure(fig, path)


@literal_text
def plot_pr(preds: Predictions, path: Path, split: str, positive: int | None = None) -> None:
    """One-vs-rest precision-recall curve per class, with average precision (the PR AUC)."""
    fig, ax = plt.subplots(figsize=(inches(HALF_WIDTH_PX),) * 2, layout="constrained")
    curves = {name: (hits, score, average_precision_score(hits, score))
              for name, hits, score in one_vs_rest(preds, positive)}
    scores = {name: c[2] for name, c in curves.items()}
    named = named_curves(scores)
    for name, style in curve_styles(list(curves), named):
        hits, score, ap = curves[name]
        precision, recall, _ = precision_recall_curve(hits, score)
        ax.plot(recall, precision, **style, **({"label": f"{name} (AP {ap:.3f})"} if name in named else {}))
        if name in named:
            ax.axhline(hits.mean(), color=style["color"], ls=":", lw=0.8)  # a random classifier's precision
    ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title=f"Precision-recall ({split})",
           xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    legend_or_note(ax, scores, named, "AP", split, "lower left")
    ax.grid(alpha=0.3)
    plots.save_figure(fig, path)


@literal_text
def plot_reliability(bins: list[dict], ece: float | None, path: Path, split: str) -> None:
    """Accuracy against confidence per bin (a calibrated model sits on the diagonal), counts below.
    Empty bins have no accuracy: they are left out of both panels, not drawn at zero."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(inches(HALF_WIDTH_PX), 6), height_ratios=[3, 1], sharex=True,
                                      layout="constrained")
    filled = [b for b in bins if b["count"]]
    width = bins[0]["high"] - bins[0]["low"]
    top.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
            edgecolor="black", alpha=0.7, label="accuracy of the bin")
    top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="tab:red",
             label="at the bin's mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    shown = "n/a" if ece is None else f"{ece:.3f}"
    top.set(ylabel="accuracy", title=f"Reliability ({split}): ECE {shown}", ylim=(0, 1.02))
    top.legend(fontsize=SMALL_PT, loc="best")
    bottom.bar([b["low"] for b in filled], [b["count"] for b in filled], width=width, align="edge", color="gray")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set(xlabel="confidence (top class)", ylabel="images", xlim=(0, 1))
    plots.save_figure(fig, path)


def plot_evaluation(preds: Predictions, metrics: dict, folder: Path, split: str, positive: int | None = None) -> None:
    cm, n = np.array(metrics.get("confusion_matrix") or [], dtype=np.int64), len(preds.classes)
    if cm.shape != (n, n):  # metrics.json is read from disk: its schema checks it is square, not its size
        raise RunDirError(f"metrics.json's {split} confusion_matrix is {' x '.join(map(str, cm.shape))}, the run has "
                          f"{n} classes; re-run imgclf evaluate")
    plot_confusion(cm, preds.classes, folder / f"confusion_{split}.png", split)
    plot_roc(preds, folder / f"roc_{split}.png", split, positive, metrics.get("threshold"))
    plot_pr(preds, folder / f"pr_{split}.png", split, positive)
    bins = reliability(preds.confidence, preds.probs.argmax(axis=1) == preds.true)
    plot_reliability(bins, metrics.get("ece"), folder / f"reliability_{split}.png", split)


def redraw_after_scoring(run, splits) -> None:
    """After a command scored ``splits`` (evaluate; a grid's or the default's closing test pass): their plots, and
    summary.md's table (a run that has one: an ensemble has none), so no file shows numbers metrics.json lacks."""
    draw_evaluations(run, splits)
    if (run.path / "summary.md").is_file():
        counts = read_dataset(run.path / "dataset.json").counts
        plots.write_summary(run.path, run.config.model_dump(mode="json"), counts, run.metrics, run.meta.epoch)


def draw_evaluations(run, splits) -> None:
    """The confusion matrix, ROC, PR and reliability plots of each scored split, from its saved predictions."""
    metrics = run.metrics
    for split in splits:
        csv_file = run.path / f"predictions_{split}.csv"
        if split in metrics and csv_file.is_file():
            preds = Predictions.from_csv(csv_file, run.classes)
            plot_evaluation(preds, metrics[split], atomic.inner_folder(run.path, "plots"), split, run.positive)
