"""``imgclf compare RUN RUN ... --out DIR``: trained runs side by side, as a notebook compares its models.

One table (``compare.csv``, one row per run): validation and test metrics, parameter counts and
training time; one PNG per metric with every run's curves overlaid (``curves_<metric>.png``); and
``compare.html``, one self-contained page with both. Everything is read from the run directories
(metrics.json, history.csv, the weights), each checked as loading a run checks it; nothing is re-scored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from imgclf import atomic
from imgclf.config.stages import resolve_stages
from imgclf.errors import ConfigError
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.models.freeze import apply_freeze
from imgclf.reporting.format import read_history
from imgclf.reporting.html import esc, fmt, image, render_page, seconds_of, table
from imgclf.reporting.plots import curve_names, plot_overlaid
from imgclf.runs.base import Run, load_run
from imgclf.runs.ensemble import EnsembleRun
from imgclf.runs.files import read_dataset
from imgclf.runs.heads import ClassicalRun

log = get_logger("compare")
HTML_FILE, CSV_FILE = "compare.html", "compare.csv"
METRICS = ("accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "precision_weighted",
           "recall_weighted", "f1_weighted", "roc_auc_ovr", "log_loss")
CURVE_NAME = re.compile(r"^[a-z0-9_]+$")  # a column name from a run's history.csv becomes a file name


@dataclass
class Compared:
    """One run as the comparison sees it: its name in the table, the run, and its history.csv rows."""

    name: str
    run: Run
    history: list[dict]

    @property
    def epochs(self) -> list[dict]:
        """Training epochs (a scikit-learn head's history lists candidates instead: no curves)."""
        return [] if any(row.get("param") is not None for row in self.history) else self.history


def compare_runs(paths: list[str | Path], out: str | Path) -> dict:
    """Write compare.csv, one overlaid-curve PNG per metric and compare.html into ``out``; return the table."""
    out = Path(out)
    compared = load_compared(paths)
    rows = [table_row(c) for c in compared]
    notes = comparability_notes(compared)
    for note in notes:
        log.warning("warning: %s", note)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_rows(out / CSV_FILE, rows)
    curves = write_curves(compared, out)
    stale = sorted(p.name for p in out.glob("curves_*.png") if p not in curves.values())
    if stale:  # --overwrite replaces same-named files only
        log.warning("warning: %s in %s %s from an earlier comparison, not of these runs: compare.html does not "
                    "show %s", ", ".join(stale[:3]) + (", ..." if len(stale) > 3 else ""), out,
                    "is" if len(stale) == 1 else "are", "it" if len(stale) == 1 else "them")
    differ = settings_that_differ(compared)
    settings = table(differ) if differ else "<p>Every setting in config.yaml is the same (where the runs write to "\
        "aside).</p>"
    sections = [("runs", "Runs side by side", notes_html(notes) + table(side_by_side(rows)) + TABLE_NOTE),
                ("settings", "Settings that differ", settings), ("curves", "Curves", curves_html(curves, compared))]
    atomic.write_text(out / HTML_FILE, render_page(f"Comparison of {len(rows)} runs", sections,
                                                   "the run directories listed above"))
    return {"rows": rows, "curves": [str(p) for p in curves.values()], "notes": notes, "settings": differ,
            "html": str(out / HTML_FILE)}


def settings_that_differ(compared: list[Compared]) -> list[dict]:
    """config.yaml's settings whose values differ between the runs, one row each (stages as one value), so that
    what made one run better is read off the page; where each run writes, and how a path was typed, left out."""
    flat = [_flat(c.run.config.model_dump(mode="json", exclude={"out", "versions"})) for c in compared]
    keys = sorted({key for settings in flat for key in settings})
    return [{"setting": key, **{c.name: settings.get(key) for c, settings in zip(compared, flat, strict=True)}}
            for key in keys if len({repr(settings.get(key)) for settings in flat}) > 1]


def _flat(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif not key.endswith("_as_typed"):
            out[f"{prefix}{key}"] = value if not isinstance(value, list) else json.dumps(value)
    return out


def load_compared(paths: list[str | Path]) -> list[Compared]:
    """The runs, each loaded and checked, under names that tell them apart (folder names, else paths)."""
    if len(paths) < 2:
        raise ConfigError("compare needs two or more run directories")
    resolved = [Path(p).resolve() for p in paths]
    twice = next((p for i, p in enumerate(paths) if resolved[i] in resolved[:i]), None)
    if twice is not None:
        raise ConfigError(f"run {twice} is listed twice; list each run once")
    names = [Path(p).name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    runs = [load_run(p) for p in paths]
    return [Compared(name, run, read_history(run.path / "history.csv")) for name, run in zip(names, runs, strict=True)]


def table_row(c: Compared) -> dict:
    """The run's row of compare.csv: what it is, its size and training time, then val and test metrics."""
    total, trainable = parameter_counts(c.run)
    seconds = seconds_of(c.history)  # None unless every row records its own, as the report shows it
    row = {"run": c.name, "path": str(c.run.path), "model": c.run.describe(), "parameters": total,
           "trainable_parameters": trainable, "epochs": len(c.epochs) or None,
           "training_seconds": None if seconds is None else round(seconds, 2)}
    for split in ("val", "test"):
        metrics = c.run.metrics.get(split, {})
        row.update({f"{split}_{name}": metrics.get(name) for name in METRICS})
    return row


def parameter_counts(run: Run) -> tuple[int, int | None]:
    """All network parameters, and those its last stage trained (None: a scikit-learn head or an ensemble).

    An ensemble counts its members' parameters together: that is the model that predicts.
    """
    if isinstance(run, EnsembleRun):
        return sum(parameter_counts(m)[0] for m in run.members), None
    model = run.model
    total = sum(p.numel() for p in model.parameters())
    if isinstance(run, ClassicalRun):
        return total, None
    _, last = resolve_stages(run.config)[-1]
    apply_freeze(model, last.freeze, last.freeze_bn, say=False)  # its training warned, if it had to
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def comparability_notes(compared: list[Compared]) -> list[str]:
    """Why numbers in one row may not compare with another's: other classes or other images scored."""
    notes = []
    if len({tuple(c.run.classes) for c in compared}) > 1:
        notes.append("the runs have different classes: " + "; ".join(f"{c.name}: {', '.join(c.run.classes)}"
                                                                      for c in compared))
    for split in ("val", "test"):
        files = [c.run.path / f"predictions_{split}.csv" for c in compared]
        if not all(f.is_file() for f in files):
            continue
        paths = {frozenset(Predictions.from_csv(f).paths) for f in files}
        roots = {c.name: _images_root(c.run, split) for c in compared}
        if len(paths) > 1:
            notes.append(f"the runs were scored on different {split} images (different data or split seed): "
                         f"their {split} metrics do not compare image for image")
        elif len(set(roots.values())) > 1 and any(not Path(p).is_absolute() for p in next(iter(paths))):
            notes.append(f"the runs' {split} images have the same names but were read under different folders ("
                         + ", ".join(f"{n}: {r}" for n, r in roots.items()) + "): they may not be the same images")
    return notes + _scoring_notes(compared)


def _images_root(run: Run, split: str) -> str:
    """The folder a run's ``split`` images were read under: evaluate --data's, else its dataset's."""
    return run.metrics.get(split, {}).get("data") or str(Path(read_dataset(run.path / "dataset.json").root).resolve())


def _scoring_notes(compared: list[Compared]) -> list[str]:
    """Runs that decide at different threshold rules, or were tested with different test-time augmentation."""
    notes = []
    rules = {c.name: c.run.threshold_rule for c in compared}
    if len(set(rules.values())) > 1:
        notes.append("the runs decide by different threshold rules (" + ", ".join(f"{n}: {r}" for n, r in rules.items())
                     + "): accuracy, F1, sensitivity and specificity compare decisions made differently")
    ttas = {c.name: c.run.metrics.get("test", {}).get("tta") or c.run.config.evaluate.tta for c in compared}
    if len(set(ttas.values())) > 1:
        notes.append("the runs' test metrics average different test-time augmentations ("
                     + ", ".join(f"{n}: {t}" for n, t in ttas.items()) + ")")
    return notes


def write_curves(compared: list[Compared], out: Path) -> dict[str, Path]:
    """``curves_<metric>.png`` per metric some run recorded per epoch, every run's curve on one axis."""
    histories = {c.name: c.epochs for c in compared if c.epochs}
    rows = [row for h in histories.values() for row in h]
    names = [n for n in curve_names(rows) if CURVE_NAME.match(n)  # a column left empty throughout draws nothing
             and any(row.get(f"{split}_{n}") is not None for row in rows for split in ("train", "val"))]
    written = {}
    for name in names:
        written[name] = out / f"curves_{name}.png"
        plot_overlaid(name, histories, written[name])
    return written


def side_by_side(rows: list[dict]) -> list[dict]:
    """The table turned: one row per field, one column per run, as runs are read side by side."""
    fields = [k for k in rows[0] if k != "run"]
    shown = lambda v: f"{v:,}" if isinstance(v, int) else v  # noqa: E731 - 14,714,688 parameters read at a glance
    return [{"field": field.replace("_", " "), **{row["run"]: shown(row[field]) for row in rows}} for field in fields]


TABLE_NOTE = ("<p>Parameters: the network's weights (BatchNorm running statistics are buffers, not counted); "
              "trainable: those the last stage trained. Training seconds: the sum over history.csv's epochs "
              "(training and validation). Metrics as each run's metrics.json records them, at its own "
              "decision threshold.</p>")


def notes_html(notes: list[str]) -> str:
    return "".join(f'<p class="warn">{esc(n)}</p>' for n in notes)


def curves_html(curves: dict[str, Path], compared: list[Compared]) -> str:
    without = [c.name for c in compared if not c.epochs]
    note = (f"<p>No epochs to draw for {esc(', '.join(without))} (an ensemble or a scikit-learn head).</p>"
            if without else "")
    images = "".join(image(path, f"{name} per epoch") for name, path in curves.items())
    return note + "<p>Validation solid, training dashed; one colour per run.</p>" \
        + f'<div class="plots">{images}</div>'


def format_side_by_side(rows: list[dict]) -> str:
    """The turned table as the terminal shows it."""
    turned = side_by_side([{k: v for k, v in r.items() if k not in ("path", "model")} for r in rows])
    widths = [max(len(str(k)), *(len(console(r[k])) for r in turned)) for k in turned[0]]
    lines = ["  ".join(f"{k!s:<{w}}" for k, w in zip(turned[0], widths, strict=True))]
    lines += ["  ".join(f"{console(v):<{w}}" for v, w in zip(r.values(), widths, strict=True)) for r in turned]
    return "\n".join(lines)


def console(value) -> str:
    """A number as the terminal prints metrics (train, evaluate: 4 decimals); the page has its own rule."""
    return f"{value:.4f}" if isinstance(value, float) else fmt(value)
