"""The training loop: train_one_epoch, then evaluate, early-stop and checkpoint, epoch by epoch.

``fit`` knows nothing about files or datasets: validation and checkpointing come in as
callables, so staged fine-tuning, k-fold CV and distributed runs reuse it unchanged. With several
processes (``ctx``) each rank trains on its shard, the epoch's train loss and accuracy are gathered
over every rank, and rank 0's row (hence every early-stopping and best-epoch decision) is broadcast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from imgclf.config import TrainConfig
from imgclf.data.samplers import set_sampler_epoch
from imgclf.errors import ImgclfError
from imgclf.evaluation.metrics import macro_scores
from imgclf.models.freeze import param_groups, set_frozen_norms_eval
from imgclf.models.objective import Objective
from imgclf.runtime import Compute, get_logger, is_main_process
from imgclf.training.distributed import DistContext, GradScaling, broadcast_decision, gather_objects, unwrap
from imgclf.training.optim import build_optimizer, build_schedule, load_optimizer_state, step_schedule

log = get_logger("train")


@dataclass
class EarlyStopping:
    """Tracks the best value of a monitored metric; ``mode`` is min for losses, max otherwise."""

    monitor: str
    patience: int
    min_delta: float = 0.0
    mode: str = field(init=False)
    best: float = field(init=False)
    best_epoch: int = -1
    bad_epochs: int = 0
    out_of_time: bool = False  # an epoch was given up part-way for the time limit: no later stage starts

    def __post_init__(self) -> None:
        self.mode = "min" if self.monitor.endswith("loss") else "max"
        self.best = math.inf if self.mode == "min" else -math.inf

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value``; return True if it is a new best."""
        gain = (self.best - value) if self.mode == "min" else (value - self.best)
        if gain > self.min_delta or self.best_epoch < 0:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Keras's rule: stop at the ``patience``-th epoch in a row without improvement (patience 0: the first)."""
        return self.bad_epochs > 0 and self.bad_epochs >= self.patience


class OutOfTime(Exception):
    """An epoch given up part-way: at its pace it would end after the time limit (``EpochClock``)."""

    def __init__(self, done: int, total: int, overrun: float):
        super().__init__(f"{done} of {total} batches")
        self.done, self.total, self.overrun = done, total, overrun


@dataclass
class EpochClock:
    """Projects an epoch's end from its batches so far (the first, warm-up batch left out).

    ``extra`` is the seconds expected after the last batch (the previous epoch's validation).
    """

    deadline: float
    extra: float = 0.0
    first_batch_end: float | None = None

    def check(self, done: int, total: int) -> None:
        """Raise ``OutOfTime`` when the epoch, going on at its pace, would end after the deadline."""
        now = time.perf_counter()
        if done == 1:
            self.first_batch_end = now
            return
        if self.first_batch_end is None or done >= total:
            return
        projected = now + (now - self.first_batch_end) / (done - 1) * (total - done) + self.extra
        if projected > self.deadline:
            raise OutOfTime(done, total, projected - self.deadline)


class EpochLabels:
    """An epoch's true and predicted labels, copied into two arrays made once, at the first step (steps x its batch).

    Keeping each step's small label tensors alive until the epoch ends instead scatters them through
    malloc's heap between the steps' large tensors; the freed space around them cannot be joined up
    again, so the process's memory grew with the number of steps: one epoch of 10k images peaked at 726 MiB
    of private memory (694-846, 3 runs) against 658 (639-663) with the copies, 1k images at ~590 either way.
    """

    def __init__(self, steps: int) -> None:
        self.steps, self.count = steps, 0
        self.truth = self.decided = np.zeros(0, dtype=np.int64)

    def add(self, truth: torch.Tensor, decided: torch.Tensor) -> None:
        end = self.count + truth.shape[0]
        if not self.count:
            self.truth, self.decided = (np.empty(self.steps * truth.shape[0], dtype=np.int64) for _ in range(2))
        if end > self.truth.shape[0]:  # batches larger than the first one: grow
            self.truth, self.decided = (np.resize(a, max(end, 2 * a.shape[0])) for a in (self.truth, self.decided))
        self.truth[self.count:end] = truth.cpu().numpy()
        self.decided[self.count:end] = decided.cpu().numpy()
        self.count = end

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.truth[:self.count].copy(), self.decided[:self.count].copy()


def train_one_epoch(model: nn.Module, objective: Objective, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    compute: Compute, desc: str, scaling: GradScaling | None = None,
                    ctx: DistContext | None = None, clock: EpochClock | None = None) -> dict[str, float]:
    """One pass over ``loader``; fp16 losses are scaled (``scaling``); the row counts every rank's images.

    With ``clock`` the pass raises ``OutOfTime`` as soon as it would end after the clock's deadline.
    """
    scaling = scaling or GradScaling(compute.device, compute.precision)
    model.train()
    set_frozen_norms_eval(model)
    total_loss, correct, seen = 0.0, 0, 0
    labels = EpochLabels(len(loader))  # train precision/recall/F1 without another pass
    bar = tqdm(loader, desc=desc, leave=False, disable=None if is_main_process() else True, dynamic_ncols=True)
    for step, (images, targets, _) in enumerate(bar, 1):
        images, targets = compute.batch(images), targets.to(compute.device, non_blocking=True)
        with compute.autocast():
            logits = model(images)
        loss = objective.loss(logits, targets)
        if not torch.isfinite(loss):
            raise ImgclfError(f"training diverged: loss is {loss.item()} in {desc}; lower --lr "
                              f"(now {optimizer.param_groups[0]['lr']:g}) or check the images")
        optimizer.zero_grad(set_to_none=True)
        scaling.backward(loss)  # fp32 and bf16: loss.backward() and optimizer.step(), exactly
        scaling.step(optimizer)
        n = targets.shape[0]
        total_loss += loss.item() * n
        pred = objective.probabilities(logits.detach()).argmax(1)
        correct += int((pred == targets).sum())
        labels.add(targets, pred)
        seen += n
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
        if clock is not None:
            clock.check(step, len(loader))
    tally = (total_loss, correct, seen, *labels.arrays())
    return _epoch_row(gather_objects(ctx or DistContext(), tally), objective.num_classes)


def _epoch_row(tallies: list[tuple], num_classes: int) -> dict[str, float]:
    """The train columns of history.csv from every rank's (loss sum, correct, seen, truth, decided)."""
    if len(tallies) == 1:
        total_loss, correct, seen, truth, decided = tallies[0]
    else:
        total_loss, correct, seen = (sum(t[i] for t in tallies) for i in range(3))
        truth, decided = (np.concatenate([t[i] for t in tallies]) for i in (3, 4))
    scores = macro_scores(truth, decided, num_classes) if seen else {}
    return {"train_loss": total_loss / max(seen, 1), "train_accuracy": correct / max(seen, 1),
            **{f"train_{name}": value for name, value in scores.items()}}


def fit(model: nn.Module, objective: Objective, train_loader: DataLoader, cfg: TrainConfig, compute: Compute,
        validate: Callable[[], dict[str, float]] | None, on_best: Callable[[int], None],
        on_epoch: Callable[[list[dict]], None], *, stopper: EarlyStopping | None = None,
        history: list[dict] | None = None, stage: str = "train",
        checkpoint: Callable[[dict], None] | None = None, resume: dict | None = None,
        ctx: DistContext | None = None, deadline: float | None = None) -> list[dict]:
    """Train for up to ``cfg.epochs``; call ``on_best(epoch)`` on each new best, ``on_epoch(history)`` after each.

    ``stopper`` carries the best value from earlier stages, so a stage only counts as better when it
    beats everything before it; ``history`` continues their epoch numbering. Without ``validate``
    every epoch counts as the best (the last weights are kept). ``checkpoint(state)`` receives the
    optimizer and schedule state after each epoch; ``resume`` is such a state to continue from.
    ``model`` may be DDP-wrapped (``ctx``: several processes); the loader's sampler gets the epoch number.
    ``deadline`` (a ``time.perf_counter`` value, from ``--max-seconds``) ends training after the epoch
    when another one of the same length would not finish before it; and, when an earlier best epoch
    exists to go back to (validation, ``restore_best``, one process), gives up an epoch part-way once
    its pace shows it would end after the deadline: ``--max-seconds`` then holds to within a few batches.
    """
    ctx = ctx or DistContext()
    groups = param_groups(unwrap(model), cfg.backbone_lr_mult)
    for group in groups:
        group["lr"] = cfg.lr * group.pop("lr_mult")
    optimizer = build_optimizer(groups, cfg)
    schedule = build_schedule(optimizer, cfg)
    scaling = GradScaling(compute.device, compute.precision)
    stopper = stopper or EarlyStopping(cfg.monitor, cfg.effective_patience, cfg.min_delta)
    stopper.patience, stopper.min_delta, stopper.bad_epochs = cfg.effective_patience, cfg.min_delta, 0  # this stage's
    history = history if history is not None else []
    first = 1
    if resume:
        load_optimizer_state(optimizer, resume["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(resume["schedule"])
        if resume.get("scaler"):
            scaling.load_state_dict(resume["scaler"])
        stopper.bad_epochs, first = resume["bad_epochs"], resume["stage_epoch"] + 1
    for stage_epoch in range(first, cfg.epochs + 1):
        epoch = len(history) + 1
        start = time.perf_counter()
        desc = f"{stage} {stage_epoch}/{cfg.epochs}"
        set_sampler_epoch(train_loader, epoch)  # several processes: a new seeded shuffle; one: no-op
        clock = _clock(deadline, history, stopper, cfg, validate, ctx)
        try:
            row = {"epoch": epoch, "stage": stage, "lr": optimizer.param_groups[0]["lr"],
                   **train_one_epoch(model, objective, train_loader, optimizer, compute, desc, scaling, ctx, clock),
                   "train_seconds": round(time.perf_counter() - start, 3)}  # training alone: throughput
        except OutOfTime as late:
            log.info("time limit: %s %d/%d given up after %d of %d batches: at its pace it would end %.0f s after "
                     "--max-seconds %g; going back to the best epoch (%d)", stage, stage_epoch, cfg.epochs,
                     late.done, late.total, late.overrun, cfg.max_seconds, stopper.best_epoch)
            stopper.out_of_time = True
            break
        row.update(validate() if validate else {})
        row["seconds"] = round(time.perf_counter() - start, 3)
        row = broadcast_decision(ctx, row)  # rank 0's row and decisions on every rank: nobody stops alone
        monitored = row.get(cfg.monitor)
        if validate and monitored is None:
            raise ImgclfError(f"monitor {cfg.monitor!r} is not a validation metric; use one of "
                              f"{', '.join(k for k in row if k.startswith('val_'))}")
        improved = stopper.update(monitored, epoch) if validate else True
        if improved:
            on_best(epoch)
        history.append(row)
        on_epoch(history)
        log.info("%s  %s%s", desc, _format_row(row), "  *" if improved else "")
        step_schedule(schedule, monitored)
        stop = bool(validate and cfg.early_stopping and stopper.should_stop)
        out_of_time = broadcast_decision(ctx, out_of_time_after(start, deadline)) and stage_epoch < cfg.epochs
        if checkpoint:
            checkpoint({"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict() if schedule else None,
                        **({"scaler": scaling.state_dict()} if scaling.enabled else {}),
                        "stage_epoch": stage_epoch, "stage_done": stop or out_of_time or stage_epoch == cfg.epochs})
        if out_of_time and not stop:
            log.info("time limit: %s ends after %s of %d (--max-seconds %g; another epoch would not finish in "
                     "time)", stage, count(stage_epoch, "epoch"), cfg.epochs, cfg.max_seconds)
            break
        if stop:
            if stage_epoch < cfg.epochs:  # stopping on the budget's last epoch is no early stop
                log.info("%s", early_stop_message(stage, stage_epoch, cfg, stopper))
            break
    return history


def _clock(deadline: float | None, history: list[dict], stopper: EarlyStopping, cfg: TrainConfig,
           validate: Callable | None, ctx: DistContext) -> EpochClock | None:
    """An ``EpochClock`` when an epoch may be given up: a limit, and a best epoch to go back to."""
    if deadline is None or validate is None or not cfg.restore_best or stopper.best_epoch < 1 or ctx.distributed:
        return None
    last = history[-1] if history else {}
    return EpochClock(deadline, max(0.0, last.get("seconds", 0.0) - last.get("train_seconds", 0.0)))


def out_of_time_after(epoch_start: float, deadline: float | None) -> bool:
    """Whether an epoch as long as the one that began at ``epoch_start`` would end after ``deadline``."""
    if deadline is None:
        return False
    now = time.perf_counter()
    return now + (now - epoch_start) > deadline


def count(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``: log lines read as sentences."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def early_stop_message(stage: str, stage_epoch: int, cfg: TrainConfig, stopper: EarlyStopping) -> str:
    """Why a stage ended before its epoch budget, in the numbers that made it stop."""
    ran = f"early stopping {stage} after {count(stage_epoch, 'epoch')} of {cfg.epochs}"
    best = f"best {cfg.monitor} {stopper.best:.4f} at epoch {stopper.best_epoch}"
    return f"{ran}: {cfg.monitor} has not improved for {count(stopper.bad_epochs, 'epoch')} ({best})"


def _format_row(row: dict) -> str:
    keys = [k for k in row if k.startswith(("train_", "val_"))]
    return "  ".join(f"{k}={row[k]:.4f}" for k in keys if isinstance(row[k], float))
