"""Staged fine-tuning: a list of stages, each with its freeze policy and train settings.

A chain behaves like separate trainings, one after another: each stage has its own settings
(batch size included), and the next stage starts from this stage's end, which is its best-so-far
weights with ``restore_best`` (the default) or its last weights without. A stage's epoch only
counts as a new best when it beats every earlier stage, so with ``restore_best`` fine-tuning can
never end below the head it started from; where a stage never beats the earlier ones, the log
says so (a separate Keras training would keep that stage's own best). A stage whose backbone is
frozen trains the head on cached features (of augmented views when augmentation is on), or
uncached; the log says which. With several processes (``ctx``) each stage wraps the model in DDP
after its freeze, trains on per-rank shards of the global batch, extracts features shard by shard,
validates exactly (``exact_probs``), and rank 0 alone writes the end-of-epoch state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgclf.config import Config, TrainConfig
from imgclf.config.stages import resolve_stages
from imgclf.data.pipeline import PreparedData, eval_loader, inference_batch, shard_loader, train_loader
from imgclf.evaluation.evaluate import predict_probs
from imgclf.evaluation.metrics import compute_metrics, validation_row
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger, is_main_process
from imgclf.models.freeze import apply_freeze, backbone_is_frozen, trains_batchnorm
from imgclf.models.networks import Classifier, Preprocess
from imgclf.models.objective import Objective
from imgclf.runtime import Compute, exact_fp32
from imgclf.training.ddp import rank_batch, shard_features, train_sampler
from imgclf.training.distributed import (
    DistContext,
    broadcast_decision,
    exact_probs,
    gather_objects,
    main_first,
    wrap,
)
from imgclf.training.features import HeadOnly, cache_plan, extract_features, feature_loader
from imgclf.training.fit import EarlyStopping, fit
from imgclf.training.resume import capture_rng, restore_rng, save_state

log = get_logger("stages")


@dataclass(frozen=True)
class Validated:
    """One validation's probabilities and the state of the weights they came from."""

    fingerprint: tuple
    probs: np.ndarray


def weights_fingerprint(model: nn.Module) -> tuple:
    """Where each tensor lives and how often torch ops changed it in place (an optimizer step, a
    ``load_state_dict``). A second check only: BatchNorm's running statistics and writes through ``.data``
    move no version, so the runner also forgets its record whenever it loads weights."""
    return tuple((t.data_ptr(), t._version) for t in model.state_dict(keep_vars=True).values())


@dataclass
class StageRunner:
    """Everything the stages share: model, data, objective and where the best weights go."""

    model: Classifier
    objective: Objective
    prepared: PreparedData
    config: Config
    preprocess: Preprocess
    compute: Compute
    generator: torch.Generator
    save_best: Callable[[int], None]
    load_best: Callable[[], None]
    on_epoch: Callable[[list[dict]], None]
    out: Path | None = None  # where the end-of-epoch state goes (None: not resumable)
    best_file: Path | None = None  # the best-weights file that save_best writes
    ctx: DistContext = field(default_factory=DistContext)  # one process unless torchrun started several
    validated: Validated | None = None  # the last validation, when it computed as the final evaluation does
    best_validated: Validated | None = None  # the same, of the epoch whose weights save_best wrote last

    def run(self, resume: tuple[dict, dict] | None = None) -> list[dict]:
        """Train every stage; with ``resume`` (from ``resume.load_state``), continue a killed run."""
        tensors, info = resume or ({}, {})
        history: list[dict] = info.get("history", [])
        stopper: EarlyStopping | None = None
        has_val = "val" in self.prepared.index.splits
        limit = self.config.train.max_seconds
        deadline = time.perf_counter() + limit if limit else None
        for index, (name, cfg) in enumerate(resolve_stages(self.config)):
            if resume and (index < info["stage_index"] or (index == info["stage_index"] and info["stage_done"])):
                if index == info["stage_index"]:  # killed between stages: hand on as the stage end would
                    if has_val and cfg.restore_best:
                        self._load_best()
                    stopper = self._restored_stopper(cfg, info)
                    restore_rng(self.generator, tensors, info)  # before the next stage builds its loaders
                    resume = None
                continue
            gave_up = stopper is not None and stopper.out_of_time
            if history and broadcast_decision(self.ctx, gave_up or (deadline is not None
                                                                    and time.perf_counter() >= deadline)):
                log.info("time limit: stage %s skipped (--max-seconds %g %s)", name, limit,
                         "would be overrun: an epoch was given up" if gave_up else "spent")
                continue
            apply_freeze(self.model, cfg.freeze, cfg.freeze_bn)
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            views, how = cache_plan(cfg, self.config.augment) if backbone_is_frozen(self.model) else (None, "")
            share = f" ({rank_batch(self.ctx, cfg.batch_size)} per process)" if self.ctx.distributed else ""
            log.info("stage %s: freeze=%s, %s trainable parameters, batch size %d%s%s", name, cfg.freeze,
                     f"{trainable:,}", cfg.batch_size, share, f"; {how}" if how else "")
            if views and cfg.compile:
                log.warning("warning: --compile has no effect in stage %s: it trains the head on cached features, "
                            "run eagerly", name)
            stopper = stopper or EarlyStopping(cfg.monitor, cfg.effective_patience, cfg.min_delta)
            model, loader, validate = self._cached(cfg, views) if views else self._images(cfg)
            best_before = stopper.best_epoch
            fit_resume = None
            if resume and index == info["stage_index"]:
                stopper = self._restored_stopper(cfg, info)
                restore_rng(self.generator, tensors, info)  # after the loaders exist, as at that epoch's end
                fit_resume = {**tensors, "stage_epoch": info["stage_epoch"], "bad_epochs": info["stopper"]["bad"]}
                resume = None
            fit(model, self.objective, loader, cfg, self.compute, validate if has_val else None,
                self._on_best, self.on_epoch, stopper=stopper, history=history, stage=name,
                checkpoint=self._checkpointer(index, stopper, history), resume=fit_resume, ctx=self.ctx,
                deadline=deadline)
            if has_val:
                self._hand_on(name, cfg, stopper, best_before)
        return history

    def _on_best(self, epoch: int) -> None:
        self.best_validated = self.validated  # validated just now, on the weights save_best writes
        self.save_best(epoch)

    def final_val_probs(self, saved_at_best: bool) -> np.ndarray | None:
        """The validation probabilities of the weights the run ends with, when a validation computed them exactly
        as the final evaluation would (same weights, module, batches, fp32, no TTA; one CPU process): the final
        evaluation then reuses them instead of predicting val again. ``saved_at_best``: the run's weights file is
        the one save_best wrote last; otherwise the run saves the model's weights as they are now."""
        record = self.best_validated if saved_at_best else self.validated
        if record is None or not (saved_at_best or record.fingerprint == weights_fingerprint(self.model)):
            return None
        return record.probs

    def _hand_on(self, name: str, cfg: TrainConfig, stopper: EarlyStopping, best_before: int) -> None:
        """Leave the weights the next stage (and the result) start from: the best so far, or this stage's last."""
        if not cfg.restore_best:
            log.info("stage %s ends with its last weights (restore_best off)", name)
            return
        if 0 < best_before == stopper.best_epoch:
            log.info("stage %s never beat the earlier stages' best (%s %.4f at epoch %d): going on from that "
                     "epoch's weights, where a separate Keras training would keep this stage's own best", name,
                     cfg.monitor, stopper.best, stopper.best_epoch)
        self._load_best()

    def _load_best(self) -> None:
        self.validated = None  # these weights were validated when saved: best_validated, not the last record
        self.load_best()

    def validate(self) -> dict[str, float]:
        """The whole model's validation metrics now (val_loss, val_accuracy, ...)."""
        val = eval_loader(self.prepared, "val", self.preprocess, self._eval_batch(self.config.train.batch_size),
                          self.config.data.workers)
        return self._validator(self.model, val)()

    def _eval_batch(self, batch_size: int) -> int:
        """Validation's batch size: as the run evaluates and predicts later (``inference_batch``)."""
        return inference_batch(batch_size, self.prepared.index.splits.count("train"))

    @staticmethod
    def _restored_stopper(cfg: TrainConfig, info: dict) -> EarlyStopping:
        stopper = EarlyStopping(cfg.monitor, cfg.effective_patience, cfg.min_delta)
        stopper.best, stopper.best_epoch = info["stopper"]["best"], info["stopper"]["best_epoch"]
        return stopper

    def _checkpointer(self, stage_index: int, stopper: EarlyStopping, history: list[dict]):
        """Rank 0 saves the epoch's state (with every rank's RNG states when there are several)."""
        if self.out is None or not (self.ctx.distributed or is_main_process()):
            return None

        def checkpoint(fit_state: dict) -> None:
            info = {"epoch": len(history), "stage_index": stage_index, "stage_epoch": fit_state.pop("stage_epoch"),
                    "stage_done": fit_state.pop("stage_done"), "history": history,
                    "stopper": {"best": stopper.best, "best_epoch": stopper.best_epoch, "bad": stopper.bad_epochs}}
            if not self.ctx.distributed:
                save_state(self.out, self.model, self.generator, fit_state, info, self.best_file)
                return
            rank_states = gather_objects(self.ctx, capture_rng(self.generator))
            with main_first(self.ctx):
                if self.ctx.is_main:
                    save_state(self.out, self.model, self.generator, fit_state, info, self.best_file, rank_states)

        return checkpoint

    def _images(self, cfg: TrainConfig):
        sampler = self._sampler(self.prepared.index.subset("train").targets, cfg)
        loader = train_loader(self.prepared, self.config.augment, self.preprocess, rank_batch(self.ctx, cfg.batch_size),
                              self.generator, self.compute.device, sampler, self.config.data.workers,
                              trains_batchnorm(self.model))
        val = eval_loader(self.prepared, "val", self.preprocess, self._eval_batch(cfg.batch_size),
                          self.config.data.workers)
        pre = self.preprocess
        model = self._trainable(self.model, cfg, lambda: self.compute.batch(torch.zeros(2, pre.channels, pre.size,
                                                                                         pre.size)))
        return model, loader, self._validator(model, val)

    def _trainable(self, model: nn.Module, cfg: TrainConfig, sample: Callable[[], torch.Tensor]) -> nn.Module:
        """``model`` as this stage trains it: in DDP for several processes (built after the stage's freeze),
        compiled with ``compile``; weights are still saved from the plain module."""
        if self.ctx.distributed:
            model = wrap(model, self.ctx, self.compute.device, cfg.sync_bn, sample())
        return torch.compile(model) if cfg.compile else model

    def _cached(self, cfg: TrainConfig, views: int):
        """The head over features cached once: ``views`` augmented views per image, or the plain images."""
        backbone = self.model.backbone
        if self.ctx.distributed:
            train_feats = self._shard_features("train", views, cfg)
        else:
            train_images = (train_loader(self.prepared, self.config.augment, self.preprocess, cfg.batch_size,
                                         self.generator, self.compute.device, workers=self.config.data.workers)
                            if views > 1
                            else eval_loader(self.prepared, "train", self.preprocess, cfg.batch_size,
                                             self.config.data.workers))
            train_feats = extract_features(backbone, train_images, self.compute, views)
        loader = feature_loader(train_feats, rank_batch(self.ctx, cfg.batch_size), shuffle=True,
                                generator=self.generator, sampler=self._sampler(train_feats.tensors[1].numpy(), cfg),
                                trains_batchnorm=trains_batchnorm(self.model.head))
        head = HeadOnly(self.model.head)
        if self.ctx.distributed:
            sample = torch.zeros(2, *train_feats.tensors[0].shape[1:], device=self.compute.device)
            head = wrap(head, self.ctx, self.compute.device, cfg.sync_bn, sample)
        validate = None
        if "val" in self.prepared.index.splits:
            if self.ctx.distributed:
                val_feats = self._shard_features("val", 1, cfg)
            else:
                val_images = eval_loader(self.prepared, "val", self.preprocess, self._eval_batch(cfg.batch_size),
                                         self.config.data.workers)
                with exact_fp32(self.compute.device):  # scored: fp32, as the final evaluation computes it
                    val_feats = extract_features(backbone, val_images, self.compute.inference())
            validate = self._validator(head, feature_loader(val_feats, cfg.batch_size, shuffle=False))
        return head, loader, validate

    def _shard_features(self, split: str, views: int, cfg: TrainConfig):
        """Several processes: each rank extracts its shard of ``split`` (augmented when ``views`` > 1), all get all."""
        augment = self.config.augment if views > 1 else None

        def loader(indices):
            return shard_loader(self.prepared, split, indices, self.preprocess, cfg.batch_size, augment,
                                self.compute.device, self.config.data.workers)

        return shard_features(self.ctx, self.model.backbone, self.prepared.dataset(split), loader, self.compute,
                              views, cfg.batch_size)

    def _sampler(self, targets, cfg: TrainConfig):
        return train_sampler(self.ctx, targets, cfg.sampler == "weighted", self.config.train.seed, self.generator)

    def _validator(self, model: nn.Module, loader) -> Callable[[], dict[str, float]]:
        """Validation metrics for the loop, computed like the final report: from Predictions."""
        val = self.prepared.index.subset("val")

        # As the final evaluation computes: the run's own module (not compiled, DDP or a head over cached
        # features), its batches, no test-time views, on the CPU (oneDNN computes alike for alike shapes)
        as_final = (model is self.model and not self.ctx.distributed and self.compute.device.type == "cpu"
                    and loader.batch_size == self._eval_batch(self.config.train.batch_size)
                    and self.config.evaluate.tta == "none")

        def validate() -> dict[str, float]:
            compute = self.compute.inference()  # fp32, as metrics.json: the best epoch's numbers are the run's
            with exact_fp32(compute.device):
                probs = exact_probs(model, self.objective, loader.dataset, loader.batch_size, compute, self.ctx,
                                    workers=loader.num_workers) if self.ctx.distributed \
                    else predict_probs(model, self.objective, loader, compute)
            self.validated = Validated(weights_fingerprint(model), probs) if as_final else None
            return validation_row(compute_metrics(Predictions.of_index(val, probs), self.config.data.positive_class))

        return validate
