"""Dataset index: every image with its label and split, decided once and saved in the run.

Layouts (``data.layout=auto`` detects them):
- ``split_folders``: ``DATA/{train,val|valid|validation,test}/<class>/...``; a missing val is a
  stratified, seeded share of train;
- ``class_folders``: ``DATA/<class>/...``, one pool split stratified into train/val/test;
- ``csv``: a CSV/TSV with ``path,label[,split]``; without a split column it is a pool.

What the scan skips, refuses or merges (unreadable folders, special files, empty labels, one file
reached twice) is decided in ``scan.py``. ``split.csv`` is UTF-8, except that file names which are not
UTF-8 keep their original bytes (surrogateescape), so they round-trip through save and load.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgclf import atomic
from imgclf.config import DataConfig, cli_flag
from imgclf.data.groups import grouped_holdout, read_groups, say_grouped_shares, warn_groups_across_splits
from imgclf.data.layout_checks import (
    refuse_fold_folders,
    warn_case_twins,
    warn_split_like_classes,
    warn_unread_columns,
)
from imgclf.data.scan import (
    Row,
    drop_repeated_files,
    is_ignored,
    is_image,
    list_dir,
    scan_class_folders,
    scan_csv,
    split_folders,
    visible_dirs,
)
from imgclf.errors import DataError, RunDirError
from imgclf.logs import get_logger
from imgclf.safeio import class_name_problem, printable, require_regular, special_file_kind

SPLITS = ("train", "val", "test")
log = get_logger("index")


@dataclass(frozen=True)
class DatasetIndex:
    """Images (paths relative to ``root``), their labels and splits, and the sorted class list."""

    root: Path
    paths: tuple[str, ...]
    labels: tuple[str, ...]
    splits: tuple[str, ...]
    classes: tuple[str, ...]

    def subset(self, split: str) -> DatasetIndex:
        keep = [i for i, s in enumerate(self.splits) if s == split]
        return self.select(keep)

    def select(self, keep: list[int]) -> DatasetIndex:
        return DatasetIndex(self.root, tuple(self.paths[i] for i in keep), tuple(self.labels[i] for i in keep),
                            tuple(self.splits[i] for i in keep), self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def targets(self) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.classes)}
        return np.array([lookup[label] for label in self.labels], dtype=np.int64)

    def abspath(self, i: int) -> Path:
        return self.root / self.paths[i]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: count}} for the splits present."""
        table: dict[str, dict[str, int]] = {}
        for split in SPLITS:
            got = Counter(label for label, s in zip(self.labels, self.splits, strict=True) if s == split)
            if got:
                table[split] = {c: got.get(c, 0) for c in self.classes}
        return table

    def save(self, path: Path) -> None:
        def write(fh) -> None:
            out = csv.writer(fh)
            out.writerow(["path", "label", "split"])
            out.writerows(zip(self.paths, self.labels, self.splits, strict=True))

        atomic.write_with(path, write)

    @classmethod
    def load(cls, path: Path, root: Path, classes: list[str], max_rows: int | None = None) -> DatasetIndex:
        """A run's split.csv; ``max_rows`` (the images its dataset.json counts): more rows is damage, refused
        as soon as the first extra row is read, so a swollen file never costs more memory than the run's own."""
        require_regular(path, RunDirError, "the run directory is damaged; re-train it")  # a FIFO would block
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            rows = [(r["path"], r["label"], r["split"]) for r in itertools.islice(csv.DictReader(fh),
                                                                                 None if max_rows is None
                                                                                 else max_rows + 1)]
        if max_rows is not None and len(rows) > max_rows:
            raise RunDirError(f"{path} lists more images than the {max_rows} its dataset.json counts; the run "
                              "directory is damaged: re-train it")
        paths, labels, splits = zip(*rows, strict=True) if rows else ((), (), ())
        return cls(Path(root), tuple(paths), tuple(labels), tuple(splits), tuple(classes))


def detect_layout(path: Path) -> str:
    if path.is_file():
        if path.suffix.lower() in (".csv", ".tsv"):
            return "csv"
        raise DataError(f"{path} is a file; give a dataset folder or a .csv/.tsv listing path,label[,split]")
    if kind := special_file_kind(path):
        if kind != "folder":
            raise DataError(f"dataset {path} is a {kind}; give a dataset folder or a .csv/.tsv file")
    elif not path.is_dir():
        raise DataError(f"dataset {path} does not exist")
    return "split_folders" if split_folders(path) else "class_folders"


def build_index(cfg: DataConfig, seed: int) -> DatasetIndex:
    """Scan ``cfg.path`` into an index with train/val[/test] splits and checked classes."""
    if not cfg.path:
        raise DataError("no dataset given; pass a folder or CSV (imgclf train DATA)")
    path = Path(cfg.path).expanduser().resolve()
    layout = detect_layout(path) if cfg.layout == "auto" else cfg.layout
    if cfg.layout == "auto" and layout == "class_folders":
        refuse_fold_folders(path)
    root = path.parent if layout == "csv" else path
    rows = scan_rows(path, layout)
    if not rows:
        raise DataError(f"no images found in {path}; expected one sub-folder per class holding images")
    rng = np.random.default_rng(seed)
    splits = [s for _, _, s in rows]
    warn_unused_fractions(cfg, splits, path)
    groups, given = _groups(cfg, path, layout, rows, splits), any(splits)
    val_fraction, asked = cfg.val_fraction, {}
    if not given:  # a pool: hold out test first, then val; both fractions are of the whole pool
        splits = _hold_out(rows, ["train"] * len(rows), groups, "test", cfg.test_fraction, rng, path, keep=2)
        asked["test"] = (cfg.test_fraction, len(rows))  # by class, val takes its share of the class's images
        val_fraction = cfg.val_fraction / (1 - cfg.test_fraction) if groups is not None else cfg.val_fraction
    if "val" not in splits:  # val_fraction is of the pool, or of the given train split
        asked["val"] = (cfg.val_fraction, len(rows) if not given else splits.count("train"))
        splits = _hold_out(rows, splits, groups, "val", val_fraction, rng, path, keep=1, at_least=1, of_all=not given)
    if groups is not None and asked:
        say_grouped_shares([label for _, label, _ in rows], splits, asked, cfg.group_column)
    index = _make_index(root, [(p, label, s) for (p, label, _), s in zip(rows, splits, strict=True)])
    check_classes(index, source=str(path))
    warn_case_twins(index.classes)
    if layout == "csv":
        warn_unread_columns(path, cfg.group_column, given)
    warn_tiny_classes(index)
    return index


def warn_unused_fractions(cfg: DataConfig, given: list[str], path: Path) -> None:
    """A held-out fraction that the dataset's own splits make moot is said, not ignored."""
    defaults = DataConfig.model_fields
    unused = [f"{cli_flag('data', name)} {getattr(cfg, name):g}" for name, moot in (
        ("test_fraction", any(given)), ("val_fraction", "val" in given))
        if moot and getattr(cfg, name) != defaults[name].default]
    if unused:
        log.warning("warning: %s: no effect, %s has its own splits (%s)", " and ".join(unused), path,
                    ", ".join(sorted(set(given))))


def scan_rows(path: Path, layout: str) -> list[Row]:
    """(path, label, split) rows of a dataset in a known layout; split is empty for a pool.

    A file reached twice keeps only its first row, with a warning (see ``scan.drop_repeated_files``).
    """
    root = path.parent if layout == "csv" else path
    return drop_repeated_files(_rows_of_layout(path, layout), root, path)


def _rows_of_layout(path: Path, layout: str) -> list[Row]:
    if layout == "csv":
        return scan_csv(path)
    if layout == "class_folders":
        warn_split_like_classes(path)
        return [(p, label, "") for p, label, _ in scan_class_folders(path, "", path)]
    folders = split_folders(path)
    if "train" not in folders:
        raise DataError(f"{path} has no train folder (found {sorted(folders)}); add DATA/train/<class>/")
    others = sorted(d.name for d in visible_dirs(path, "dataset folder") if d not in folders.values())
    if others:
        log.warning("warning: %s: %s %s not a train, val or test folder: not read", path, ", ".join(others),
                    "is" if len(others) == 1 else "are")
    loose = [e.name for e in list_dir(path, "dataset folder") if e.is_file() and is_image(e.name)
             and not is_ignored(e.name)]
    if loose:
        log.warning("warning: %d image(s) directly in %s (%s, ...) are not read: a dataset with split folders reads "
                    "DATA/<split>/<class>/ only", len(loose), path, loose[0])
    rows: list[Row] = []
    for split, folder in folders.items():
        found = scan_class_folders(folder, split, path)
        if not found:
            raise DataError(f"split folder {folder} holds no images; fill it or remove it")
        rows += found
    return rows


def _groups(cfg: DataConfig, path: Path, layout: str, rows: list[Row], splits: list[str]) -> list[str] | None:
    """Each row's group (``--group-column``, a CSV's column), or None when no column is given."""
    if cfg.group_column is None:
        return None
    if layout != "csv":
        raise DataError(f"--group-column {cfg.group_column!r} needs a CSV dataset with that column ({path} is "
                        f"{layout.replace('_', ' ')})")
    groups = read_groups(path, cfg.group_column, [p for p, _, _ in rows])
    if any(splits):
        warn_groups_across_splits(groups, splits, path, log)
    return groups


def _hold_out(rows: list[Row], splits: list[str], groups: list[str] | None, name: str, fraction: float,
              rng: np.random.Generator, source: Path, keep: int, at_least: int = 0, of_all: bool = False) -> list[str]:
    if groups is None:
        return _stratified_holdout(rows, splits, name, fraction, rng, keep, at_least, of_all)
    return grouped_holdout([label for _, label, _ in rows], splits, groups, name, fraction, int(rng.integers(2**31)),
                           source)


def _stratified_holdout(rows: list[Row], splits: list[str], name: str, fraction: float, rng: np.random.Generator,
                        keep: int, at_least: int = 0, of_all: bool = False) -> list[str]:
    """Move ``fraction`` of each class's train rows (``of_all``: of all its rows, test's too) to split ``name``.

    Each class keeps ``keep`` train images where it has them (test keeps 2, so that validation can still take
    one) and gives at least ``at_least`` (validation: 1, so that model selection sees a tiny class). Not
    sklearn's train_test_split: it refuses classes with a single image, which small medical sets have."""
    splits, totals = list(splits), Counter(label for _, label, _ in rows)
    by_class: dict[str, list[int]] = {}
    for i, (_, label, _) in enumerate(rows):
        if splits[i] == "train":
            by_class.setdefault(label, []).append(i)
    for label in sorted(by_class):
        members = by_class[label]
        base = totals[label] if of_all else len(members)  # 0.3 of 8 is 2 for val as for test (not 0.43 of 6: 3)
        wanted = max(at_least, round(fraction * base)) if fraction > 0 else 0
        n_hold = max(0, min(len(members) - keep, wanted))
        for i in rng.permutation(members)[:n_hold]:
            splits[int(i)] = name
    return splits


def _make_index(root: Path, rows: list[Row]) -> DatasetIndex:
    rows = sorted(rows, key=lambda r: (SPLITS.index(r[2]), r[1], r[0]))
    classes = tuple(sorted({label for _, label, split in rows if split == "train"}))
    paths, labels, splits = (tuple(col) for col in zip(*rows, strict=True))
    return DatasetIndex(root, paths, labels, splits, classes)


def check_classes(index: DatasetIndex, source: str) -> None:
    """Fail before training when a split is empty or holds classes that train lacks."""
    present = set(index.splits)
    if "train" not in present:
        raise DataError(f"{source}: the train split is empty")
    for name in index.classes:
        require_utf8(name, f"{source}: class {name!r}")
        if problem := class_name_problem(name):  # a line break in a label would forge lines in every summary
            raise DataError(f"{source}: class '{printable(name[:40])}' {problem}; rename it")
    if len(index.classes) < 2:
        raise DataError(f"{source}: training needs at least 2 classes, found {list(index.classes)}")
    for split in ("val", "test"):
        extra = Counter(label for label, s in zip(index.labels, index.splits, strict=True)
                        if s == split and label not in index.classes)
        if extra:
            names = ", ".join(f"{c!r} ({n} images)" for c, n in sorted(extra.items()))
            raise DataError(f"{source}: the {split} split holds class(es) {names} that train lacks "
                            f"({len(index.classes)} train classes); add train images for them or remove them")


TINY_CLASS = 5  # fewer training images than this: metrics and model choice on that class are noise


def warn_tiny_classes(index: DatasetIndex) -> None:
    """One warning naming every class with fewer than ``TINY_CLASS`` training images, with its counts."""
    counts = index.counts()
    tiny = [c for c in index.classes if counts["train"].get(c, 0) < TINY_CLASS]
    if tiny:
        shown = ", ".join(f"{c!r} ({counts['train'].get(c, 0)} train, {counts.get('val', {}).get(c, 0)} val)"
                          for c in tiny)
        log.warning("warning: class(es) with fewer than %d training images: %s; their metrics are noisy and "
                    "the model may never predict them; add images if you can", TINY_CLASS, shown)


def require_utf8(text: str, what: str) -> None:
    """A name imgclf writes into its JSON files and draws on its figures must be text: a file name whose bytes
    are not UTF-8 (Python holds them as lone surrogates) is refused before any work, not after training."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{what} is not a valid UTF-8 name (its bytes: {os.fsencode(text)!r}); rename it") from None
