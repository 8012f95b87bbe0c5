"""What a user names as images to predict or explain: files, folders (recursive), globs or a CSV."""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgclf.data.scan import Skipped, file_identity, scan_csv, walk_images
from imgclf.errors import DataError
from imgclf.logs import get_logger
from imgclf.safeio import special_file_kind

log = get_logger("inputs")


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """The image files ``inputs`` name (``read_inputs``), each once."""
    return read_inputs(inputs).paths


@dataclass
class NamedImages:
    """The images a user named, each once, and what the naming says of their classes: CSV rows (label, split,
    the CSV) by image path, first row kept, and the inputs as given (folders of class sub-folders)."""
    paths: list[Path]
    items: list[Path]
    rows: dict[str, tuple[str, str, Path]] = field(default_factory=dict)

    def true_labels(self, paths: list[Path], classes: list[str]) -> tuple[np.ndarray, str | None]:
        """Each of ``paths``' true class (index into ``classes``), else -1 for all; and one line saying where
        the labels came from, or why there are none when the inputs suggest some.

        Labels come when every input is a folder of class sub-folders named as the run's classes (a test
        folder laid out as for training), or every input is a CSV whose label column names a class on every
        row. A partly labelled set would score only some images, so anything else is unlabelled.
        """
        csvs = [item for item in self.items if item.suffix.lower() in CSV_SUFFIXES and item.is_file()]
        unlabelled = np.full(len(paths), -1, dtype=np.int64)
        if csvs and len(csvs) == len(self.items):
            return self._csv_labels(csvs, paths, classes) if paths else (unlabelled, None)
        if any(label for label, _, _ in self.rows.values()):
            return unlabelled, (f"predicted unlabelled: the label column of {', '.join(map(str, csvs))} is used only "
                                "when every input is a CSV (name the other images in a CSV too)")
        if paths and all(folder.is_dir() for folder in self.items):
            return _folder_labels(self.items, paths, classes)
        return unlabelled, None

    def _csv_labels(self, csvs: list[Path], paths: list[Path], classes: list[str]) -> tuple[np.ndarray, str | None]:
        unlabelled = np.full(len(paths), -1, dtype=np.int64)
        split_note = ("; the split column is not used: every listed image is predicted"
                      if any(split for _, split, _ in self.rows.values()) else "")
        found = [self.rows.get(str(p), ("", "", None)) for p in paths]
        lookup = {name: i for i, name in enumerate(classes)}
        stray = next(((label, csv) for label, _, csv in found if label not in lookup), None)
        if stray is None:
            return np.array([lookup[label] for label, _, _ in found], dtype=np.int64), (
                f"true labels from the label column of {', '.join(map(str, csvs))}: true_label column added"
                f"{split_note}")
        if not any(label for label, _, _ in found):
            return unlabelled, split_note[2:] or None  # no labels given: nothing to say about them
        label, csv = stray
        what = f"label {label!r} in {csv} is not a class of the run" if label else f"{csv} leaves some labels empty"
        return unlabelled, f"predicted unlabelled: {what} ({', '.join(classes)}){split_note}"


CSV_SUFFIXES = (".csv", ".tsv")


def read_inputs(inputs: list[str | Path]) -> NamedImages:
    """Files as given, a CSV/TSV's ``path`` column, folders searched recursively, else a glob (a folder it
    matches is searched as a folder given by name). An image reached twice is read once, with a warning.

    Only regular files are read: a FIFO or device file named as an argument (or in the CSV) is an
    error, one found in a folder or matched by a glob is skipped with a warning; a folder that cannot
    be listed is an error naming it (see ``scan.py``).
    """
    found: list[Path] = []
    rows: dict[str, tuple[str, str, Path]] = {}
    for item in inputs:
        path = Path(item)
        kind = special_file_kind(path)
        if kind == "folder":
            found += _walk(path)
        elif kind:
            raise DataError(f"{item} is a {kind}, not an image file; give image files, folders or a CSV")
        elif path.is_file() and path.suffix.lower() in CSV_SUFFIXES:
            listed = [(path.parent / p, label, split) for p, label, split in scan_csv(path, require_label=False)]
            for image, label, split in listed:
                rows.setdefault(str(image), (label, split, path))  # a path listed again: its first row, as read
            found += [image for image, _, _ in listed]
        elif path.is_file():
            found.append(path)
        else:
            found += _glob_files(str(item))
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return NamedImages(_once_each(found), [Path(item) for item in inputs], rows)


def _folder_labels(folders: list[Path], paths: list[Path], classes: list[str]) -> tuple[np.ndarray, str | None]:
    """Labels from class sub-folders; a sub-folder that is not a class, or an image outside the sub-folders,
    makes the whole prediction unlabelled (a folder may lack some classes)."""
    lookup = {name: i for i, name in enumerate(classes)}
    labels, strays, nested = [], set(), False
    for path in paths:
        folder = next((f for f in folders if Path(path).is_relative_to(f)), None)
        parts = Path(path).relative_to(folder).parts if folder is not None else ()
        nested = nested or len(parts) > 1
        sub = parts[0] if len(parts) > 1 else None
        if sub not in lookup:
            strays.add(f"{sub!r} in {folder}" if sub else f"images directly in {folder}")
        labels.append(lookup.get(sub, -1))
    if not strays:
        return np.array(labels, dtype=np.int64), (f"true labels from the class sub-folders of "
                                                  f"{', '.join(map(str, folders))}: true_label column added")
    unlabelled = np.full(len(paths), -1, dtype=np.int64)
    if not nested:
        return unlabelled, None  # a plain folder of images: nothing suggested labels
    shown = ", ".join(sorted(strays)[:3]) + (", ..." if len(strays) > 3 else "")
    return unlabelled, (f"predicted unlabelled: {shown} {'is' if len(strays) == 1 else 'are'} not a class "
                        f"sub-folder of the run ({', '.join(classes)})")


def _walk(folder: Path) -> list[Path]:
    skipped = Skipped()
    images = walk_images(folder, skipped)
    skipped.warn(folder, folder)
    return images


def _glob_files(pattern: str) -> list[Path]:
    matches = _glob(pattern)
    special = [(p, kind) for p in matches if (kind := special_file_kind(p)) and kind != "folder"]
    for p, kind in special:
        log.warning("warning: skipped %s matched by %s: it is a %s, not a regular file", p, pattern, kind)
    files = [image for p in matches for image in (_walk(p) if p.is_dir() else [p] if p.is_file() else [])]
    if not files and not special:
        raise DataError(f"{pattern} matches only folders holding no images" if matches else
                        f"{pattern} is not a file or folder and matches no files")
    return list(dict.fromkeys(files))  # a folder and the files in it both matched (``**``): each once


def _glob(pattern: str) -> list[Path]:
    """What ``pattern`` matches, sorted. ``**`` descends through real folders only (pathlib's rule; glob's own
    follows linked folders, and two links back to their folder make its search grow without end), and like glob
    matches no hidden names unless the pattern spells a leading dot."""
    parts = Path(pattern).parts
    if not any(part == "**" for part in parts):  # no recursion: a ``**`` inside a name is glob's ``*``
        return sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    if any("**" in part and part != "**" for part in parts):
        raise DataError(f"{pattern}: '**' searches folders only as a whole path part (a/**/*.jpg); use '*' "
                        "inside a name")
    first = next(i for i, part in enumerate(parts) if MAGIC.search(part))
    base, rest = Path(*parts[:first]) if first else Path("."), Path(*parts[first:])
    dotted = any(part.startswith(".") for part in rest.parts)
    return sorted(m for m in base.glob(str(rest))
                  if dotted or not any(part.startswith(".") for part in m.relative_to(base).parts))


MAGIC = re.compile(r"[*?[]")


def _once_each(paths: list[Path]) -> list[Path]:
    """``paths`` with a file reached again (named twice, or a link to one named) left out, with one warning."""
    seen: set = set()
    kept, again = [], []
    for path in paths:
        identity = file_identity(path)
        (again if identity in seen else kept).append(path)
        seen.add(identity)
    if again:
        log.warning("warning: %d image(s) reached more than once (e.g. %s): each is read once", len(again),
                    ", ".join(map(str, again[:3])))
    return kept
