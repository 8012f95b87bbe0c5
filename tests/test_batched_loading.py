"""The cache hands loaders whole batches: exactly what the per-image path and torch's collate made."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from imgclf.data.datasets import CachedImages, make_loader
from imgclf.data.samplers import ShardView
from imgclf.data.transforms import build_eval_transform


class PerImage(CachedImages):
    """The same dataset read the old way: one image at a time, then torch's default collate."""

    __getitems__ = None


@pytest.fixture
def cache_file(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "cache.npy"
    np.save(path, rng.integers(0, 256, (11, 3, 6, 5), dtype=np.uint8))
    return path


def batches(dataset, **loader_args) -> list[list[torch.Tensor]]:
    return [list(batch) for batch in make_loader(dataset, 4, **loader_args)]


@pytest.mark.parametrize("transform", [None, build_eval_transform((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))])
def test_batched_reads_equal_the_per_image_path(cache_file, transform):
    rows, targets = np.array([9, 0, 3, 3, 7, 1, 10]), np.array([2, 0, 1, 1, 0, 2, 1])
    args = {"shuffle": True}
    ours = batches(CachedImages(cache_file, rows, targets, transform), generator=torch.Generator().manual_seed(3),
                   **args)
    theirs = batches(PerImage(cache_file, rows, targets, transform), generator=torch.Generator().manual_seed(3),
                     **args)
    assert [len(b[1]) for b in ours] == [4, 3]
    for mine, old in zip(ours, theirs, strict=True):
        for a, b in zip(mine, old, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a, b)


def test_batches_come_in_the_samplers_order_with_repeats(cache_file):
    array = np.load(cache_file)
    rows = np.array([4, 2, 8])
    dataset = CachedImages(cache_file, rows, np.array([0, 1, 0]), None)
    images, targets, positions = dataset.__getitems__([2, 0, 2]).stacked
    assert torch.equal(images, torch.from_numpy(array[[8, 4, 8]]))
    assert targets.tolist() == [0, 0, 0] and positions.tolist() == [2, 0, 2]


def test_a_plain_dataloader_over_the_cache_still_collates_items(cache_file):
    """torch's own DataLoader (default_collate) sees the batch as a list of items, as it always did."""
    dataset = CachedImages(cache_file, np.arange(5), np.arange(5) % 2, None)
    images, targets, positions = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert torch.equal(images, torch.from_numpy(np.load(cache_file)[:4]))
    assert targets.tolist() == [0, 1, 0, 1] and positions.tolist() == [0, 1, 2, 3]


def test_a_shard_view_still_reads_image_by_image(cache_file):
    dataset = CachedImages(cache_file, np.arange(11), np.arange(11) % 3, None)
    (images, targets, positions), = batches(ShardView(dataset, np.array([5, 1, 9])))
    assert torch.equal(images, torch.from_numpy(np.load(cache_file)[[5, 1, 9]]))
    assert targets.tolist() == [2, 1, 0] and positions.tolist() == [0, 1, 2]
