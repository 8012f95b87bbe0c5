"""What a user names as images to predict or explain: files, folders (recursive), globs or a CSV."""

from __future__ import annotations

import glob
import re
from pathlib import Path

from imgclf.data.images import special_file_kind
from imgclf.data.scan import Skipped, file_identity, scan_csv, walk_images
from imgclf.errors import DataError
from imgclf.logs import get_logger

log = get_logger("inputs")


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given, a CSV/TSV's ``path`` column, folders searched recursively, else a glob (a folder it
    matches is searched as a folder given by name). An image reached twice is read once, with a warning.

    Only regular files are read: a FIFO or device file named as an argument (or in the CSV) is an
    error, one found in a folder or matched by a glob is skipped with a warning; a folder that cannot
    be listed is an error naming it (see ``scan.py``).
    """
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        kind = special_file_kind(path)
        if kind == "folder":
            found += _walk(path)
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
    return _once_each(found)


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
