"""The ``network`` kind of run: a trained network in a run directory; evaluate a split, predict new images.

Everything needed is inside the directory: config.yaml, classes.json, dataset.json, split.csv,
model.safetensors + model.json. The images themselves stay where the dataset is.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from imgclf import atomic
from imgclf.config import Config, load_config
from imgclf.data.index import DatasetIndex
from imgclf.data.pipeline import PreparedData, eval_loader, inference_batch, prepare
from imgclf.errors import ConfigError, RunDirError
from imgclf.evaluation.evaluate import predict_probs
from imgclf.evaluation.metrics import save_and_score, warn_absent_classes
from imgclf.evaluation.operating import choose_threshold, positive_index
from imgclf.evaluation.predictions import Predictions
from imgclf.evaluation.uncertainty import confidence_intervals
from imgclf.models.checkpoint import check_fits, fill_skeleton, load_weights
from imgclf.models.networks import Classifier, Preprocess, build_model, output_units, resolve_preprocess
from imgclf.models.objective import Objective
from imgclf.runs import dataroot, manifest
from imgclf.runs import files as runfiles
from imgclf.runs.base import register
from imgclf.runs.predict import predict_files
from imgclf.runtime import Compute, exact_fp32, keep_freed_memory, resolve_device

MODEL_FILE = "model.safetensors"
THRESHOLD_FILE = "threshold.json"


@register("network")
class NetworkRun:
    """A trained network's run directory (open it with ``imgclf.load_run(path)``)."""

    def __init__(self, path: str | Path, outer: tuple[Path, ...] = ()):
        self.path = Path(path)
        if not (self.path / "config.yaml").is_file():
            raise RunDirError(f"{self.path} is not a run directory (no config.yaml); pass the --out of a train run")

    @cached_property
    def config(self) -> Config:
        return load_config(self.path / "config.yaml")

    @cached_property
    def classes(self) -> list[str]:
        return runfiles.read_classes(self.path / "classes.json")

    @cached_property
    def meta(self) -> runfiles.ModelFile:
        """model.json, validated and checked against classes.json and config.yaml."""
        path = self.path / MODEL_FILE
        meta = runfiles.read_model_file(path.with_suffix(".json"))
        if meta.classes != self.classes:
            raise RunDirError(f"{path.with_suffix('.json')} and classes.json list different classes (or orders); "
                              f"{runfiles.FIX}")
        expected_units = output_units(self.config.model, len(self.classes))
        if meta.output_units != expected_units:
            raise RunDirError(f"{path.with_suffix('.json')}: output_units is {meta.output_units}, the config's model "
                              f"has {expected_units}; {runfiles.FIX}")
        self._check_preprocess(meta.preprocess)
        return meta

    @property
    def preprocess(self) -> Preprocess:
        p = self.meta.preprocess
        return Preprocess(p.size, p.channels, tuple(p.mean), tuple(p.std), p.interpolation)

    def _check_preprocess(self, saved: runfiles.PreprocessFile) -> None:
        """model.json's input must be what config.yaml trained: an edited size must not reach the model."""
        data = self.config.data
        expected = resolve_preprocess(self.config.model, data.image_size, data.channels, data.interpolation)
        same = (saved.size, saved.channels, saved.interpolation) == (expected.size, expected.channels,
                                                                      expected.interpolation)
        close = all(abs(a - b) < 1e-6 for a, b in zip(saved.mean + saved.std, expected.mean + expected.std,
                                                         strict=True))
        if not (same and close):
            raise RunDirError(f"{self.path / 'model.json'}: preprocess {saved.model_dump()} does not match what "
                              f"config.yaml trains ({expected.to_dict()}); {runfiles.FIX}")

    @cached_property
    def compute(self) -> Compute:
        """How the run predicts: on its training device and memory format, always in fp32.

        Training computes in the run's precision (bf16 autocast by default on a bf16 CPU); every
        saved answer (metrics.json, ``evaluate``, ``predict``, ``serve``, the export's parity) is fp32,
        so the torch engine agrees with the fp32 ONNX graph within 1e-4 and metrics.json with a later
        ``evaluate``.

        On the CPU, malloc keeps freed memory for the next batch (``keep_freed_memory``), as in training:
        predicting 1,440 images with the notebook CNN took 4.9-5.0 s instead of 7.8-8.5. The process then
        keeps its peak memory (``runtime.release_freed_memory`` hands it back).
        """
        train = self.config.train
        channels_last = True if train.channels_last is None else train.channels_last
        device = resolve_device(train.device)
        if device.type == "cpu":
            keep_freed_memory()
        return Compute(device, "fp32", channels_last)

    @property
    def device(self) -> torch.device:
        return self.compute.device

    @cached_property
    def model(self) -> Classifier:
        with torch.device("meta"):  # shapes only: the config must describe exactly the stored tensors
            skeleton = build_model(self.config.model, len(self.classes), self.preprocess)
        check_fits(skeleton, self.path / MODEL_FILE)
        model = fill_skeleton(skeleton, self.path / MODEL_FILE)
        if model is None:
            model = build_model(self.config.model, len(self.classes), self.preprocess)
            load_weights(model, self.path / MODEL_FILE)
        return self.compute.prepare(model).eval()

    @cached_property
    def batch_size(self) -> int:
        """How many images it evaluates and predicts at once (``inference_batch``): config.yaml's batch size,
        at most the training images that dataset.json records."""
        path = self.path / "dataset.json"
        train = sum(runfiles.read_dataset(path).counts.get("train", {}).values())
        if train < 1:
            raise RunDirError(f"{path} records no training images; {runfiles.FIX}")
        return inference_batch(self.config.train.batch_size, train)

    @property
    def objective(self) -> Objective:
        return Objective(len(self.classes), sigmoid=self.meta.output_units == 1)

    @property
    def metrics(self) -> dict:
        path = self.path / "metrics.json"
        return runfiles.read_metrics(path, n_classes=len(self.classes)) if path.exists() else {}

    def index(self, data_root: str | Path | None = None) -> DatasetIndex:
        """The run's split (split.csv), its images read under the dataset folder or ``data_root``."""
        dataset = runfiles.read_dataset(self.path / "dataset.json")
        return self._split(dataset, dataroot.split_root(dataset, data_root),
                           rerooted=dataroot.foreign_root(dataset, data_root) is not None)

    def _split(self, dataset: runfiles.DatasetFile, root: Path, rerooted: bool = False) -> DatasetIndex:
        counted = sum(n for split in dataset.counts.values() for n in split.values())
        return dataroot.read_split(self.path / "split.csv", root, self.classes, counted, rerooted)

    def foreign_root(self, data_root: str | Path | None) -> str | None:
        """``data_root`` resolved, when it is not the folder the run was trained on (None if it is, or not given)."""
        return dataroot.foreign_root(runfiles.read_dataset(self.path / "dataset.json"), data_root)

    @property
    def threshold(self) -> float | None:
        """The binary decision threshold chosen on validation (threshold.json), None for argmax."""
        path = self.path / THRESHOLD_FILE
        return runfiles.read_threshold(path, self.classes).threshold if path.exists() else None

    @property
    def threshold_rule(self) -> str:
        """The rule the run decides by now: threshold.json's (``evaluate --threshold`` re-chooses it there, not in
        config.yaml), else argmax."""
        path = self.path / THRESHOLD_FILE
        return runfiles.read_threshold(path, self.classes).rule if path.exists() else "argmax"

    @property
    def positive(self) -> int:
        return positive_index(self.classes, self.config.data.positive_class)

    def evaluate(self, split: str = "test", data_root: str | Path | None = None, shuffle: bool = False,
                 prepared: PreparedData | None = None, tta: str | None = None) -> dict:
        """Predict ``split``, write predictions_<split>.csv, and metrics computed from that file.

        Decisions use the run's threshold (binary tasks, ``threshold.json``), probabilities the
        test-time augmentation ``tta`` (default: the run's ``evaluate.tta``).
        """
        return self.score(self.probabilities(split, data_root, shuffle, prepared, tta), split, tta,
                          self.foreign_root(data_root))

    def is_own_tta(self, tta: str | None) -> bool:
        """Whether ``tta`` (None: the run's) averages the views that predict, serve and the export average."""
        return tta is None or tta == self.config.evaluate.tta

    def refuse_threshold_on_other_tta(self, rule: str | None, tta: str | None) -> None:
        """A threshold is chosen on the probabilities that predict, serve and the export later decide on."""
        if rule and not self.is_own_tta(tta):
            raise ConfigError(f"--threshold {rule} with --tta {tta}: it would be chosen on {tta}-averaged "
                              f"probabilities, but predict, serve and the export decide on the run's own "
                              f"(tta {self.config.evaluate.tta}); drop --tta, or train with --tta {tta}")

    def probabilities(self, split: str, data_root: str | Path | None = None, shuffle: bool = False,
                      prepared: PreparedData | None = None, tta: str | None = None) -> Predictions:
        """Undecided predictions for ``split``: paths, labels and probabilities, written nowhere."""
        prepared = prepared or prepare(self.index(data_root), self.preprocess, self.config.data)
        if split not in prepared.index.splits:
            raise RunDirError(f"the run has no {split!r} split (it has {sorted(set(prepared.index.splits))})")
        generator = torch.Generator().manual_seed(self.config.train.seed)
        loader = eval_loader(prepared, split, self.preprocess, self.batch_size,
                             self.config.data.workers, shuffle=shuffle, generator=generator)
        return Predictions.of_index(prepared.index.subset(split), self.loader_probs(loader, tta), self.classes)

    def loader_probs(self, loader, tta: str | None = None) -> np.ndarray:
        """N x K probabilities of a loader's images (by dataset position), averaged over ``tta`` views."""
        with exact_fp32(self.compute.device):
            return predict_probs(self.model, self.objective, loader, self.compute, tta or self.config.evaluate.tta)

    def describe(self) -> str:
        """One line for the report: the model and its input."""
        weights = " (ImageNet weights)" if self.config.model.pretrained else ""
        pre = self.preprocess
        return f"{self.config.model.name}{weights} at {pre.size} px, {pre.channels} channel(s)"

    def check(self) -> None:
        _ = self.config, self.classes, self.meta, self.threshold, self.metrics
        runfiles.read_dataset(self.path / "dataset.json")
        diverged = next((name for name, tensor in self.model.state_dict().items()
                         if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)
        if diverged:  # loads, but every answer would be NaN
            raise RunDirError(f"{self.path / MODEL_FILE}: {diverged} holds NaN or infinite values (training diverged: "
                              "re-train with a lower --lr; or a damaged file: restore it)")

    def score(self, preds: Predictions, split: str, tta: str | None = None, data: str | None = None) -> dict:
        """Decide at the run's threshold, write predictions_<split>.csv, then metrics and intervals
        from that file as read back (the reporting wing draws them: ``evalplots.draw_evaluations``). Scores
        averaged over another ``tta`` than the run's record it, and scores of images read under another
        folder than the run's dataset (``data``, from ``evaluate --data``) record that folder."""
        preds = preds.at_threshold(self.threshold, self.positive)
        saved, metrics = save_and_score(preds, self.path / f"predictions_{split}.csv",
                                        self.config.data.positive_class)
        metrics["threshold"] = self.threshold
        warn_absent_classes(metrics, split)
        if not self.is_own_tta(tta):
            metrics["tta"] = tta
        if data:
            metrics["data"] = data
        metrics["intervals"] = confidence_intervals(saved, self.config.data.positive_class,
                                                    self.config.evaluate.bootstrap, self.config.train.seed)
        baselines = runfiles.read_baselines(self.path / "metrics.json")  # kept beside the splits
        atomic.write_json(self.path / "metrics.json", {**self.metrics, split: metrics,
                                                       **({runfiles.BASELINES_KEY: baselines} if baselines else {})})
        return metrics

    def choose_threshold(self, rule: str, val: Predictions | None = None, data: str | None = None) -> float | None:
        """Choose the decision threshold for ``rule`` on validation predictions (``val``, read under the folder
        ``data`` when not the run's own; else the saved predictions_val.csv), save it, and score validation at
        it. ``argmax`` removes a saved threshold."""
        if val is None:
            data = self.metrics.get("val", {}).get("data")
        self.check_threshold_rule(rule)
        dataset = runfiles.read_dataset(self.path / "dataset.json")  # its rows only: the images may have moved
        split = self._split(dataset, Path(dataset.root))
        val = val if val is not None else self._saved(split, "val")
        value = choose_threshold(val.true == self.positive, val.probs[:, self.positive], rule)
        scored = self.metrics  # read once: scoring one split leaves the others' entries as they are
        saved = {name: self._saved(split, name) for name in ("train", "test")  # all read before anything is written
                 if name in scored and (self.path / f"predictions_{name}.csv").is_file()}
        path = self.path / THRESHOLD_FILE
        if value is None:
            path.unlink(missing_ok=True)
        else:
            atomic.write_json(path, {"rule": rule, "threshold": value, "positive_class": self.classes[self.positive],
                                     "chosen_on": "val"})
        manifest.reseal(self.path, THRESHOLD_FILE)
        self.score(val, "val", data=data)
        for name, preds in saved.items():  # decided again at the new threshold from their saved probabilities (no
            # image read again), so that no split's metrics stay at a threshold the run no longer decides by
            self.score(preds, name, scored[name].get("tta"), scored[name].get("data"))
        return value

    def check_threshold_rule(self, rule: str) -> None:
        """Before any image is read for it: a rule other than argmax decides between two classes."""
        if rule != "argmax" and len(self.classes) != 2:
            raise ConfigError(f"--threshold {rule} needs a binary task; this run has {len(self.classes)} classes")

    def _saved(self, split: DatasetIndex, name: str) -> Predictions:
        path = self.path / f"predictions_{name}.csv"
        return dataroot.check_saved_predictions(Predictions.from_csv(path, self.classes), split.subset(name), path)

    def predict(self, inputs: list[str | Path], out: str | Path | None = None, skip_bad_images: bool = False,
                batch_size: int | None = None, tta: str | None = None) -> Predictions:
        """Predict image files, folders (recursive) or glob patterns; optionally write a CSV."""
        preds = predict_files(self, inputs, skip_bad_images, batch_size or self.batch_size,
                              tta or self.config.evaluate.tta)
        preds = preds.at_threshold(self.threshold, self.positive)
        if out:
            preds.to_csv(Path(out))
        return preds
