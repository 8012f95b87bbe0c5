"""Walk dataset folders and CSVs into (path, label, split) rows; nothing is dropped or invented silently.

Deliberate behaviour for what real exports contain:
- hidden files (``.DS_Store``, ``._x.jpg``) and OS litter (``Thumbs.db``, ``desktop.ini``) are ignored; a hidden
  file named as an image (``.x.jpg``, not a macOS ``._`` fork) is counted in a warning, and so is a hidden folder
  at or below the class level (``.old``: neither a class nor searched), but not a tool's (``.git``,
  ``.ipynb_checkpoints``);
- other non-image files are skipped with one warning that counts them and names a few;
- a class folder is searched recursively (nested sub-folders belong to that class);
- symlinked folders below a class folder are not followed, so a symlink loop cannot hang the scan; a
  warning counts them;
- a folder that cannot be listed (dataset root, split, class or any sub-folder) is an error naming it;
- a readable class folder holding no image files is skipped with a warning that says so;
- only regular files (after following a file symlink) are images. A FIFO, device or socket found in
  a folder is skipped with a warning and never opened (reading ``/dev/zero`` or a FIFO never ends);
  one that a CSV names explicitly is an error naming its line. A symlink that leads nowhere (dangling,
  or a loop) is kept, so decoding reports it as an unreadable image naming the file;
- every CSV row needs a path and, for training, a non-empty label: an empty one is an error at file:line;
- the same file reached twice (a CSV listing it twice, or a symlink or hard link to a file listed
  elsewhere; identity is the device and inode after following symlinks) is used once: the first
  occurrence in reading order wins (CSV line order; split folders train, val, test; sorted paths),
  and one warning names the repeated files and the labels the later rows would have given;
- file names that are not valid UTF-8 are kept as Python gives them (lone surrogates); run files
  store their original bytes (see ``atomic.py``), so they round-trip.
"""

from __future__ import annotations

import csv
import os
import re
from collections import Counter
from pathlib import Path

from imgclf.errors import DataError
from imgclf.logs import get_logger
from imgclf.safeio import special_file_kind

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".dcm", ".pgm"})
OS_LITTER = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
TOOL_FOLDERS = frozenset({".git", ".hg", ".svn", ".dvc", ".ipynb_checkpoints", ".idea", ".vscode"})  # not data
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test"}
FOLD_DIR = re.compile(r"^fold[_-]?(\d+)$", re.IGNORECASE)  # Fold0..FoldK: cross-validation folds
SPLIT_ORDER = ("train", "val", "test")
CSV_COLUMNS = ("path", "label", "split")  # what a dataset CSV's columns mean to train

Row = tuple[str, str, str]  # (path relative to the dataset root, label, split)
log = get_logger("scan")


def is_ignored(name: str) -> bool:
    return name.startswith(".") or name.lower() in OS_LITTER


def hidden_folder(name: str) -> bool:
    """A hidden folder that may hold images someone hid (said when skipped); a tool's own (.git) is not."""
    return name.startswith(".") and name not in TOOL_FOLDERS


def is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def unreadable_folder(folder: str | os.PathLike, what: str, err: OSError) -> DataError:
    """The one-line error for a folder that cannot be listed (root reads anything, so mostly EACCES for users)."""
    reason = "permission denied" if isinstance(err, PermissionError) else (err.strerror or type(err).__name__)
    return DataError(f"cannot read {what} {folder}: {reason}; fix its permissions or remove it from the dataset")


def list_dir(folder: Path, what: str) -> list[os.DirEntry]:
    """The entries of ``folder`` sorted by name; an unlistable folder is an error, never an empty list."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as err:
        raise unreadable_folder(folder, what, err) from None


def visible_dirs(folder: Path, what: str = "folder") -> list[Path]:
    return [Path(e.path) for e in list_dir(folder, what) if not is_ignored(e.name) and e.is_dir()]


def split_folders(root: Path) -> dict[str, Path]:
    """Map canonical split name -> folder for ``root/{train,val|valid|validation,test}``, in train/val/test order."""
    found: dict[str, Path] = {}
    for folder in visible_dirs(root, "dataset folder"):
        split = SPLIT_ALIASES.get(folder.name.lower())
        if split is None:
            continue
        if split in found:
            raise DataError(f"{root} has two folders for the {split!r} split ({found[split].name}, "
                            f"{folder.name}); keep one")
        found[split] = folder
    return {split: found[split] for split in SPLIT_ORDER if split in found}


class Skipped:
    """Files a folder walk passed over, reported once per split folder rather than once per file."""

    def __init__(self) -> None:
        self.non_images: list[Path] = []
        self.special: list[tuple[Path, str]] = []  # FIFOs, devices, sockets, with which
        self.links: list[Path] = []  # linked sub-folders, not followed
        self.hidden: list[Path] = []  # hidden files named as images (``.x.jpg``; not macOS's ``._x.jpg`` forks)
        self.hidden_folders: list[Path] = []  # ``.old``: not searched (tools' own, TOOL_FOLDERS, go unsaid)

    def warn(self, folder: Path, root: Path) -> None:
        for name, what in SKIPPED_LINES:
            paths = getattr(self, name)
            if paths:
                examples = ", ".join(_shown(p, root) for p in paths[:3])
                log.warning("warning: %s", what.format(n=len(paths), folder=folder, examples=examples))


def _shown(item: Path | tuple[Path, str], root: Path) -> str:
    return f"{item[0].relative_to(root)} ({item[1]})" if isinstance(item, tuple) else str(item.relative_to(root))


SKIPPED_LINES = (  # (Skipped's list, its one line)
    ("non_images", "skipped {n} non-image file(s) under {folder} (e.g. {examples})"),
    ("special", "skipped {n} file(s) under {folder} that are not regular files (e.g. {examples}); only regular "
                "image files are read"),
    ("links", "did not follow {n} linked folder(s) under {folder} (e.g. {examples}): a link can loop; give the "
              "folder it points to, or move it in"),
    ("hidden", "skipped {n} hidden image file(s) under {folder} (e.g. {examples}): names starting with '.' are "
               "not read; rename them to use them"),
    ("hidden_folders", "did not search {n} hidden folder(s) under {folder} (e.g. {examples}): names starting with "
                       "'.' are not read; rename one to have its images read"),
)


def scan_class_folders(folder: Path, split: str, root: Path) -> list[Row]:
    """Rows for ``folder/<class>/**/<image>``; the class is the first-level folder name."""
    entries = list_dir(folder, "split folder" if split else "dataset folder")
    loose = [e.name for e in entries if e.is_file() and is_image(e.name) and not is_ignored(e.name)]
    if loose:
        raise DataError(f"{folder} holds images directly ({loose[0]}, ...); put them in one sub-folder per class")
    rows: list[Row] = []
    skipped = Skipped()
    for entry in entries:
        if hidden_folder(entry.name) and entry.is_dir(follow_symlinks=False):
            skipped.hidden_folders.append(Path(entry.path))
        if is_ignored(entry.name) or not entry.is_dir():
            continue
        images = walk_images(Path(entry.path), skipped)
        if not images:
            log.warning("warning: class folder %s holds no image files (searched recursively); it is skipped",
                        entry.path)
        rows += [(p.relative_to(root).as_posix(), entry.name, split) for p in images]
    skipped.warn(folder, root)
    return rows


def walk_images(folder: Path, skipped: Skipped) -> list[Path]:
    """Regular image files under ``folder``, sorted; a sub-folder that cannot be listed is an error."""

    def fail(err: OSError) -> None:
        raise unreadable_folder(err.filename or folder, "folder", err)

    images: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, onerror=fail, followlinks=False):
        skipped.hidden_folders += [Path(dirpath) / d for d in sorted(dirnames) if hidden_folder(d)]
        dirnames[:] = sorted(d for d in dirnames if not is_ignored(d))
        skipped.links += [Path(dirpath) / d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if is_ignored(name):
                if is_image(name) and not name.startswith("._"):
                    skipped.hidden.append(path)
                continue
            if not is_image(name):
                skipped.non_images.append(path)
            elif kind := special_file_kind(path):
                skipped.special.append((path, kind))
            else:
                images.append(path)
    return images


def scan_csv(csv_path: Path, require_label: bool = True) -> list[Row]:
    """Rows from a CSV/TSV with columns ``path,label[,split]``; paths are relative to the CSV."""
    rows, lines = _read_csv_rows(csv_path, require_label)
    missing = [p for p, _, _ in rows if not os.path.lexists(csv_path.parent / p)]
    if missing:
        raise DataError(f"{csv_path}: {len(missing)} listed file(s) do not exist, e.g. {missing[0]!r} "
                        f"(paths are relative to the CSV's folder)")
    for (path, _, _), line in zip(rows, lines, strict=True):
        if kind := special_file_kind(csv_path.parent / path):
            raise DataError(f"{csv_path}:{line}: {path!r} is a {kind}, not a regular file; list image files only")
    if any(split for _, _, split in rows) and not all(split for _, _, split in rows):
        raise DataError(f"{csv_path}: the split column is empty on some rows; fill it on all rows or none")
    return rows


def _read_csv_rows(csv_path: Path, require_label: bool) -> tuple[list[Row], list[int]]:
    """The checked rows and the line each came from (for file:line errors)."""
    delimiter = "\t" if csv_path.suffix.lower() == ".tsv" else ","
    if kind := special_file_kind(csv_path):
        raise DataError(f"{csv_path} is a {kind}, not a CSV file; give a regular .csv/.tsv file")
    rows: list[Row] = []
    lines: list[int] = []
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh, delimiter=delimiter)
            columns = [c.strip().lower() for c in reader.fieldnames or []]
            needed = ["path", "label"] if require_label else ["path"]
            if any(c not in columns for c in needed):
                raise DataError(f"{csv_path} needs a header with {' and '.join(needed)} columns (found {columns})")
            twice = sorted(c for c, n in Counter(columns).items() if n > 1 and c)  # the last one was read, silently
            if twice:
                raise DataError(f"{csv_path}: the header names column(s) {', '.join(twice)} twice; keep one of each")
            reader.fieldnames = columns
            for record in reader:
                if any(v.strip() for v in record.get(None, ())):  # values past the header (key None) were dropped
                    raise DataError(f"{csv_path}:{reader.line_num}: {len(columns) + len(record[None])} values, the "
                                    f"header names {len(columns)} columns; name every column in the header")
                rows.append(_checked_row(record, f"{csv_path}:{reader.line_num}", require_label))
                lines.append(reader.line_num)
    except UnicodeDecodeError:
        raise DataError(f"{csv_path} is not UTF-8 text; save it as UTF-8 CSV") from None
    except csv.Error as err:  # a field over the csv module's limit (131,072 characters), a NUL byte...
        raise DataError(f"{csv_path}:{reader.line_num}: not a readable CSV row ({err}); fix the file") from None
    except OSError as err:
        raise DataError(f"cannot read {csv_path}: {err.strerror or err}; fix its permissions") from None
    return rows, lines


def _checked_row(record: dict, where: str, require_label: bool) -> Row:
    path = (record.get("path") or "").strip()
    label = (record.get("label") or "").strip()
    split = (record.get("split") or "").strip().lower()
    if not path:
        raise DataError(f"{where}: the path is empty; fill it or delete the row")
    if require_label and not label:
        raise DataError(f"{where}: the label of {path!r} is empty; fill it or delete the row")
    if split and split not in SPLIT_ALIASES:
        raise DataError(f"{where}: split {split!r} is not one of train, val, test")
    return path, label, SPLIT_ALIASES.get(split, "")


def file_identity(path: Path) -> tuple:
    """Device and inode after following symlinks, so links to one file compare equal; else the normalised path."""
    try:
        info = os.stat(path)
    except OSError:
        return ("path", os.path.normpath(os.path.abspath(path)))
    return ("inode", info.st_dev, info.st_ino)


def drop_repeated_files(rows: list[Row], root: Path, source: Path) -> list[Row]:
    """Keep each file's first row (reading order); warn once, naming the repeats and their other labels."""
    first: dict[tuple, Row] = {}
    kept: list[Row] = []
    repeats: list[tuple[Row, Row]] = []
    for row in rows:
        key = file_identity(root / row[0])
        if key in first:
            repeats.append((first[key], row))
        else:
            first[key] = row
            kept.append(row)
    if repeats:
        conflicting = sum(1 for a, b in repeats if a[1] != b[1])
        examples = "; ".join(f"{b[0]} as {b[1]!r} {b[2] or 'pool'} repeats {a[0]} as {a[1]!r} {a[2] or 'pool'}"
                             for a, b in repeats[:3])
        log.warning("warning: %s reaches %d file(s) more than once (%d with another label), e.g. %s; each file is "
                    "used once, with its first row's label and split", source, len(repeats), conflicting, examples)
    return kept
