"""torch Datasets over the decode-once cache (training, evaluation) or over files (predict).

Each item is ``(image, target, position)``: the position lets evaluation put every prediction
back on its own row, whatever order the loader used. The cache hands a loader whole batches
(``__getitems__``: one indexed read, the transform once per batch): stacking 32 images one by one
and transforming each costs a torch parallel region per image, ms each when the cores are busy.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, WeightedRandomSampler, default_collate

from imgclf.data.images import load_image


class CachedImages(Dataset):
    """Images from the cache file; the memory map is opened lazily so workers each open their own.

    Without a ``transform`` items stay uint8, for augmentation batch by batch on the device. A
    ``transform`` works element by element, so it takes one ``C x H x W`` image or an ``N x C x H x W`` batch.
    """

    def __init__(self, cache_file: Path, rows: np.ndarray, targets: np.ndarray, transform: Callable | None):
        self.cache_file, self.rows, self.targets, self.transform = cache_file, rows, targets, transform
        self._array: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def _images(self) -> np.ndarray:
        if self._array is None:
            self._array = np.load(self.cache_file, mmap_mode="r")
        return self._array

    def __getitem__(self, i: int):
        image = torch.from_numpy(np.array(self._images()[self.rows[i]]))
        return (self.transform(image) if self.transform else image), int(self.targets[i]), i

    def __getitems__(self, indices: list[int]) -> Batch:
        """Items ``indices``, read in one go (see ``Batch``)."""
        positions = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(np.ascontiguousarray(self._images()[self.rows[positions]]))
        targets = torch.from_numpy(self.targets[positions].astype(np.int64))
        return Batch(self.transform(images) if self.transform else images, targets, torch.from_numpy(positions))

    def __getstate__(self):  # never pickle an open memory map into a worker
        return {**self.__dict__, "_array": None}


class Batch(list):
    """Items a dataset read in one go (``__getitems__``). To any collate it is the usual list of
    ``(image, target, position)`` items (views into the batch, so a plain ``DataLoader`` works as
    ever); imgclf's ``collate`` hands on the stacked tensors it was made from, with no copy."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, positions: torch.Tensor):
        super().__init__(zip(images, targets.tolist(), positions.tolist(), strict=True))
        self.stacked = [images, targets, positions]


def collate(items):
    """The loader's collate: a ``Batch``'s stacked tensors, anything else as torch's ``default_collate`` makes it."""
    return items.stacked if isinstance(items, Batch) else default_collate(items)


class ImageFiles(Dataset):
    """Images decoded from files on each access (``predict`` on new images)."""

    def __init__(self, paths: list[Path], size: int, channels: int, transform: Callable,
                 interpolation: str = "bilinear"):
        self.paths, self.size, self.channels, self.transform = paths, size, channels, transform
        self.interpolation = interpolation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        array = load_image(self.paths[i], self.size, self.channels, self.interpolation)
        return self.transform(torch.from_numpy(array.transpose(2, 0, 1).copy())), -1, i


class AugmentedBatches:
    """A loader of uint8 batches, each moved to ``device`` and augmented there as one batch."""

    def __init__(self, loader: DataLoader, augment: Callable[[torch.Tensor], torch.Tensor], device: torch.device):
        self.loader, self.augment, self.device = loader, augment, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, targets, positions in self.loader:
            yield self.augment(images.to(self.device, non_blocking=True)), targets, positions


def auto_workers(requested: int | None) -> int:
    """Worker processes for a loader: the user's number, else none on a 2-core machine.

    The cache makes an item a memory copy plus cheap tensor ops, so extra processes pay off only
    when there are cores to spare beyond the training threads.
    """
    if requested is not None:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


def weighted_sampler(targets: np.ndarray, generator: torch.Generator) -> Sampler:
    """Draw classes equally often: each image weighted by 1 / its class count."""
    counts = np.bincount(targets)
    weights = torch.as_tensor(1.0 / counts[targets], dtype=torch.double)
    return WeightedRandomSampler(weights, num_samples=len(targets), replacement=True, generator=generator)


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, sampler: Sampler | None = None,
                generator: torch.Generator | None = None, workers: int | None = None,
                drop_last: bool = False) -> DataLoader:
    """A loader whose image order depends on ``generator`` only, not on the number of workers.

    The sampler owns ``generator``; worker seeds come from a second generator derived from it, because
    a DataLoader draws worker seeds from its generator at a rhythm that depends on the worker setup.
    """
    n_workers = auto_workers(workers)
    if shuffle and sampler is None:
        sampler = RandomSampler(dataset, generator=generator)
    worker_seeds = None
    if generator is not None:
        worker_seeds = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                      generator=worker_seeds, num_workers=n_workers, drop_last=drop_last, collate_fn=collate,
                      persistent_workers=n_workers > 0, pin_memory=torch.cuda.is_available())
