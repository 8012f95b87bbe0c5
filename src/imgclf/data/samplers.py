"""Which images each process sees when one run trains on several processes (torchrun/DDP).

``--batch-size`` is the GLOBAL training batch at every world size: each rank trains on
``config.stages.per_rank_batch(batch, world_size)`` images a step, so the same command runs the same number of
steps per epoch, and ``--lr`` keeps its meaning: it belongs to the global batch and is never
rescaled by the world size (a user who changes ``--batch-size`` scales ``--lr`` in proportion, the
linear rule). A world size that does not divide the batch is a ConfigError. Evaluation predicts up
to ``--batch-size`` images per forward pass on each rank; no result depends on it.

Training shards may repeat an image or two so that every rank runs the same number of steps (DDP
needs that: a rank with one step more would wait forever for the others' gradients). Evaluation
shards never repeat an image: they are contiguous, unpadded runs of whole batches, gathered and
placed by dataset index (``training.distributed.gather_by_index``), so every image counts exactly
once and no metric depends on the world size.

Every function takes plain ``rank``/``world_size`` numbers: this wing sits below ``training``,
where the process group lives. With ``world_size`` 1 nothing here is used; the single-process
loaders stay exactly as they were.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from imgclf.runtime import derive_seed


def rank_seed(seed: int, rank: int) -> int:
    """Per-rank seed for augmentation randomness, so ranks do not flip the same images; rank 0 keeps ``seed``.
    Never for the samplers, whose draw every rank must share."""
    return seed if rank == 0 else derive_seed(seed, f"rank{rank}")


def class_balanced_weights(targets: np.ndarray) -> torch.Tensor:
    """Each image weighted by 1 / its class count, so every class is drawn equally often."""
    targets = np.asarray(targets, dtype=np.int64)
    counts = np.bincount(targets)
    return torch.as_tensor(1.0 / counts[targets], dtype=torch.double)


def train_shard_sampler(length: int, rank: int, world_size: int, seed: int) -> DistributedSampler:
    """This rank's shuffled share of ``length`` training items; call ``set_epoch(epoch)`` before every epoch.

    The permutation depends only on ``seed`` and the epoch, so every rank draws the same one and
    takes its own stride of it, and a resumed run gets the same order back from the epoch number.
    """
    return DistributedSampler(range(length), num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                              drop_last=False)


class DistributedWeightedSampler(Sampler[int]):
    """``--sampler weighted`` on many ranks: each rank takes its stride of one seeded global weighted draw.

    The global draw has ``world_size * ceil(N / world_size)`` items (with replacement, weighted by
    ``class_balanced_weights``), so every rank draws the same number and, interleaved, the ranks'
    draws are exactly ``global_draw()``: the class balance holds over the whole job, not per shard.
    """

    def __init__(self, targets: np.ndarray, rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.weights = class_balanced_weights(targets)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.num_samples = math.ceil(len(self.weights) / world_size) if len(self.weights) else 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_draw(self) -> torch.Tensor:
        """The whole job's draw for this epoch: the same on every rank."""
        total = self.num_samples * self.world_size
        if total == 0:
            return torch.zeros(0, dtype=torch.int64)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.multinomial(self.weights, total, replacement=True, generator=generator)

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_draw()[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


def eval_shard(length: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """This rank's contiguous, unpadded run of whole single-process batches of ``range(length)``.

    The batches one process would predict (``batch_size`` images in dataset order) are dealt out
    in rank order, so every image is predicted in the very batch it has in one process: kernels
    that round differently for another batch size cannot change a digit. Ranks differ by at most
    one batch; a rank may get nothing (fewer batches than ranks) and still takes part in the gather.
    """
    batches = -(-length // batch_size)
    first, last = batches * rank // world_size, batches * (rank + 1) // world_size
    return np.arange(first * batch_size, min(last * batch_size, length), dtype=np.int64)


class ShardView(Dataset):
    """``dataset`` restricted to ``indices``; item ``i`` is ``dataset[indices[i]]`` with position ``i``.

    Positions stay local, so ``predict_probs`` fills a table of this shard's rows as it does for a
    whole split; ``indices`` then says which dataset row each one is.
    """

    def __init__(self, dataset: Dataset, indices: np.ndarray):
        self.dataset, self.indices = dataset, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, target, _ = self.dataset[int(self.indices[i])]
        return image, target, i


def place_rows(pieces: list[tuple[np.ndarray, np.ndarray]], total: int) -> np.ndarray:
    """(dataset indices, rows) from every rank -> one ``total``-row array in dataset order.

    An index that several ranks hold (a padded sampler) counts once, from the first piece; an index
    that no piece holds is a bug in the sharding, never silently a row of zeros.
    """
    template = next((rows for idx, rows in pieces if len(idx)), pieces[0][1])
    out = np.zeros((total, *template.shape[1:]), dtype=template.dtype)
    filled = np.zeros(total, dtype=bool)
    for idx, rows in pieces:
        if not len(idx):  # a rank with an empty shard; its rows may not even have the others' width
            continue
        idx, first = np.unique(idx, return_index=True)
        new = ~filled[idx]
        out[idx[new]] = rows[first[new]]
        filled[idx[new]] = True
    if not filled.all():
        raise RuntimeError(f"{int((~filled).sum())} of {total} items received no rows from any rank")
    return out


def set_sampler_epoch(loader, epoch: int) -> None:
    """Tell a loader's sampler which epoch starts (a no-op for the single-process samplers).

    ``loader`` may be a DataLoader or a wrapper with a ``loader`` attribute (``AugmentedBatches``).
    """
    inner = getattr(loader, "loader", loader)
    sampler = getattr(inner, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
