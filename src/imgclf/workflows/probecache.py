"""The linear probe's fitted scores, kept next to its features in the decode cache (``KEY.probe.json``).

The probe's fit is deterministic given its features, the labels and its settings, so a run on the same
images, split and settings reads the scores an identical earlier fit gave instead of fitting again (a
third of a second on 1,800 images, a fifth of the report's work once the features are cached). The file
holds one fit: ``fit``, the hash of everything the row depends on besides the features (their key is the
file's name), then its C and scores; no text (the note is written anew). A different fit replaces it.
Like every cache file it is untrusted: read without following a link or waiting on a FIFO, size-capped,
every field required and in range, the image counts those of the run's splits; anything wrong costs a
one-line warning and a fit, never the run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Annotated

import numpy as np
import sklearn
from pydantic import BaseModel, ConfigDict, Field, Strict, StrictFloat, StrictInt, create_model

from imgclf import atomic
from imgclf.config import Config
from imgclf.data.cachedir import touch
from imgclf.logs import get_logger
from imgclf.runs.heads import GRIDS
from imgclf.versions import version

log = get_logger("baselines")

ROW_VERSION = 1  # raised when the probe is fitted or scored another way
MAX_ROW_BYTES = 16_000  # a row is under 2 kB


@functools.cache
def row_model(metrics: tuple[str, ...]) -> type[BaseModel]:
    """The stored row: the fit's hash, its C, and each split's ``metrics``, every one present and in range
    (only ROC-AUC may be null: undefined when a class is absent)."""
    ratio = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]
    fields = {k: (Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)] if k == "log_loss"
                  else ratio | None if k == "roc_auc_ovr" else ratio, ...) for k in metrics if k != "n"}
    split = create_model("ProbeSplit", __config__=ConfigDict(extra="forbid"), n=(StrictInt, Field(ge=0)), **fields)
    return create_model("ProbeRow", __config__=ConfigDict(extra="forbid"),
                        fit=(str, Field(pattern=r"^[0-9a-f]{32}$")), C=(StrictFloat, ...),
                        val=(split | None, None), test=(split | None, None))


def fit_key(index, train_targets: np.ndarray, splits: list[str], config: Config, metrics: tuple[str, ...]) -> str:
    """What the row depends on besides the features: the labels, classes, splits, fit settings, the metrics
    kept, versions."""
    settings = [ROW_VERSION, version(), sklearn.__version__, list(index.classes), splits, config.train.class_weight,
                config.data.positive_class, GRIDS["logreg"][1], list(metrics)]
    labels = [np.asarray(train_targets), *(index.subset(split).targets for split in splits)]
    digest = hashlib.blake2b(json.dumps(settings + [len(t) for t in labels]).encode(), digest_size=16)
    for targets in labels:
        digest.update(np.asarray(targets, dtype=np.int64).tobytes())
    return digest.hexdigest()


def row_file(features_npy: Path) -> Path:
    return features_npy.with_name(features_npy.name.removesuffix(".npy") + ".json")


def read_row(file: Path, fit: str, sizes: dict[str, int], metrics: tuple[str, ...]) -> tuple[float, dict] | None:
    """(C, each split's scores) of fit ``fit`` on the splits of ``sizes`` ({split: images}); None when absent,
    of another fit, or damaged (a one-line warning)."""
    if not os.path.lexists(file):
        return None
    try:
        row = row_model(metrics).model_validate(json.loads(_read_regular(file)))
    except (OSError, ValueError, RecursionError) as err:  # ValueError: JSON, UTF-8, size, schema
        reason = (str(err).splitlines() or [type(err).__name__])[0][:200]
        log.warning("warning: probe cache entry %s is damaged (%s); fitting the probe again", file, reason)
        return None
    if row.fit != fit or [s for s in ("val", "test") if getattr(row, s) is not None] != list(sizes):
        return None
    if row.C not in GRIDS["logreg"][1] or any(getattr(row, s).n != n for s, n in sizes.items()):
        log.warning("warning: probe cache entry %s does not fit its own key (C or image counts); fitting the probe "
                    "again", file)
        return None
    touch(file)
    return row.C, {s: getattr(row, s).model_dump() for s in sizes}


def write_row(file: Path, fit: str, value: float, scored: dict) -> None:
    """Keep ``scored`` (each split's scores) as fit ``fit`` with its C ``value``; a cache that cannot be written
    costs a warning."""
    try:
        atomic.write_json(file, {"fit": fit, "C": value, **scored})
    except OSError as err:
        log.warning("warning: could not keep the probe's scores in the cache (%s); it will be fitted again", err)


def _read_regular(file: Path) -> bytes:
    with os.fdopen(os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)), "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = fh.read(MAX_ROW_BYTES + 1)
    if len(data) > MAX_ROW_BYTES:
        raise ValueError(f"larger than {MAX_ROW_BYTES:,} bytes")
    return data
