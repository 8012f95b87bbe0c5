"""What a dataset's layout looks like it means, checked where the scan reads it otherwise: Fold0..FoldK folders
are folds (refused as classes), split-like class folders, class names that differ only in case, and CSV columns
train does not read are said."""

from __future__ import annotations

import csv
import unicodedata
from collections import Counter
from pathlib import Path

from imgclf.data.scan import CSV_COLUMNS, FOLD_DIR, visible_dirs
from imgclf.errors import DataError
from imgclf.logs import get_logger

log = get_logger("index")


def refuse_fold_folders(path: Path) -> None:
    """Fold0..FoldK folders are cross-validation folds (cv and audit read them so), never classes."""
    folds = sorted(d.name for d in visible_dirs(path, "dataset folder") if FOLD_DIR.match(d.name))
    if folds:
        raise DataError(f"{path} holds cross-validation folds ({', '.join(folds[:3])}...), not class folders: run "
                        f"imgclf cv {path}, or train one fold (imgclf train {path / folds[0]})")


def warn_split_like_classes(path: Path) -> None:
    """Class folders that all hold the same sub-folders look like splits the aliases missed (seg_train/seg_test):
    their sub-folders, likely the real classes, would be pooled. Said, since the folders are read as asked."""
    try:
        tops = visible_dirs(path, "dataset folder")
        inner = {frozenset(d.name for d in visible_dirs(top)) for top in tops}
    except DataError:  # an unreadable folder: the scan that follows names it
        return
    if len(tops) >= 2 and len(inner) == 1 and len(shared := next(iter(inner))) >= 2:
        log.warning("warning: the class folders of %s (%s) each hold the same sub-folders (%s), which are pooled "
                    "into them; if those are the classes, name the outer folders train, val and test", path,
                    ", ".join(sorted(t.name for t in tops)[:4]), ", ".join(sorted(shared)[:4]))


def warn_case_twins(classes: tuple[str, ...]) -> None:
    """Class names that differ only in letter case (``Cat``, ``cat``), in Unicode form (``é`` as one code point or
    as ``e`` and an accent, which print alike) or in surrounding spaces are two classes: said, with the code
    points where the names print alike."""
    folded = Counter(_alike(name) for name in classes)
    twins = [name for name in classes if folded[_alike(name)] > 1]
    if twins:
        log.warning("warning: classes %s differ only in letter case, accents' Unicode form or surrounding spaces and "
                    "are separate classes; rename them alike to merge them",
                    ", ".join(ascii(name) if not name.isascii() else repr(name) for name in twins))


def _alike(name: str) -> str:
    return unicodedata.normalize("NFC", name).strip().casefold()


def warn_unread_columns(csv_path: Path, group_column: str | None = None, split_given: bool = False) -> None:
    """A CSV's columns beyond path, label, split (and the ``--group-column``) are not read by train: a patient id
    column keeps a patient's images together only when named with --group-column."""
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            header = next(csv.reader(fh, delimiter="\t" if csv_path.suffix.lower() == ".tsv" else ","), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return  # the scan has read it already; nothing new to say
    unread = [name.strip() for name in header if name.strip().lower() not in CSV_COLUMNS and name != group_column]
    if unread and (group_column or split_given):  # the split is the CSV's own, or by group: not at random
        log.warning("warning: %s: column(s) %s are not read", csv_path, ", ".join(unread[:5]))
    elif unread:
        log.warning("warning: %s: column(s) %s are not read; images are split at random (a patient's images can "
                    "land in train and test: --group-column COLUMN keeps each group in one split)", csv_path,
                    ", ".join(unread[:5]))
