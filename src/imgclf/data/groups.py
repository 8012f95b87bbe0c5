"""Groups of images that must stay in one split (``--group-column patient``): a CSV column names each image's
group, and the held-out splits take whole groups, so no patient is in train and in val or test.

The held-out share is drawn with scikit-learn's ``StratifiedGroupKFold``: one fold of k, for the whole k
nearest to 1/fraction (0.15 -> 1/7 = 14.3%), with classes as balanced across it as whole groups allow.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np

from imgclf.errors import DataError
from imgclf.logs import get_logger
from imgclf.safeio import printable

log = get_logger("index")


def read_groups(csv_path: Path, column: str, paths: list[str]) -> list[str]:
    """The group of each scanned row, looked up by its path (the scan keeps one row per file)."""
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            if column not in (reader.fieldnames or []):
                raise DataError(f"{csv_path} has no {column!r} column (found {reader.fieldnames}); give "
                                "--group-column one of its columns")
            path_columns = [c for c in reader.fieldnames or [] if c.strip().lower() == "path"]
            if len(path_columns) > 1:  # the scan reads the last, a reader of the first gets other files
                raise DataError(f"{csv_path} has {len(path_columns)} path columns ({', '.join(path_columns)}); keep "
                                "one")
            lookup: dict[str, str] = {}
            for row in reader:  # the first row of a repeated path wins, as in the scan
                lookup.setdefault((row[path_columns[0]] or "").strip(), (row[column] or "").strip())
    except csv.Error as err:
        raise DataError(f"{csv_path}:{reader.line_num}: {err}; fix that line") from None
    missing = next((p for p in paths if p not in lookup), None)
    if missing is not None:
        raise DataError(f"{csv_path}: {missing!r} has no row of its own to give its {column!r}; list each image once")
    groups = [lookup[p] for p in paths]
    if empty := groups.count(""):
        log.warning("warning: %s: %d image(s) have no %r; they are held out or kept together, as one group",
                    csv_path, empty, column)
    return groups


def grouped_holdout(labels: list[str], splits: list[str], groups: list[str], name: str, fraction: float,
                    seed: int, source: Path) -> list[str]:
    """``splits`` with about ``fraction`` of the train rows moved to ``name``, whole groups at a time."""
    from sklearn.model_selection import StratifiedGroupKFold  # here: audit and --help answer without scikit-learn

    splits = list(splits)
    train = [i for i, split in enumerate(splits) if split == "train"]
    names = sorted({groups[i] for i in train})
    if fraction <= 0 or not train:
        return splits
    if len(names) < 2:
        raise DataError(f"{source}: its training images form {len(names)} group(s) of --group-column; holding out "
                        f"{name} by group needs at least 2: give more groups, or leave --group-column out")
    folds = min(len(names), max(2, round(1 / fraction)))
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed % 2**32)
    with warnings.catch_warnings():  # "the least populated class has fewer members than n_splits": groups decide
        warnings.simplefilter("ignore", UserWarning)
        _, held = next(splitter.split(np.zeros(len(train)), np.array([labels[i] for i in train]),
                                      np.array([groups[i] for i in train])))
    for position in held:
        splits[train[position]] = name
    return splits


def say_grouped_shares(labels: list[str], splits: list[str], asked: dict[str, tuple[float, int]],
                       column: str) -> None:
    """Whole groups make a held-out share what they add up to: the shares taken (of the images each fraction
    is of) are said beside those asked, and a class that no val or test image holds."""
    taken = ", ".join(f"{name} {splits.count(name)} of {of} images ({splits.count(name) / of:.2f}, asked {share:g})"
                      for name, (share, of) in asked.items())
    log.info("split by %s, whole groups at a time: %s", column, taken)
    for name in asked:
        absent = sorted(set(labels) - {label for label, split in zip(labels, splits, strict=True) if split == name})
        if absent:
            log.warning("warning: no %s image of class %r: all of its %s groups were drawn into other splits; its %s "
                        "metrics are missing (give it more groups)", name, printable(absent[0]), column, name)


def warn_groups_across_splits(groups: list[str], splits: list[str], source: Path, log) -> None:
    """A CSV's own split that puts one group in two splits: said, since the split is kept as given."""
    seen: dict[str, set[str]] = {}
    for group, split in zip(groups, splits, strict=True):
        seen.setdefault(group, set()).add(split)
    spanning = sorted(g for g, found in seen.items() if len(found) > 1)
    if spanning:
        log.warning("warning: %s: %d group(s) of its own split are in two splits (first: %r in %s); the split is "
                    "kept as the CSV gives it", source, len(spanning), printable(spanning[0]),
                    "+".join(sorted(seen[spanning[0]])))
