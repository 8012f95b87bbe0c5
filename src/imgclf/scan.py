"""Walk dataset folders and CSVs into (path, label, split) rows.

Deliberate behaviour for what real exports contain:
- hidden files (``.DS_Store``, ``._x.jpg``) and OS litter (``Thumbs.db``, ``desktop.ini``) are ignored;
- other non-image files are skipped with one warning that counts them and names a few;
- a class folder is searched recursively (nested sub-folders belong to that class);
- symlinked folders are not followed, so a symlink loop cannot hang the scan;
- an empty class folder is skipped with a warning.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from pathlib import Path

from .errors import DataError
from .logs import get_logger

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm"})
OS_LITTER = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}

Row = tuple[str, str, str]  # (path relative to the dataset root, label, split)
log = get_logger("scan")


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in OS_LITTER


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_ignored(p.name))


def split_folders(root: Path) -> dict[str, Path]:
    """Map canonical split name -> folder for ``root/{train,val|valid|validation,test}``."""
    found: dict[str, Path] = {}
    for folder in visible_dirs(root):
        split = SPLIT_ALIASES.get(folder.name.lower())
        if split is None:
            continue
        if split in found:
            raise DataError(f"{root} has two folders for the {split!r} split ({found[split].name}, "
                            f"{folder.name}); keep one")
        found[split] = folder
    return found


def scan_class_folders(folder: Path, split: str, root: Path) -> list[Row]:
    """Rows for ``folder/<class>/**/<image>``; the class is the first-level folder name."""
    rows: list[Row] = []
    skipped: list[Path] = []
    loose = [p.name for p in folder.iterdir() if p.is_file() and is_image(p.name) and not is_ignored(p.name)]
    if loose:
        raise DataError(f"{folder} holds images directly ({loose[0]}, ...); put them in one sub-folder per class")
    for class_dir in visible_dirs(folder):
        images = list(_walk_images(class_dir, skipped))
        if not images:
            log.warning("warning: class folder %s has no images; it is skipped", class_dir)
            continue
        rows += [(p.relative_to(root).as_posix(), class_dir.name, split) for p in images]
    if skipped:
        examples = ", ".join(str(p.relative_to(root)) for p in skipped[:3])
        log.warning("warning: skipped %d non-image file(s) under %s (e.g. %s)", len(skipped), folder, examples)
    return rows


def _walk_images(folder: Path, skipped: list[Path]) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        for name in sorted(filenames):
            if is_ignored(name):
                continue
            path = Path(dirpath) / name
            if is_image(name):
                yield path
            else:
                skipped.append(path)


def scan_csv(csv_path: Path, require_label: bool = True) -> list[Row]:
    """Rows from a CSV/TSV with columns ``path,label[,split]``; paths are relative to the CSV."""
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            needed = ["path", "label"] if require_label else ["path"]
            if any(c not in columns for c in needed):
                raise DataError(f"{csv_path} needs a header with {' and '.join(needed)} columns (found {columns})")
            reader.fieldnames = columns
            rows = []
            for line, record in enumerate(reader, start=2):
                split = (record.get("split") or "").strip().lower()
                if split and split not in SPLIT_ALIASES:
                    raise DataError(f"{csv_path}:{line}: split {split!r} is not one of train, val, test")
                rows.append((record["path"].strip(), (record.get("label") or "").strip(), SPLIT_ALIASES.get(split, "")))
    except UnicodeDecodeError:
        raise DataError(f"{csv_path} is not UTF-8 text; save it as UTF-8 CSV") from None
    missing = [p for p, _, _ in rows if not (csv_path.parent / p).is_file()]
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]!r} "
                        f"(paths are relative to the CSV's folder)")
    if any(split for _, _, split in rows) and not all(split for _, _, split in rows):
        raise DataError(f"{csv_path}: the split column is empty on some rows; fill it on all rows or none")
    return rows
