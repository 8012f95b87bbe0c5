"""``imgclf cv``'s folds, planned before its folder is claimed: predefined Fold0..FoldK folders, or stratified
(group) k-fold of a pool or CSV, checked against the data (images a class, names a fold CSV can hold), then
written as ``splits/fold_<i>.csv``."""

from __future__ import annotations

import csv
import hashlib
import json
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from imgclf import atomic
from imgclf.config import Config
from imgclf.data.audit import predefined_folds
from imgclf.data.groups import read_groups
from imgclf.data.index import detect_layout, scan_rows
from imgclf.data.scan import FOLD_DIR
from imgclf.errors import ConfigError, DataError
from imgclf.logs import get_logger
from imgclf.safeio import printable

log = get_logger("cv")
DEFAULT_FOLDS = 5


@dataclass
class FoldPlan:
    """The dataset's own Fold0..FoldK folders, or the images, labels and each fold's test rows imgclf made."""

    predefined: list[Path] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    tests: list[np.ndarray] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)  # each image's --group-column value, written in the fold CSVs
    group_column: str | None = None

    def digest(self) -> str:
        """What decides every fold's images (the fold folders, or the images, labels and test rows), hashed."""
        digest = hashlib.sha256(json.dumps([[str(p) for p in self.predefined], self.paths, self.labels]).encode())
        for rows in self.tests:
            digest.update(b"|" + np.asarray(rows, dtype=np.int64).tobytes())
        return digest.hexdigest()


def plan_folds(config: Config, folds: int | None) -> FoldPlan:
    """The folds, once the fold settings are known to apply to the data; refused before anything is written."""
    group_column = config.data.group_column
    root = Path(config.data.path or "").expanduser().resolve()
    predefined = predefined_folds(root)
    if predefined:
        _check_predefined(root, predefined, folds, group_column, config.data.layout)
        _say_numbering(predefined)
        layouts = {fold: detect_layout(fold) for fold in predefined}
        if set(layouts.values()) == {"class_folders"}:  # FoldK/<class>/: fold K is tested, the others train
            return _across_fold_folders(root, predefined)
        _check_split_fold_folders(root, layouts)
        return FoldPlan(predefined)
    if folds is not None and folds < 2:
        raise ConfigError(f"--folds {folds}: cross-validation needs at least 2 folds")
    layout = detect_layout(root) if config.data.layout == "auto" else config.data.layout
    if group_column and layout != "csv":
        raise DataError(f"--group-column {group_column!r} needs a CSV dataset with that column")
    rows = scan_rows(root, layout)
    base_dir = root.parent if layout == "csv" else root
    paths, labels = [str(base_dir / p) for p, _, _ in rows], [label for _, label, _ in rows]
    k = DEFAULT_FOLDS if folds is None else folds
    _check_data(root, paths, labels, k)
    given = sorted({split for _, _, split in rows if split})
    if given:  # the user's split is not kept: said, since a test split is usually held out for a reason
        log.warning("warning: cv pools the %s images of %s (%s) into %d folds, each tested once by the model that "
                    "did not train on it; the dataset's own split is not kept (to hold a test split out, run cv on "
                    "the other images alone)", f"{len(paths):,}", root, "+".join(given), k)
    groups = read_groups(root, group_column, [p for p, _, _ in rows]) if group_column else None
    tests = _split(root, labels, groups, k, config)
    for i, test in enumerate(tests if groups else []):  # each fold's val takes whole groups of its training ones
        tested = set(test.tolist())
        if len({g for j, g in enumerate(groups) if j not in tested}) < 2:
            raise DataError(f"fold {i} of {root}: its training images form 1 group of --group-column {group_column}; "
                            "its val takes whole groups and needs 2: give more groups or fewer --folds")
    return FoldPlan([], paths, labels, tests, groups or [], group_column)


def _check_data(root: Path, paths: list[str], labels: list[str], folds: int) -> None:
    """Every fold trains on every class, and lists its images in a UTF-8 CSV."""
    if not paths:
        raise DataError(f"{root} holds no images; put them in one sub-folder per class (or list them in a CSV)")
    if len(paths) < folds:
        raise DataError(f"--folds {folds}: {root} holds {len(paths)} images; give at most {len(paths)} folds")
    counts = Counter(labels)
    single = sorted(name for name, n in counts.items() if n < 2)
    if single:
        raise DataError(f"class {printable(single[0])!r} of {root} has 1 image: the fold that tests it would train "
                        "without it; cross-validation needs at least 2 images a class (add images or drop it)")
    scarce = sorted((n, name) for name, n in counts.items() if n < folds)
    if scarce:
        log.warning("warning: class %r has %d images, fewer than the %d folds: some folds test none of it",
                    printable(scarce[0][1]), scarce[0][0], folds)
    for path in paths:
        try:
            path.encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"{printable(path)}: its name is not UTF-8 text, and cv lists each fold's images in a "
                            "UTF-8 CSV; rename it (train reads it as it is)") from None


def _split(root: Path, labels: list[str], groups: list[str] | None, folds: int, config: Config) -> list[np.ndarray]:
    """Each fold's test rows, stratified by class (and by group); they follow the split seed (``--seed`` only when
    no split seed is set), so retraining with another --seed and a split seed keeps them."""
    split_seed = config.train.seed if config.data.split_seed is None else config.data.split_seed
    kind = StratifiedGroupKFold if groups else StratifiedKFold
    splitter = kind(folds, shuffle=True, random_state=split_seed % 2**32)
    try:
        with warnings.catch_warnings():  # sklearn's "least populated class" warning is said above, in one line
            warnings.simplefilter("ignore", UserWarning)
            return [test for _, test in splitter.split(np.zeros(len(labels)), np.array(labels), groups)]
    except ValueError as err:
        raise DataError(f"cannot make {folds} stratified folds of {root}: {err}") from None


def write_fold_csvs(plan: FoldPlan, out: Path) -> list[str]:
    """``out/splits/fold_<i>.csv`` per planned fold (absolute paths; test = fold i, the rest train; and each image's
    group, from which the fold's run draws val by group)."""
    folder = atomic.inner_folder(out, "splits")
    written = []
    for i, test_rows in enumerate(plan.tests):
        test = set(test_rows.tolist())
        path = folder / f"fold_{i}.csv"

        def write(fh, test=test) -> None:
            w = csv.writer(fh)
            w.writerow(["path", "label", "split", *([plan.group_column] if plan.groups else [])])
            w.writerows([p, label, "test" if j in test else "train", *([plan.groups[j]] if plan.groups else [])]
                        for j, (p, label) in enumerate(zip(plan.paths, plan.labels, strict=True)))

        atomic.write_with(path, write)
        written.append(str(path))
    return written


def _check_predefined(root: Path, predefined: list[Path], folds: int | None, group_column: str | None,
                      layout: str) -> None:
    """Fold0..FoldK folders decide the folds: a setting that would decide them otherwise is refused."""
    asked = [flag for flag, given in ((f"--folds {folds}", folds is not None and folds != len(predefined)),
                                      (f"--group-column {group_column}", group_column is not None),
                                      (f"--layout {layout}", layout != "auto")) if given]
    if asked:
        raise ConfigError(f"{' and '.join(asked)}: {root} has its own {len(predefined)} folds ({predefined[0].name}.."
                          f"{predefined[-1].name}), which decide the splits; drop {'them' if len(asked) > 1 else 'it'}")


def _across_fold_folders(root: Path, folders: list[Path]) -> FoldPlan:
    """Fold folders of class folders: each fold's run tests on its folder's images and trains on the other
    folders' (its val drawn from those), as a notebook's Fold0..Fold9 cross-validation does. It split each
    folder alone at random and tested on a third of it."""
    paths, labels, tests = [], [], []
    for folder in folders:
        rows = scan_rows(folder, "class_folders")
        tests.append(np.arange(len(paths), len(paths) + len(rows)))
        paths += [str(folder / p) for p, _, _ in rows]
        labels += [label for _, label, _ in rows]
    _check_data(root, paths, labels, len(folders))
    empty = next((f for f, test in zip(folders, tests, strict=True) if not len(test)), None)
    if empty is not None:
        raise DataError(f"fold folder {empty} holds no images; its fold would test none: fill or remove it")
    log.info("cv: %d fold folders of class folders: each fold tests its folder's images and trains on the others'",
             len(folders))
    return FoldPlan([], paths, labels, tests)


def _check_split_fold_folders(root: Path, layouts: dict[Path, str]) -> None:
    """Fold folders of train/val/test folders: each one with a test split and the same classes, or the runs
    fail after training (a fold without test ended in 'predictions_test.csv does not exist')."""
    if set(layouts.values()) != {"split_folders"}:
        odd = next(f for f, kind in layouts.items() if kind != "split_folders")
        raise DataError(f"{odd}: {layouts[odd].replace('_', ' ')}, where the other fold folders of {root} hold "
                        "train/val/test folders; give every fold folder the same layout")
    classes = {}
    for fold in layouts:
        rows = scan_rows(fold, "split_folders")
        if not any(split == "test" for _, _, split in rows):
            raise DataError(f"fold folder {fold} has no test images: each fold is scored on its own test folder")
        classes[fold] = sorted({label for _, label, _ in rows})
    first, *rest = layouts
    odd = next((f for f in rest if classes[f] != classes[first]), None)
    if odd is not None:
        raise DataError(f"fold folders {first.name} and {odd.name} have different classes ({', '.join(classes[first])} "
                        f"/ {', '.join(classes[odd])}); every fold needs the same classes")


def _say_numbering(folders: list[Path]) -> None:
    """The runs are fold_0..fold_<K-1> in the folders' order: said where the folders' own numbers differ."""
    numbers = [int(FOLD_DIR.match(folder.name).group(1)) for folder in folders]
    if numbers != list(range(len(numbers))):
        log.warning("warning: the fold folders are numbered %s, not 0..%d: their runs are fold_0..fold_%d in that "
                    "order (%s)", ", ".join(map(str, numbers)), len(numbers) - 1, len(numbers) - 1,
                    ", ".join(f"fold_{i} = {f.name}" for i, f in enumerate(folders)))
