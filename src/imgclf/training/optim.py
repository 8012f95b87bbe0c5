"""Optimizer and learning-rate schedule registries (name -> factory), as named in the config."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim import lr_scheduler

from imgclf.config import TrainConfig

OPTIMIZERS: dict[str, Callable[[Iterable, TrainConfig], torch.optim.Optimizer]] = {
    "adam": lambda p, c: torch.optim.Adam(p, lr=c.lr, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay),
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov and c.momentum > 0,
                                        weight_decay=c.weight_decay),
    "rmsprop": lambda p, c: torch.optim.RMSprop(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adadelta": lambda p, c: torch.optim.Adadelta(p, lr=c.lr, weight_decay=c.weight_decay),
    "adagrad": lambda p, c: torch.optim.Adagrad(p, lr=c.lr, weight_decay=c.weight_decay),
}

# Schedules step once per epoch; 'plateau' steps on the monitored validation value.
SCHEDULES: dict[str, Callable[[torch.optim.Optimizer, TrainConfig], object | None]] = {
    "none": lambda o, c: None,
    "cosine": lambda o, c: lr_scheduler.CosineAnnealingLR(o, T_max=c.epochs),
    "step": lambda o, c: lr_scheduler.StepLR(o, step_size=c.step_size, gamma=c.gamma),
    "plateau": lambda o, c: lr_scheduler.ReduceLROnPlateau(
        o, mode="min" if c.monitor.endswith("loss") else "max", factor=c.gamma,
        patience=max(1, c.effective_patience // 3)),
}


def build_optimizer(params: Iterable, cfg: TrainConfig) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    return SCHEDULES[cfg.schedule](optimizer, cfg)


def step_schedule(schedule, monitored: float | None) -> None:
    if schedule is None:
        return
    if isinstance(schedule, lr_scheduler.ReduceLROnPlateau):
        if monitored is not None:
            schedule.step(monitored)
    else:
        schedule.step()
