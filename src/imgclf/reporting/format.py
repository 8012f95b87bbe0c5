"""How the report pages write numbers and tables: one rule for every page, so 0.985 never sits next to 0.9848.

The rule: an integer is written as an integer (counts, epochs, seeds, folds); every other number is written with
3 decimals, whatever it measures (metrics in [0, 1], interval ends, losses, seconds, thresholds). Numbers read
back from a CSV file as text follow the same rule ("0.8333" and "1.0" become 0.833 and 1.000). A setting is not
a measurement: a grid's ``param_*`` columns are shown exactly as written, so a learning rate of 0.0001 stays.
"""

from __future__ import annotations

import csv
import html
import io
import math
import re
from pathlib import Path

from imgclf.errors import RunDirError
from imgclf.safeio import read_capped

DECIMALS = 3
INTEGER = re.compile(r"[-+]?\d+")
DECIMAL = re.compile(r"[-+]?(\d+\.\d*|\.\d+|\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", re.IGNORECASE)
VERBATIM_PREFIXES = ("param_",)  # settings, not measurements
MAX_HISTORY_BYTES = 8 << 20  # history.csv: ~400 bytes an epoch; parsed rows take ~30x the file (as compare reads it)
MAX_HISTORY_COLUMNS = 64
TEXT_COLUMNS = ("stage", "param")  # history.csv's words; every other cell is a number
HISTORY_FIX = "restore it, or delete it to report the run without its training history"


def fmt(value) -> str:
    """``value`` by the page's number rule; text that is not a number as it is; missing as ``n/a``."""
    if value is None or value == "":
        return "n/a"
    if isinstance(value, bool | int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{DECIMALS}f}" if math.isfinite(value) else "n/a"
    text = str(value).strip()
    if INTEGER.fullmatch(text):
        return text
    return fmt(float(text)) if DECIMAL.fullmatch(text) else str(value)


def with_ci(value, interval) -> str:
    """A value with its 95% interval, all three by the page's rule."""
    return fmt(value) + (f" ({fmt(float(interval[0]))}-{fmt(float(interval[1]))})" if interval else "")


MAX_TABLE_BYTES = 16 << 20  # a cv's folds.csv or a grid's leaderboard.csv: a row per fold or trial
TABLE_FIX = "re-run the cv or grid in that folder to write it again"


def read_rows(path: Path) -> list[dict]:
    """A table an experiment wrote (folds.csv, summary.csv, leaderboard.csv), size-capped; a damaged one is a
    one-line RunDirError naming it."""
    try:
        text = read_capped(path, MAX_TABLE_BYTES, RunDirError, TABLE_FIX).decode("utf-8-sig")
        return list(csv.DictReader(io.StringIO(text, newline="")))
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing; {TABLE_FIX}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise RunDirError(f"{path} is not a readable CSV ({err}); {TABLE_FIX}") from None


def read_history(path: Path) -> list[dict]:
    """history.csv, size-capped and checked: an epoch on every row, a finite number (or nothing: None) in every
    cell but ``TEXT_COLUMNS``; none when the run has no history.csv. A damaged one is a one-line RunDirError."""
    if not (path.exists() or path.is_symlink()):
        return []
    try:
        text = read_capped(path, MAX_HISTORY_BYTES, RunDirError, HISTORY_FIX).decode("utf-8-sig")
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if len(reader.fieldnames or ()) > MAX_HISTORY_COLUMNS:  # each metric column becomes a figure
            raise RunDirError(f"{path} has {len(reader.fieldnames)} columns, more than imgclf writes "
                              f"({MAX_HISTORY_COLUMNS} at most); {HISTORY_FIX}")
        return [_history_row(row, path, line) for line, row in enumerate(reader, 2)]
    except (UnicodeDecodeError, csv.Error) as err:
        raise RunDirError(f"{path} is not a readable CSV ({err}); {HISTORY_FIX}") from None


def _history_row(row: dict, path: Path, line: int) -> dict:
    """One row of history.csv with its numbers parsed (cells beyond the header, which have no name, dropped)."""
    clean = {key: None if value in (None, "") else value if key in TEXT_COLUMNS else _number(value, key, path, line)
             for key, value in row.items() if key is not None}
    if not isinstance(clean.get("epoch"), int) or clean["epoch"] < 1:
        raise RunDirError(f"{path}:{line}: epoch is {row.get('epoch')!r:.40}, not an epoch number (1, 2, ...); "
                          f"{HISTORY_FIX}")
    return clean


def _number(text: str, key: str, path: Path, line: int) -> int | float:
    """A cell as the number it writes: an integer stays one (epochs, counts), so the page shows it as written."""
    try:
        number = int(text) if INTEGER.fullmatch(text.strip()) else float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise RunDirError(f"{path}:{line}: {key} is {text[:40]!r}, not a finite number; {HISTORY_FIX}")
    return number


def table(rows: list[dict]) -> str:
    """An HTML table in a container that scrolls sideways when it is wider than the page."""
    if not rows:
        return "<p>None.</p>"
    head = "".join(f"<th>{esc(k).replace('_', '_<wbr>')}</th>" for k in rows[0])  # val_<wbr>f1_<wbr>macro may wrap
    body = "".join("<tr>" + "".join(td(cell(k, v)) for k, v in row.items()) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def td(text: str) -> str:
    """A cell: numbers right-aligned so their decimals line up, words left-aligned."""
    numeric = text == "n/a" or re.match(r"[-+]?\d", text)
    return f"<td>{esc(text)}</td>" if numeric else f'<td class="text">{esc(text)}</td>'


def cell(column: str, value) -> str:
    if str(column).startswith(VERBATIM_PREFIXES) and value not in (None, ""):
        return str(value)
    return fmt(value)


def esc(text) -> str:
    return html.escape(str(text))
