"""``report.html``: one self-contained page per run, cross-validation or grid directory.

Everything is read from the directory's files (metrics.json, predictions_<split>.csv, history.csv,
plots/, folds.csv, leaderboard.csv), so the page agrees with them; images are embedded as data
URIs and nothing is loaded from the network. No script runs in the page.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from imgclf import atomic
from imgclf.errors import RunDirError
from imgclf.evaluation.metrics import expected_calibration_error
from imgclf.evaluation.predictions import Predictions
from imgclf.reporting.baselines import baselines_html
from imgclf.reporting.evalplots import plot_evaluation
from imgclf.reporting.format import TABLE_FIX, esc, fmt, read_history, read_rows, table, with_ci
from imgclf.reporting.gallery import render_cases
from imgclf.reporting.plots import PAGE_WIDTH_PX
from imgclf.runs import files as runfiles
from imgclf.runs.base import load_run
from imgclf.safeio import read_capped
from imgclf.versions import version

REPORT_FILE = "report.html"
__all__ = ["esc", "fmt", "image", "read_rows", "render_page", "table", "write_report"]  # compare.py's too
# Each embedded PNG, read at most this far: a figure imgclf draws is at most PAGE_WIDTH_PX wide and well under 1 MB
# (a confusion matrix of a thousand classes a few MB), so 32 MB is generous for any of them, while a 400 MB file
# named curves.png can no longer swell the page (and the memory of its base64 copy) to gigabytes.
MAX_PNG_BYTES = 32 << 20
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOT_FIX = "delete it (imgclf report draws missing evaluation plots again)"
# The text column is as wide as the figures are drawn (plots.PAGE_WIDTH_PX), so each PNG shows at its natural size:
# a full-width one (curves, confusion matrices) alone on its line, half-width ones two to a line. Wide tables scroll.
CSS = (f"body{{font:15px/1.45 system-ui,sans-serif;max-width:{PAGE_WIDTH_PX}px;margin:2em auto;padding:0 1em;"
       + """color:#222}h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}th,td{border:1px solid #ddd;padding:.25em .6em;
text-align:right}th{background:#f4f4f4}td:first-child,th:first-child,td.text{text-align:left}.scroll{overflow-x:auto}
img{max-width:100%;height:auto}.figure img{display:block}.plots{display:flex;flex-wrap:wrap;gap:20px;
align-items:flex-start}.warn{background:#fff4e0;border-left:4px solid #e69500;padding:.4em .8em}
.verdict{background:#eef7ee;border-left:4px solid #3a9a3a;padding:.4em .8em}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}.case{width:260px;font-size:.8em}
.case img{width:100%;image-rendering:pixelated}pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:.85em}""")


def refresh_report(run) -> Path | None:
    """report.html again after a command changed the run's files, for a run that keeps one: trained with its
    report (``--no-report`` keeps none), or holding one already (``imgclf report`` wrote it)."""
    if run.config.evaluate.report or (run.path / "report.html").exists():
        return write_report(run.path)
    return None


def write_report(path: str | Path) -> Path:
    """Write ``report.html`` into a run, cross-validation or grid directory; return its path."""
    path = Path(path)
    if (path / "folds.csv").is_file():
        title, sections = f"Cross-validation {path.name}", cv_sections(path)
    elif (path / "leaderboard.csv").is_file():
        title, sections = f"Grid search {path.name}", grid_sections(path)
    elif (path / "config.yaml").is_file():
        title, sections = f"Run {path.name}", run_sections(path)
    else:
        raise RunDirError(f"{path} is not a run, cv or grid directory (no config.yaml, folds.csv or leaderboard.csv)")
    atomic.write_text(path / REPORT_FILE, render_page(title, sections))
    return path / REPORT_FILE


def render_page(title: str, sections: list[tuple[str, str, str]], source: str = "the files in this directory") -> str:
    """One self-contained page: (id, heading, HTML) sections under a table of contents; no script, no fetch."""
    body = "".join(f'<section id="{sid}"><h2>{esc(name)}</h2>{content}</section>' for sid, name, content in sections)
    contents = " · ".join(f'<a href="#{sid}">{esc(name)}</a>' for sid, name, _ in sections)
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><nav>{contents}</nav>{body}"
            f"<footer><p>Written by imgclf {esc(version())} from {esc(source)}.</p></footer></body></html>")


def run_sections(path: Path) -> list[tuple[str, str, str]]:
    run = load_run(path)
    metrics = run.metrics
    splits = [s for s in ("train", "val", "test") if s in metrics]
    sections = [("summary", "Summary", summary_html(run, splits)),
                ("dataset", "Dataset", dataset_html(path)),
                ("config", "Configuration", "<details><summary>config.yaml (every setting of the run)</summary>"
                 f"<pre>{esc((path / 'config.yaml').read_text(encoding='utf-8'))}</pre></details>"),
                ("training", "Training", training_html(path, run.config.train.monitor)),
                ("metrics", "Metrics", metrics_html(metrics, splits, _threshold_note(path) + _tta_note(metrics)
                                                                 + _data_note(metrics)))]
    rows = runfiles.read_baselines(path / "metrics.json")
    if rows:
        sections.insert(1, ("baselines", "This model vs baselines",
                            baselines_html(metrics, rows, run.describe(), training_seconds(path))))
    for split in splits:
        sections.append((f"plots-{split}", f"Evaluation plots: {split}", evaluation_plots_html(run, split)))
    if splits:
        sections.append(("gallery", f"Gallery ({splits[-1]})", gallery_html(run, splits[-1])))
    return sections


def summary_html(run, splits: list[str]) -> str:
    items = [f"model: {esc(run.describe())}", f"classes: {esc(', '.join(run.classes))}"]
    if splits:
        last = splits[-1]
        m = run.metrics[last]
        items.append(f"{esc(last)}: accuracy {with_ci(m.get('accuracy'), (m.get('intervals') or {}).get('accuracy'))}"
                     f", macro F1 {fmt(m.get('f1_macro'))}, ROC-AUC {fmt(m.get('roc_auc_ovr'))} on {m['n']} images")
    return "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"


def dataset_html(path: Path) -> str:
    info = runfiles.read_dataset(path / "dataset.json")
    counts = info.counts
    classes = sorted({c for row in counts.values() for c in row})
    rows = [{"split": split, **{c: row.get(c, 0) for c in classes}, "total": sum(row.values())}
            for split, row in counts.items()]
    warnings = list(info.warnings)
    warnings += [f"skipped unreadable image {p}: {reason}" for p, reason in info.skipped]
    notes = "".join(f'<p class="warn">{esc(w)}</p>' for w in warnings) or "<p>No audit warnings.</p>"
    return f"<p>Images under <code>{esc(info.root)}</code>.</p>{table(rows)}{notes}"


def training_html(path: Path, monitor: str = "val_loss") -> str:
    history = read_history(path / "history.csv")
    if not history:
        return "<p>No training: an ensemble of trained runs.</p>" if (path / "ensemble.json").is_file() \
            else "<p>No training history.</p>"
    if "param" in history[0]:  # a scikit-learn head: one row per candidate of its validation grid
        return "<p>Candidates fitted on the frozen features, scored on validation:</p>" + table(history)
    stages: dict[str, list[dict]] = {}
    for row in history:
        stages.setdefault(row.get("stage") or "train", []).append(row)
    pick = min if monitor.endswith("loss") else max  # the monitor's best, as early stopping and restore-best read it
    summary = [{"stage": name, "epochs": f"{rows[0]['epoch']}-{rows[-1]['epoch']}",
                f"best {monitor}": pick((r[monitor] for r in rows if r.get(monitor) is not None), default=None),
                "seconds": seconds_of(rows)} for name, rows in stages.items()]
    return table(summary) + figure(path / "plots" / "curves.png", "training curves")


def training_seconds(path: Path) -> float | None:
    """The run's training time: the sum of history.csv's seconds, where it records them."""
    return seconds_of(read_history(path / "history.csv"))


def seconds_of(rows: list[dict]) -> float | None:
    """The sum of the rows' seconds; None when a row does not record its own (an older or edited history)."""
    seconds = [row.get("seconds") for row in rows]
    return sum(seconds) if seconds and None not in seconds else None


def metrics_html(metrics: dict, splits: list[str], note: str = "") -> str:
    rows = []
    for split in splits:
        m, ci = metrics[split], metrics[split].get("intervals") or {}  # read_metrics checked their types
        row = {"split": split, "n": m["n"], "accuracy": with_ci(m.get("accuracy"), ci.get("accuracy")),
               "balanced acc.": fmt(m.get("balanced_accuracy")), "macro F1": fmt(m.get("f1_macro")),
               "ROC-AUC": with_ci(m.get("roc_auc_ovr"), ci.get("roc_auc")), "log loss": fmt(m.get("log_loss")),
               "ECE": fmt(m.get("ece"))}
        if "sensitivity" in m:
            row.update({"sensitivity": with_ci(m["sensitivity"], ci.get("sensitivity")),
                        "specificity": with_ci(m.get("specificity"), ci.get("specificity")),
                        "PPV": fmt(m.get("ppv")), "NPV": fmt(m.get("npv"))})
        rows.append(row)
    parts = [note, table(rows), "<p>95% intervals: Wilson for proportions, seeded percentile bootstrap for "
                                "ROC-AUC. ECE: expected calibration error of the top-class confidence.</p>"]
    for split in splits:
        per_class = [{"class": c, "precision": fmt(v["precision"]), "recall": fmt(v["recall"]),
                      "F1": fmt(v["f1-score"]), "support": int(v["support"])}
                     for c, v in (metrics[split].get("per_class") or {}).items()]
        parts.append(f"<h3>Per class: {esc(split)}</h3>{table(per_class)}")
    return "".join(parts)


def evaluation_plots_html(run, split: str) -> str:
    plots = run.path / "plots"
    names = [f"confusion_{split}", f"roc_{split}", f"pr_{split}", f"reliability_{split}"]
    if not all((plots / f"{n}.png").is_file() for n in names) and (run.path / f"predictions_{split}.csv").is_file():
        preds = Predictions.from_csv(run.path / f"predictions_{split}.csv", run.classes)
        metrics = run.metrics[split]
        if "ece" not in metrics:
            correct = preds.probs.argmax(axis=1) == preds.true
            metrics = {**metrics, "ece": expected_calibration_error(preds.confidence, correct)}
        plot_evaluation(preds, metrics, plots, split, run.positive)
    return figure(plots / f"{names[0]}.png", names[0]) + \
        '<div class="plots">' + "".join(image(plots / f"{n}.png", n) for n in names[1:]) + "</div>"


def gallery_html(run, split: str) -> str:
    preds = Predictions.from_csv(run.path / f"predictions_{split}.csv", run.classes)
    root = Path(runfiles.read_dataset(run.path / "dataset.json").root)
    groups, note = render_cases(run, preds, root, split)
    parts = [f'<p class="warn">{esc(note)}</p>' if note else ""]
    for name, cases in groups.items():
        cards = "".join(
            '<div class="case">' + (f'<img alt="Grad-CAM of {esc(c.path)}" src="{data_uri(c.png)}">' if c.png else "")
            + f"<div><b>{esc(c.predicted)}</b> ({fmt(c.confidence)}), true {esc(c.true)}</div>"
            f"<div><code>{esc(c.path)}</code></div></div>" for c in cases)
        parts.append(f"<h3>{esc(name.capitalize())}</h3>"
                     + (f'<div class="gallery">{cards}</div>' if cases else "<p>None.</p>"))
    return "".join(parts) + "<p>Left: the image as the model saw it. Right: Grad-CAM for the predicted class.</p>"


def cv_sections(path: Path) -> list[tuple[str, str, str]]:
    sections = [("folds", "Folds", table(read_rows(path / "folds.csv"))),
                ("summary", "Summary over folds", table(read_rows(path / "summary.csv"))
                 + figure(path / "plots" / "folds.png", "metrics per fold"))]
    oof = path / "metrics_oof.json"
    body = (metrics_html({"out-of-fold": runfiles.read_metrics(oof, one_split=True, fix=TABLE_FIX)}, ["out-of-fold"])
            if oof.exists() or oof.is_symlink() else f'<p class="warn">{esc(oof)} is missing; {TABLE_FIX}.</p>')
    return [*sections, ("metrics", "Pooled out-of-fold metrics", body)]


def _test_reads(grid: Path, best: str) -> str:
    """Which trials were scored on test: the best alone, or also earlier bests (the grid re-run, ranked anew)."""
    folder = grid / "trials"
    earlier = sorted(p.name for p in (folder.iterdir() if folder.is_dir() else ())
                     if p.name != best and (p / "predictions_test.csv").is_file())
    if not earlier:
        return "test was read once, for the best trial."
    return (f'<span class="warn">test was read for {len(earlier) + 1} trials: the best, and {esc(", ".join(earlier))}'
            " when earlier runs of this grid ranked it best; its test figures are no longer an untouched estimate"
            "</span>.")


def grid_sections(path: Path) -> list[tuple[str, str, str]]:
    file = path / "best.json"
    best = runfiles.read_grid_best(file) if file.exists() or file.is_symlink() else {}
    note = (f"<p>Best trial <code>{esc(best['best_trial'])}</code>, parameters {esc(json.dumps(best['params']))}; "
            f'its <a href="trials/{esc(best["best_trial"])}/{REPORT_FILE}">own report</a>. Trials were ranked on '
            f"validation; {_test_reads(path, best['best_trial'])}</p>") if best else \
        f'<p class="warn">{esc(file)} is missing; {TABLE_FIX}.</p>'
    sections = [("leaderboard", "Leaderboard", note + table(read_rows(path / "leaderboard.csv")))]
    if best.get("test"):
        sections.append(("metrics", "Best trial on test", metrics_html({"test": best["test"]}, ["test"])))
    return sections


def _tta_note(metrics: dict) -> str:
    """Splits scored with another test-time augmentation than the run predicts with (``evaluate --tta``)."""
    return _recorded_note(metrics, "tta", "with", "Scored with another test-time augmentation than the run's",
                          "predict, serve and the export average as config.yaml says")


def _data_note(metrics: dict) -> str:
    """Splits scored on images read under another folder than the run's dataset (``evaluate --data``)."""
    return _recorded_note(metrics, "data", "under", "Scored on images read under another folder than the run's "
                          "dataset", "evaluate --data")


def _recorded_note(metrics: dict, key: str, joint: str, lead: str, why: str) -> str:
    """One warning line naming the splits whose metrics record ``key`` (how they were scored otherwise)."""
    other = [f"{split} {joint} <code>{esc(str(m[key]))}</code>" for split, m in metrics.items() if m.get(key)]
    return f'<p class="warn">{lead}: {", ".join(other)} ({why}).</p>' if other else ""


def _threshold_note(path: Path) -> str:
    file = path / "threshold.json"
    if not file.is_file():
        return "<p>Decisions: the most probable class.</p>"
    t = runfiles.read_threshold(file, runfiles.read_classes(path / "classes.json"))
    return (f"<p>Decisions: {esc(t.positive_class)} when its probability is at least {fmt(t.threshold)}, "
            f"chosen on validation by <code>{esc(t.rule)}</code> (validation metrics at it are optimistic).</p>")


def image(path: Path, alt: str) -> str:
    """A PNG embedded in the page; none when it is missing, a note instead of one that is not a figure imgclf drew."""
    if not (path.exists() or path.is_symlink()):
        return ""
    try:
        return f'<img alt="{esc(alt)}" src="{data_uri(read_png(path))}">'
    except RunDirError as err:
        return f'<p class="warn">{esc(path.name)} left out: {esc(err)}</p>'


def read_png(path: Path) -> bytes:
    """A plot's bytes: a regular file in the run (not a link out of it), a PNG, at most MAX_PNG_BYTES."""
    if path.is_symlink():
        raise RunDirError(f"{path} is a link, not a figure imgclf drew; {PLOT_FIX}")
    png = read_capped(path, MAX_PNG_BYTES, RunDirError, PLOT_FIX, why="far more than any figure imgclf draws")
    if not png.startswith(PNG_SIGNATURE):
        raise RunDirError(f"{path} is not a PNG image; {PLOT_FIX}")
    return png


def figure(path: Path, alt: str) -> str:
    """An image on a line of its own, at its natural width up to the page's."""
    shown = image(path, alt)
    return f'<div class="figure">{shown}</div>' if shown else ""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
