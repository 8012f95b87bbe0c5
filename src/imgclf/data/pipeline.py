"""From a dataset index to decoded images and loaders; shared by train, evaluate and experiments."""

from __future__ import annotations

import csv
from dataclasses import dataclass

import numpy as np
import torch

from imgclf import atomic
from imgclf.config import AugmentConfig, DataConfig
from imgclf.data.cache import DecodedImages, decode_all
from imgclf.data.cachedir import keep_within_limit, limit_bytes
from imgclf.data.datasets import AugmentedBatches, CachedImages, make_loader
from imgclf.data.images import SKIP_HINT, BadImage
from imgclf.data.index import DatasetIndex
from imgclf.data.samplers import ShardView
from imgclf.data.transforms import BatchAugment, build_eval_transform
from imgclf.errors import DataError
from imgclf.logs import get_logger
from imgclf.models.networks import Preprocess

log = get_logger("pipeline")


@dataclass(frozen=True)
class PreparedData:
    """The index without unreadable images, and where each of its images sits in the cache."""

    index: DatasetIndex
    decoded: DecodedImages
    cache_rows: np.ndarray
    skipped: tuple[BadImage, ...]

    def positions(self, split: str) -> np.ndarray:
        """The index positions of ``split``'s images, in index order (the order its dataset reads them)."""
        return np.flatnonzero(np.asarray(self.index.splits) == split).astype(np.int64)

    def dataset(self, split: str, transform=None) -> CachedImages:
        positions = self.positions(split)
        targets = self.index.targets[positions] if len(positions) else np.zeros(0, dtype=np.int64)
        return CachedImages(self.decoded.file, self.cache_rows[positions], targets, transform)


def prepare(index: DatasetIndex, preprocess: Preprocess, cfg: DataConfig) -> PreparedData:
    """Decode every image once (cached); fail on unreadable ones unless ``skip_bad_images``."""
    paths = [index.abspath(i) for i in range(len(index))]
    limit_bytes()  # a bad IMGCLF_CACHE_MAX_GB is refused before anything is decoded
    decoded = decode_all(paths, preprocess.size, preprocess.channels, cfg.cache_dir,
                         interpolation=preprocess.interpolation)
    keep_within_limit(decoded.file.parent, frozenset({decoded.file.stem}))
    if decoded.bad and not cfg.skip_bad_images:
        first = decoded.bad[0]
        more = f" (and {len(decoded.bad) - 1} more)" if len(decoded.bad) > 1 else ""
        raise DataError(f"cannot read image {first.path}: {first.reason}{more}; {SKIP_HINT}")
    bad_paths = {b.path for b in decoded.bad}
    keep = [i for i, p in enumerate(paths) if p not in bad_paths]
    for bad in decoded.bad:
        log.warning("warning: skipped unreadable image %s: %s", bad.path, bad.reason)
    kept = index.select(keep)
    for split in sorted(set(index.splits)):
        if split not in kept.splits:
            raise DataError(f"every image of the {split} split is unreadable; check {index.root}")
    return PreparedData(kept, decoded, np.array(keep, dtype=np.int64), decoded.bad)


def refuse_lost_classes(prepared: PreparedData) -> None:
    """Training after --skip-bad-images: a class whose every training image was skipped would never be learned."""
    kept = set(prepared.index.subset("train").labels)
    lost = [name for name in prepared.index.classes if name not in kept]
    if lost:
        raise DataError(f"every training image of class {lost[0]!r} is unreadable (skipped with --skip-bad-images): "
                        "the model would never learn it; fix its images or remove the class")


def write_skipped(prepared: PreparedData, path) -> None:
    def write(fh) -> None:
        out = csv.writer(fh)
        out.writerow(["path", "reason"])
        out.writerows([str(b.path), b.reason] for b in prepared.skipped)

    atomic.write_with(path, write)


def train_loader(prepared: PreparedData, aug: AugmentConfig, preprocess: Preprocess, batch_size: int,
                 generator: torch.Generator, device: torch.device, sampler=None,
                 workers: int | None = None, trains_batchnorm: bool = False) -> AugmentedBatches:
    """Shuffled batches of every training image, augmented batch by batch on ``device``; a last batch of one
    image is left out only where a BatchNorm layer trains (``trains_batchnorm``), and that is said."""
    dataset = prepared.dataset("train", None)
    count = len(sampler) if sampler is not None else len(dataset)  # a rank's sampler: its own share
    loader = make_loader(dataset, batch_size, shuffle=True, sampler=sampler, generator=generator, workers=workers,
                         drop_last=drops_lone_sample(count, batch_size, trains_batchnorm, "images"))
    return AugmentedBatches(loader, BatchAugment(aug, preprocess.mean, preprocess.std), device)


def drops_lone_sample(count: int, batch_size: int, trains_batchnorm: bool, what: str) -> bool:
    """Whether an epoch leaves out its last batch: one sample alone, which a training BatchNorm cannot take
    (its statistics of one value; PyTorch raises on a flat feature). Said, since it is one sample fewer."""
    if not trains_batchnorm or count % batch_size != 1 or count == 1:
        return False
    log.warning("warning: %d training %s in batches of %d leave one alone in the last batch, which BatchNorm cannot "
                "train on: each epoch trains on %d of them (a different one left out each epoch; another "
                "--batch-size avoids it)", count, what, batch_size, count - 1)
    return True


def inference_batch(batch_size: int, train_images: int) -> int:
    """The batch size for evaluating and predicting: the training batch, but never more images than the training
    split had. Training's steps held at most that many (a batch larger than the split is the whole split), so a
    run's ``batch_size`` (e.g. 100,000 for full-batch training on 500 images) cannot make predicting a large
    folder put all of it in one batch."""
    return max(1, min(batch_size, train_images))


def eval_loader(prepared: PreparedData, split: str, preprocess: Preprocess, batch_size: int,
                workers: int | None = None, shuffle: bool = False, generator: torch.Generator | None = None):
    dataset = prepared.dataset(split, build_eval_transform(preprocess.mean, preprocess.std))
    return make_loader(dataset, batch_size, shuffle=shuffle, generator=generator, workers=workers)


def shard_loader(prepared: PreparedData, split: str, indices: np.ndarray, preprocess: Preprocess, batch_size: int,
                 augment: AugmentConfig | None, device: torch.device, workers: int | None = None):
    """Items ``indices`` of ``split``, in that order: augmented batch by batch on ``device`` (``augment``), or
    as evaluation sees them. Positions are local to ``indices`` (``ShardView``)."""
    if augment is None:
        dataset = prepared.dataset(split, build_eval_transform(preprocess.mean, preprocess.std))
        return make_loader(ShardView(dataset, indices), batch_size, workers=workers)
    loader = make_loader(ShardView(prepared.dataset(split, None), indices), batch_size, workers=workers)
    return AugmentedBatches(loader, BatchAugment(augment, preprocess.mean, preprocess.std), device)
