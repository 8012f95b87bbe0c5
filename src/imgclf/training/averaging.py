"""Weight averaging over a run's last K best epochs (a "model soup" of one training run).

Each new best epoch's weights are kept in memory (on the CPU, K copies at most). At the end their
element-wise mean, BatchNorm running statistics included, replaces the best weights only if it
is at least as good on validation by the run's monitor; otherwise the best epoch stays.
"""

from __future__ import annotations

from collections import deque
from pathlib import Path

import torch
from torch import nn

from imgclf.logs import get_logger, is_main_process
from imgclf.models.checkpoint import save_weights

log = get_logger("averaging")


class BestWeights:
    """The weights of the last ``k`` new-best epochs (k < 2: nothing is kept)."""

    def __init__(self, k: int):
        self.k = k
        self.kept: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=max(k, 1))

    def add(self, model: nn.Module, epoch: int) -> None:
        if self.k >= 2:
            self.kept.append((epoch, {n: t.detach().to("cpu", copy=True) for n, t in model.state_dict().items()}))

    def __len__(self) -> int:
        return len(self.kept) if self.k >= 2 else 0

    @property
    def epochs(self) -> list[int]:
        return [epoch for epoch, _ in self.kept]

    def average(self) -> dict[str, torch.Tensor]:
        """Mean of every floating tensor; integer buffers (BatchNorm's batch count) from the newest."""
        states = [state for _, state in self.kept]
        return {name: torch.stack([s[name] for s in states]).mean(0) if newest.is_floating_point() else newest
                for name, newest in states[-1].items()}


def average_if_better(model: nn.Module, bests: BestWeights, runner, meta: dict, weights_path: Path) -> bool:
    """Load the average of ``bests`` into ``model`` and save it if validation is no worse; else keep the best.
    With several processes every rank validates (exactly, so all decide alike) and rank 0 saves."""
    monitor = runner.config.train.monitor
    sign = 1 if monitor.endswith("loss") else -1  # lower is better for a loss
    best_state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    before = runner.validate()[monitor]
    model.load_state_dict(bests.average())
    after = runner.validate()[monitor]
    if sign * after <= sign * before:
        if is_main_process():
            save_weights(model, weights_path, {**meta, "epoch": bests.epochs[-1],
                                               "averaged_epochs": bests.epochs})
        log.info("averaged the weights of epochs %s: %s %.4f (best epoch alone %.4f)", bests.epochs, monitor,
                 after, before)
        return True
    model.load_state_dict(best_state)
    log.info("kept the best epoch: the average of epochs %s has %s %.4f against %.4f", bests.epochs, monitor,
             after, before)
    return False
