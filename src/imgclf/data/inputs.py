"""What a user names as images to predict or explain: files, folders (recursive), globs or a CSV."""

from __future__ import annotations

import glob
from pathlib import Path

from imgclf.data.images import special_file_kind
from imgclf.data.scan import Skipped, scan_csv, walk_images
from imgclf.errors import DataError
from imgclf.logs import get_logger

log = get_logger("inputs")


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, a CSV/TSV's ``path`` column, folders searched recursively, else a glob.

    Only regular files are read: a FIFO or device file named as an argument (or in the CSV) is an
    error, one found in a folder or matched by a glob is skipped with a warning; a folder that cannot
    be listed is an error naming it (see ``scan.py``).
    """
    found: list[Path] = []
    skipped = Skipped()
    for item in inputs:
        path = Path(item)
        kind = special_file_kind(path)
        if kind == "folder":
            found += walk_images(path, skipped)
            skipped.warn(path, path)
            skipped = Skipped()
        elif kind:
            raise DataError(f"{item} is a {kind}, not an image file; give image files, folders or a CSV")
        elif path.is_file() and path.suffix.lower() in (".csv", ".tsv"):
            found += [path.parent / p for p, _, _ in scan_csv(path, require_label=False)]
        elif path.is_file():
            found.append(path)
        else:
            found += _glob_files(str(item))
    if not found:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return found


def _glob_files(pattern: str) -> list[Path]:
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    special = [(p, kind) for p in matches if (kind := special_file_kind(p)) and kind != "folder"]
    for p, kind in special:
        log.warning("warning: skipped %s matched by %s: it is a %s, not a regular file", p, pattern, kind)
    files = [p for p in matches if p.is_file()]
    if not files and not special:
        raise DataError(f"{pattern} is not a file or folder and matches no files")
    return files
