"""Engines: what turns decoded uint8 images into probabilities, for ``predict --engine`` and the server.

``onnx`` runs ``RUN/export/model.onnx`` in onnxruntime (checked against export.json and the run's
weights first); ``torch`` is the run's own model, as ``imgclf predict`` runs it. Both take the
same input, ``N x S x S x C`` uint8 from ``load_image``, so decoding and resizing are shared code.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from imgclf.data.images import BadImage, load_image
from imgclf.data.inputs import read_inputs
from imgclf.errors import ConfigError, RunDirError
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.serving.bundle import ExportFile, has_export, require, verified_onnx_bytes
from imgclf.serving.graph import InputSpec, engine_probs, input_spec, refuse_classical, tta_of

log = get_logger("predict")
ENGINES = ("onnx", "torch")
PROB_SLACK = 1e-3  # how far an exported graph's fp32 probabilities may stray from [0, 1] and from summing to 1


class Engine(Protocol):
    name: str
    spec: InputSpec
    tta: str

    def predict(self, images: np.ndarray) -> np.ndarray:
        """``N x K`` float64 probabilities of ``N x S x S x C`` uint8 images."""


class OnnxEngine:
    """The exported graph in onnxruntime; thread-safe, so requests run it concurrently."""

    name = "onnx"

    def __init__(self, run, verified: tuple[bytes, ExportFile] | None = None):
        """``verified``: ``verified_export(run)``'s answer when the caller has it already (read and hashed once)."""
        ort = require("onnxruntime", "export")
        data, self.info = verified or verified_export(run)
        self.run, self.spec, self.tta = run, input_spec(run), self.info.tta
        self.session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.version = ort.__version__
        self.redo = f"{run.path}/export/model.onnx {{}}; run 'imgclf export {run.path}' again"
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names[0] != ["images"] or "probabilities" not in names[1]:
            raise RunDirError(self.redo.format(f"takes {names[0][:3]} and answers {names[1][:3]}, not images -> "
                                               "probabilities as imgclf's graphs do"))

    def predict(self, images: np.ndarray) -> np.ndarray:
        probs = self.session.run(["probabilities"], {"images": np.ascontiguousarray(images)})[0].astype(np.float64)
        classes = len(self.run.classes)
        if probs.shape != (len(images), classes):  # a graph swapped in with export.json's hash rewritten to match
            raise RunDirError(self.redo.format(f"answered {probs.shape} for {len(images)} images of {classes} classes"))
        if not are_probabilities(probs):
            raise RunDirError(self.redo.format("answered values that are not probabilities (each in [0, 1], each "
                                               "image's summing to 1)"))
        return probs


def are_probabilities(probs: np.ndarray) -> bool:
    """Each value finite and in [0, 1], each row summing to 1 (within PROB_SLACK)."""
    in_range = probs.min(initial=0) >= -PROB_SLACK and probs.max(initial=1) <= 1 + PROB_SLACK
    return bool(np.isfinite(probs).all() and in_range and np.abs(probs.sum(axis=1) - 1).max(initial=0) <= PROB_SLACK)


def verified_export(run) -> tuple[bytes, ExportFile]:
    """The export's ONNX bytes and record, once they answer as the run does now: its weights, classes and
    threshold (``verified_onnx_bytes``), its input and its test-time views (config.yaml's, edited since?)."""
    data, info = verified_onnx_bytes(run)
    made_for = InputSpec(info.image_size, info.channels, info.resize_filter)
    redo = f"run 'imgclf export {run.path}' again"
    if made_for != input_spec(run):
        raise RunDirError(f"{run.path}/export was made for {made_for}, the run takes {input_spec(run)}; {redo}")
    if info.tta != tta_of(run):
        raise RunDirError(f"{run.path}/export computes test-time augmentation {info.tta!r} in its graph, the run "
                          f"now predicts with {tta_of(run)!r} (config.yaml's evaluate.tta); {redo}")
    return data, info


class TorchEngine:
    """The run's own model(s), as ``imgclf predict`` runs them; one request at a time (Grad-CAM shares the model)."""

    name = "torch"

    def __init__(self, run, lock: threading.Lock | None = None):
        self.run, self.spec, self.tta = run, input_spec(run), tta_of(run)
        self.lock = lock or threading.Lock()

    def predict(self, images: np.ndarray) -> np.ndarray:
        with self.lock:
            return engine_probs(self.run, images)


def choose_engine(run, kind: str = "auto") -> str:
    """``auto``: onnx when the run has an export, torch otherwise."""
    if kind not in (*ENGINES, "auto"):
        raise ConfigError(f"unknown engine {kind!r}; use onnx, torch or auto")
    if kind == "auto":
        return "onnx" if has_export(run) else "torch"
    if kind == "onnx" and not has_export(run):
        refuse_classical(run)  # `imgclf export` would refuse it: no advice to run it
        input_spec(run)
        raise ConfigError(f"{run.path} has no export for the onnx engine; run 'imgclf export {run.path}' first, "
                          "or use --engine torch")
    return kind


def open_engine(run, kind: str = "auto", lock: threading.Lock | None = None,
                verified: tuple[bytes, ExportFile] | None = None) -> Engine:
    return OnnxEngine(run, verified) if choose_engine(run, kind) == "onnx" else TorchEngine(run, lock)


def decode(paths: list[Path], spec: InputSpec) -> np.ndarray:
    """``load_image`` of each path, stacked: the one decode and resize rule, for every engine."""
    return np.stack([load_image(p, spec.size, spec.channels, spec.interpolation) for p in paths])


def readable(paths: list[Path], channels: int, skip_bad_images: bool) -> list[Path]:
    """Every file checked first (as ``runs.predict`` does), so a bad one is named before any work."""
    good = []
    for path in paths:
        try:
            load_image(path, 8, channels)
            good.append(path)
        except BadImage as err:
            if not skip_bad_images:
                raise
            log.warning("warning: skipped unreadable image %s: %s", err.path, err.reason)
    return good


def predict_with_onnx(run, inputs: list[str | Path], out: str | Path | None = None, skip_bad_images: bool = False,
                      batch_size: int | None = None, tta: str | None = None) -> Predictions:
    """``imgclf predict --engine onnx``: the same Predictions (and CSV) as ``run.predict``, through the export."""
    choose_engine(run, "onnx")  # a run never exported is told to export, not that export.json is missing
    engine = OnnxEngine(run)
    if tta is not None and tta != engine.tta:
        raise ConfigError(f"--tta {tta}: the export computes test-time augmentation {engine.tta!r} inside its graph; "
                          "use --engine torch for another")
    named = read_inputs(inputs)
    paths = readable(named.paths, engine.spec.channels, skip_bad_images)
    step = batch_size or run.batch_size
    probs = [engine.predict(decode(paths[i:i + step], engine.spec)) for i in range(0, len(paths), step)]
    labels, note = named.true_labels(paths, run.classes)  # as run.predict
    preds = Predictions([str(p) for p in paths], run.classes, labels,
                        np.concatenate(probs) if probs else np.zeros((0, len(run.classes))), label_note=note)
    preds = preds.at_threshold(run.threshold, run.positive)
    if out:
        preds.to_csv(Path(out))
    return preds
