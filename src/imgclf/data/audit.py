"""``imgclf audit DATA``: what is in a dataset before anything trains on it.

Reports per-split class counts and imbalance, image size/mode/format histograms, unreadable
files, and exact (content hash) and near (perceptual hash) duplicates within and across splits;
duplicates across splits are leakage. Fold0..FoldK folders (``cv``'s predefined folds) are audited
fold by fold: counts per fold and split, leakage inside each fold, and test images shared by folds.
``train`` runs the cheap part (exact duplicates, in ``trainchecks``) and warns.
The dataset is read by the same scan as ``train`` (``scan.py``): unreadable folders are errors, FIFOs and
device files are skipped with a warning, and no file is ever opened unless it is a regular file.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.data.images import BadImage, load_image, open_image, require_regular_file
from imgclf.data.index import detect_layout, scan_rows
from imgclf.data.scan import FOLD_DIR, visible_dirs
from imgclf.errors import DataError, ImgclfError
from imgclf.logs import get_logger
from imgclf.safeio import printable as shown

log = get_logger("audit")
NEAR_DUPLICATE_BITS = 4  # perceptual-hash Hamming distance (of 64 bits) that counts as "near"


def file_digest(path: Path) -> str:
    """SHA-256 of the file; BadImage for a FIFO or device, which would never finish reading."""
    require_regular_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def exact_duplicates(paths: list[Path], splits: list[str]) -> list[list[tuple[str, str]]]:
    """Groups of byte-identical files, each as [(split, path), ...]; unreadable files are left out."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for path, split in zip(paths, splits, strict=True):
        try:
            groups[file_digest(path)].append((split, str(path)))
        except (OSError, ImgclfError):
            continue
    return [g for g in groups.values() if len(g) > 1]


MAX_LISTED_PAIRS = 10_000  # near-duplicate pairs listed in a report, within and across splits; all are counted


def near_duplicates(paths: list[Path], splits: list[str], max_bits: int = NEAR_DUPLICATE_BITS) -> dict:
    """Pairs of images whose perceptual hashes differ in at most ``max_bits`` bits (exact copies included).

    Every pair is counted; the first MAX_LISTED_PAIRS are listed, and as many of those across splits
    (the leaks): n identical images make n^2/2 pairs, 2e8 for 20,000 blank ones."""
    codes, keep = _phashes(paths)
    split_ids = np.unique([splits[i] for i in keep], return_inverse=True)[1] if keep else np.zeros(0, int)
    found = {"near_duplicates": [], "near_duplicates_across_splits": [], "near_duplicate_pairs": 0,
             "near_duplicate_pairs_across_splits": 0}
    for a in range(len(codes)):  # O(n^2) popcounts of 64-bit XORs: tens of thousands of images in seconds
        distance = np.bitwise_count(codes[a + 1:] ^ codes[a])
        close = np.flatnonzero(distance <= max_bits)
        across = close[split_ids[a + 1 + close] != split_ids[a]]
        found["near_duplicate_pairs"] += len(close)
        found["near_duplicate_pairs_across_splits"] += len(across)
        for key, rows in (("near_duplicates", close), ("near_duplicates_across_splits", across)):
            room = MAX_LISTED_PAIRS - len(found[key])
            found[key] += [_pair(paths, splits, keep[a], keep[a + 1 + int(b)], int(distance[b])) for b in rows[:room]]
    return found


def _phashes(paths: list[Path]) -> tuple[np.ndarray, list[int]]:
    """64-bit perceptual hashes of the images that decode, and their positions in ``paths``."""
    import imagehash

    hashes, keep = [], []
    for i, path in enumerate(paths):
        try:
            require_regular_file(path)
            with open_image(path) as img:
                hashes.append(int(str(imagehash.phash(img)), 16))
            keep.append(i)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, ImgclfError):
            continue
    return np.array(hashes, dtype=np.uint64), keep


def _pair(paths: list[Path], splits: list[str], i: int, j: int, bits: int) -> list:
    return [(splits[i], str(paths[i])), (splits[j], str(paths[j])), bits]


def merge_near(parts: list[dict]) -> dict:
    """The near-duplicate findings of several searches (one per fold) as one: counts summed, lists capped."""
    keys = ("near_duplicates", "near_duplicates_across_splits")
    merged = {key: [pair for part in parts for pair in part[key]][:MAX_LISTED_PAIRS] for key in keys}
    return merged | {key: sum(part[key] for part in parts) for key in ("near_duplicate_pairs",
                                                                       "near_duplicate_pairs_across_splits")}


# --no-near: not searched, which is not "none found" (null in the JSON, "not searched" in the text)
NO_NEAR = {"near_duplicates": None, "near_duplicates_across_splits": None, "near_duplicate_pairs": None,
           "near_duplicate_pairs_across_splits": None}


def crosses_splits(group) -> bool:
    return len({split for split, *_ in group if isinstance(split, str)}) > 1


def predefined_folds(root: Path) -> list[Path]:
    """``root/Fold0..FoldK`` folders (also ``fold_0``, ``fold-0``), in numeric order; empty when there are none.

    The one rule for the layout: ``imgclf cv`` trains a run per fold folder, ``imgclf audit`` checks them.
    """
    if not root.is_dir():
        return []
    folders = visible_dirs(root, "dataset folder")
    found = sorted((int(m.group(1)), p) for p in folders if (m := FOLD_DIR.match(p.name)))
    twice = next(((a, b) for (i, a), (j, b) in pairwise(found) if i == j), None)
    if twice:
        raise DataError(f"{root} has two folders for fold {FOLD_DIR.match(twice[0].name).group(1)} ({twice[0].name}, "
                        f"{twice[1].name}): their test images would be pooled twice; keep one")
    others = sorted(shown(p.name) for p in folders if not FOLD_DIR.match(p.name))
    if found and others:
        log.warning("warning: %s: %s %s not a Fold0..FoldK folder: not read", root, ", ".join(others[:5]),
                    "is" if len(others) == 1 else "are")
    return [p for _, p in found]


def audit_dataset(path: str | Path, layout: str = "auto", near: bool = True) -> dict:
    """The full audit of a dataset folder or CSV (or of Fold0..FoldK folders), as a JSON-ready dict."""
    path = Path(path).expanduser().resolve()
    folds = predefined_folds(path) if layout in ("auto", "folds") else []
    if layout == "folds" and not folds:
        raise DataError(f"{path} has no Fold0..FoldK folders; use --layout auto for another layout")
    if folds:
        return audit_folds(path, folds, near)
    layout = detect_layout(path) if layout == "auto" else layout
    rows = scan_rows(path, layout)
    if not rows:  # as train would refuse it; there is nothing to count
        raise DataError(f"{path} lists no images; add rows of path,label" if layout == "csv" else
                        f"{path} holds no images; put them in one sub-folder per class")
    root = path.parent if layout == "csv" else path
    paths = [root / p for p, _, _ in rows]
    splits = [s or "pool" for _, _, s in rows]
    exact = exact_duplicates(paths, splits)
    return {
        "dataset": str(path), "layout": layout, **describe_files(paths, [label for _, label, _ in rows], splits),
        "exact_duplicates": exact, "exact_duplicates_across_splits": [g for g in exact if crosses_splits(g)],
        **(near_duplicates(paths, splits) if near else NO_NEAR),
    }


def audit_folds(path: Path, folds: list[Path], near: bool) -> dict:
    """Fold0..FoldK, each a train/val/test folder as ``cv`` reads it (one of class folders is its fold's test:
    ``Fold0/test``, trained on by the others); splits are named ``Fold0/train``...

    Leakage is per fold: an image in two splits of the same fold. An image in the test split of two folds
    is reported apart (``test_overlap_across_folds``): pooled out-of-fold predictions would count it twice.
    Near duplicates are searched within each fold, where they would leak.
    """
    paths, labels, splits = [], [], []
    for fold in folds:
        for p, label, split in scan_rows(fold, detect_layout(fold)):
            paths.append(fold / p)
            labels.append(label)
            splits.append(f"{fold.name}/{split or 'test'}")
    exact = exact_duplicates(paths, splits)
    near_parts = {}
    for fold in folds if near else []:
        inside = [i for i, s in enumerate(splits) if s.startswith(f"{fold.name}/")]
        near_parts[fold.name] = near_duplicates([paths[i] for i in inside], [splits[i] for i in inside])
    return {
        "dataset": str(path), "layout": "folds", "folds": [f.name for f in folds],
        **describe_files(paths, labels, splits),
        "exact_duplicates": exact,
        "exact_duplicates_across_splits": [leak for g in exact for leak in leaks_within_folds(g)],
        **(merge_near(list(near_parts.values())) if near else NO_NEAR),
        "near_duplicate_pairs_across_splits_per_fold": {
            fold: part["near_duplicate_pairs_across_splits"] for fold, part in near_parts.items()} if near else None,
        "test_overlap_across_folds": test_overlaps(exact),
    }


def leaks_within_folds(group: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The parts of a group of identical files that sit in two splits of one fold."""
    by_fold: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for split, path in group:
        by_fold[split.split("/")[0]].append((split, path))
    return [part for part in by_fold.values() if crosses_splits(part)]


def test_overlaps(groups: list[list[tuple[str, str]]]) -> list[list[tuple[str, str]]]:
    """The test members of each group of identical files that lies in the test split of two or more folds."""
    tests = [[(split, path) for split, path in g if split.endswith("/test")] for g in groups]
    return [t for t in tests if len({split for split, _ in t}) > 1]


def describe_files(paths: list[Path], labels: list[str], splits: list[str]) -> dict:
    """Counts per split and class, image sizes, modes and formats, and the files that do not decode."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for label, split in zip(labels, splits, strict=True):
        counts[split][label] += 1
    sizes, modes, formats, unreadable = Counter(), Counter(), Counter(), []
    for p in paths:
        try:
            require_regular_file(p)
            with open_image(p) as img:
                sizes[f"{img.width}x{img.height}"] += 1
                modes[img.mode] += 1
                formats[img.format or "?"] += 1
            load_image(p, 8, 1)
        except BadImage as err:
            unreadable.append([str(err.path), err.reason])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, ImgclfError) as err:
            unreadable.append([str(p), str(err) or type(err).__name__])
    return {"images": len(paths), "counts": {s: dict(sorted(c.items())) for s, c in counts.items()},
            "imbalance_ratio": {s: max(c.values()) / min(c.values()) for s, c in counts.items()},
            "sizes": dict(sizes.most_common(10)), "modes": dict(modes), "formats": dict(formats),
            "unreadable": unreadable}


def format_report(report: dict) -> str:
    """The human table printed by ``imgclf audit``."""
    lines = [f"dataset {shown(report['dataset'])} ({report['layout']}), {report['images']} images", ""]
    classes = sorted({c for counts in report["counts"].values() for c in counts})
    width = max(8, *(len(shown(split)) + 2 for split in report["counts"]))
    lines.append(f"{'split':<{width}}" + "".join(f"{c[:14]:>15}" for c in classes) + f"{'imbalance':>11}")
    for split, counts in report["counts"].items():
        lines.append(f"{shown(split):<{width}}" + "".join(f"{counts.get(c, 0):>15}" for c in classes)
                     + f"{report['imbalance_ratio'][split]:>10.1f}x")
    lines += ["", "sizes:   " + ", ".join(f"{k} ({v})" for k, v in report["sizes"].items()),
              "modes:   " + ", ".join(f"{k} ({v})" for k, v in report["modes"].items()),
              "formats: " + ", ".join(f"{k} ({v})" for k, v in report["formats"].items()), ""]
    lines.append(f"unreadable files: {len(report['unreadable'])}")
    lines += [f"  {shown(p)}: {shown(reason)}" for p, reason in report["unreadable"][:20]]
    lines.append(f"exact duplicates: {len(report['exact_duplicates'])} group(s), "
                 f"{len(report['exact_duplicates_across_splits'])} across splits (leakage)")
    lines += ["  " + " = ".join(f"{s}:{shown(p)}" for s, p in g) for g in report["exact_duplicates_across_splits"][:20]]
    lines += near_lines(report)
    if report["layout"] == "folds":
        lines += fold_lines(report)
    return "\n".join(lines)


def near_lines(report: dict) -> list[str]:
    if report["near_duplicate_pairs"] is None:
        return ["near duplicates: not searched (--no-near)"]
    return [f"near duplicates: {report['near_duplicate_pairs']} pair(s), "
            f"{report['near_duplicate_pairs_across_splits']} across splits"
            + (f" (--json lists the first {MAX_LISTED_PAIRS:,} of each)"
               if report["near_duplicate_pairs"] > len(report["near_duplicates"]) else "")] + \
        [f"  {a[0]}:{shown(a[1])} ~ {b[0]}:{shown(b[1])} ({d} bits)"
         for a, b, d in report["near_duplicates_across_splits"][:20]]


def fold_lines(report: dict) -> list[str]:
    """Per fold: images and leakage between its splits; then test images shared by folds."""
    lines = ["", f"{len(report['folds'])} folds (leakage = the same image in two splits of one fold):"]
    for fold in report["folds"]:
        images = sum(sum(c.values()) for split, c in report["counts"].items() if split.startswith(f"{fold}/"))
        exact = sum(g[0][0].startswith(f"{fold}/") for g in report["exact_duplicates_across_splits"])
        per_fold = report["near_duplicate_pairs_across_splits_per_fold"]
        near = "near pairs not searched" if per_fold is None else f"{per_fold.get(fold, 0)} near pair(s)"
        lines.append(f"  {shown(fold)}: {images} images, leakage {exact} exact group(s), {near}")
    overlap = report["test_overlap_across_folds"]
    lines.append(f"test images in the test split of two or more folds: {len(overlap)} group(s)")
    lines += ["  " + " = ".join(f"{shown(s)}:{shown(p)}" for s, p in g) for g in overlap[:20]]
    return lines
