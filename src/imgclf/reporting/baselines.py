"""The run next to its baselines (metrics.json's ``baselines``): a table for report.html, lines for the console.

Each baseline or candidate row was scored on the run's own validation and test images, so the numbers compare
directly. Both forms say plainly, in one sentence per case, when the model does not beat one of them on the
validation selection metric (macro-F1); a tie does not beat.
"""

from __future__ import annotations

from imgclf.reporting.format import esc, fmt, table

SELECTION_METRIC, SELECTION_LABEL = "f1_macro", "macro-F1"
# (metrics.json key, the page's column, the console's shorter column)
METRICS = (("accuracy", "accuracy", "acc."), ("balanced_accuracy", "balanced acc.", "bal. acc."),
           ("f1_macro", "macro F1", "macro-F1"))
SPLITS = ("val", "test")
RUN_ROLE = "this run"


def verdicts(metrics: dict, rows: list[dict]) -> list[str]:
    """One sentence per baseline the model does not beat on val macro-F1; else one that it beats them all."""
    own = metrics.get("val", {}).get(SELECTION_METRIC)
    scored = [(row["val"][SELECTION_METRIC], row) for row in rows
              if (row.get("val") or {}).get(SELECTION_METRIC) is not None]
    if own is None or not scored:
        return ["There is no validation macro-F1 to compare the model with its baselines on."] if rows else []
    lost = [f"The model does not beat the {_called(row)} on val {SELECTION_LABEL} ({fmt(own)} vs {fmt(score)})."
            for score, row in scored if score >= own]
    if lost:
        return lost
    best, row = max(scored, key=lambda pair: pair[0])
    return [f"The model beats every baseline on val {SELECTION_LABEL} ({fmt(own)} vs at best {fmt(best)}, "
            f"the {_called(row)})."]


def comparison_rows(metrics: dict, rows: list[dict], name: str, seconds: float | None = None,
                    short: bool = False) -> list[dict]:
    """Table rows: the run first, then each baseline or candidate, on the run's splits and metrics."""
    splits = [s for s in SPLITS if s in metrics]
    run = {"name": name, "role": RUN_ROLE, **{s: metrics[s] for s in splits}, "seconds": seconds,
           "note": "the model this report describes"}
    return [{"model": row["name"], "role": row["role"],
             **{f"{split} {short_label if short else label}": (row.get(split) or {}).get(key)
                for split in splits for key, label, short_label in METRICS},
             "seconds": row.get("seconds"), "note": row.get("note") or "—"}
            for row in [run, *rows]]


def baselines_html(metrics: dict, rows: list[dict], name: str, seconds: float | None = None) -> str:
    """The sentence(s) above the table "This model vs baselines"; empty when the run has no baselines."""
    if not rows:
        return ""
    sentences = "".join(f'<p class="{"warn" if "does not beat" in s else "verdict"}">{esc(s)}</p>'
                        for s in verdicts(metrics, rows))
    return (sentences + table(comparison_rows(metrics, rows, name, seconds))
            + "<p>Every row is scored on this run's own validation and test images. Baselines: what a model must "
              "beat to have learned anything worth its training; candidates: the other models tried for this run, "
              "the best on validation kept.</p>")


def baseline_lines(metrics: dict, rows: list[dict] | None = None, name: str = RUN_ROLE,
                   seconds: float | None = None) -> list[str]:
    """The same comparison as console lines: a header, one aligned line per model, then the verdict sentences.

    ``rows`` defaults to ``metrics["baselines"]`` (metrics.json as written); no rows, no lines."""
    rows = metrics.get("baselines", []) if rows is None else rows
    if not rows:
        return []
    table_rows = comparison_rows(metrics, rows, name, seconds, short=True)
    labels = [r["model"] if r["role"] == RUN_ROLE else f"{r['model']} ({r['role']})" for r in table_rows]
    heads = [key for key in table_rows[0] if key not in ("model", "role", "note")]
    cells = [[fmt(row[key]) for key in heads] for row in table_rows]
    first = max(len(label) for label in ["model", *labels])
    widths = [max(len(head), *(len(c[i]) for c in cells)) for i, head in enumerate(heads)]

    def line(label: str, values: list[str]) -> str:
        return f"  {label:<{first}}" + "".join(f"  {v:>{w}}" for v, w in zip(values, widths, strict=True))

    return ["This model vs baselines, on the same images:", line("model", heads),
            *(line(label, row) for label, row in zip(labels, cells, strict=True)), *verdicts(metrics, rows)]


def _called(row: dict) -> str:
    """How a sentence names a row: "majority class baseline", "simple_cnn candidate"."""
    return f"{row['name']} {row['role']}"
