"""What the server does with a run, apart from HTTP: load and warm the engine, answer uploads, explain.

The cheap checks (the run, the export's hashes, the engine's library) run when a Service is made,
so ``imgclf serve`` fails in one line before it binds a port; loading and warming the model run
in ``load``, which the server starts in a thread once it listens (``/readyz`` is 503 until then).
"""

from __future__ import annotations

import base64
import io
import tempfile
import threading
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imgclf.config.defaults import DEFAULT_MAX_PIXELS
from imgclf.errors import ConfigError
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.reporting.explain import Explainer
from imgclf.reporting.plots import overlay
from imgclf.serving.bundle import read_export, require
from imgclf.serving.engine import Engine, choose_engine, open_engine, verified_export
from imgclf.serving.graph import input_spec
from imgclf.serving.uploads import UploadError, decode_upload
from imgclf.versions import version

log = get_logger("serve")
HEADLINE = ("n", "accuracy", "balanced_accuracy", "f1_macro", "roc_auc_ovr", "sensitivity", "specificity", "ece")
DECODE_SLOTS = 2  # uploads decoded at once, across all requests: the server's memory is bounded by them
OVERLAY_MIN_SIDE = 192  # small model inputs are enlarged (nearest) so the overlay is visible on the page


class Service:
    """A run behind the server: ``load()`` once, then ``answer()`` from any number of threads."""

    def __init__(self, run, engine: str = "auto", max_pixels: int = DEFAULT_MAX_PIXELS):
        self.run, self.max_pixels = run, max_pixels
        self.kind = choose_engine(run, engine)
        self.spec = input_spec(run)
        self.verified = None  # the export's checked bytes, from here to load(): read and hashed once
        if self.kind == "onnx":
            require("onnxruntime", "export")
            self.verified = verified_export(run)  # refused before the server starts
        self.lock = threading.Lock()  # the torch model: one user at a time (Grad-CAM hooks into it)
        self.decoding = threading.BoundedSemaphore(DECODE_SLOTS)
        self.ready = threading.Event()
        self.engine: Engine | None = None
        self.explainer: Explainer | None = None
        self.explain_refusal: str | None = None
        self.load_error: Exception | None = None
        self.on_failure: Callable[[], None] = lambda: None

    def load(self) -> None:
        """Open the engine, answer one blank image (warm-up), prepare Grad-CAM; never raises (see load_error)."""
        try:
            engine = open_engine(self.run, self.kind, self.lock, self.verified)
            self.verified = None
            engine.predict(np.zeros((1, self.spec.size, self.spec.size, self.spec.channels), dtype=np.uint8))
            with self.lock:
                self._prepare_explainer()
            self.engine = engine
            self.ready.set()
            log.info("model loaded and warmed up (%s engine); ready", engine.name)
        except Exception as err:  # reported by /readyz and, from the CLI, as its error line
            self.load_error = err
            log.error("loading the model failed: %s", err)
            self.on_failure()

    def _prepare_explainer(self) -> None:
        try:
            self.explainer = Explainer(self.run)
        except ConfigError as err:  # an ensemble, a scikit-learn head, a model without spatial maps
            self.explain_refusal = str(err)

    def info(self) -> dict:
        """``GET /v1/model``: what the model takes and answers, and how well it did on validation."""
        run, engine = self.run, self.engine
        val = run.metrics.get("val", {}) if isinstance(run.metrics, dict) else {}
        versions = {"imgclf": version(), "torch": torch.__version__}
        if engine is not None and engine.name == "onnx":
            versions["onnxruntime"] = metadata.version("onnxruntime")
        about = {"run": Path(run.path).name, "model": run.describe(), "classes": run.classes,
                 "image_size": self.spec.size, "channels": self.spec.channels, "resize_filter": self.spec.interpolation,
                 "engine": engine.name if engine else self.kind, "tta": engine.tta if engine else None,
                 "threshold": run.threshold, "validation": {k: val[k] for k in HEADLINE if k in val},
                 "explain": self.explain_refusal is None, "versions": versions}
        if len(run.classes) == 2:
            about["positive_class"] = run.classes[run.positive]
        if about["engine"] == "onnx":
            export = read_export(run)
            about["export"] = {"opset": export.opset, "created": export.created,
                               "parity_max_abs_diff": export.parity.get("max_abs_diff_probability")}
        return about

    def answer(self, uploads: list[tuple[str, bytes]], top_k: int, explain: bool) -> dict:
        """``POST /v1/predict``: per file the label, the top-k probabilities, the binary decision, Grad-CAM."""
        if self.engine is None:
            raise UploadError(503, "the model is still loading; retry when /readyz answers 200")
        if explain and self.explain_refusal:
            raise UploadError(422, f"explain=true is not available for this run: {self.explain_refusal}")
        names = [name for name, _ in uploads]
        with tempfile.TemporaryDirectory(prefix="imgclf-upload-") as tmp:
            decoded = [self._decode(data, name, Path(tmp)) for name, data in uploads]
            probs = self.engine.predict(np.stack([array for array, _ in decoded]))
            preds = Predictions(names, self.run.classes, np.full(len(names), -1), probs)
            preds = preds.at_threshold(self.run.threshold, self.run.positive)
            overlays = self._overlays([path for _, path in decoded], preds.pred) if explain else [None] * len(names)
        results = [self._result(names[i], probs[i], int(preds.pred[i]), top_k, overlays[i]) for i in range(len(names))]
        return {"engine": self.engine.name, "results": results}

    def _decode(self, data: bytes, name: str, folder: Path):
        """One upload decoded while at most DECODE_SLOTS others are: each may take up to --max-pixels of memory
        (several times that while its mode converts), and requests arrive on many threads at once."""
        with self.decoding:
            return decode_upload(data, name, self.spec, folder, self.max_pixels)

    def _result(self, name: str, probs: np.ndarray, decided: int, top_k: int, gradcam: str | None) -> dict:
        classes = self.run.classes
        order = np.argsort(-probs, kind="stable")[:top_k]
        result = {"file": name, "label": classes[decided],
                  "top_k": [{"class": classes[j], "probability": float(probs[j])} for j in order]}
        if len(classes) == 2:
            positive = self.run.positive
            result["decision"] = {"positive_class": classes[positive], "probability": float(probs[positive]),
                                  "threshold": self.run.threshold,
                                  "rule": "argmax" if self.run.threshold is None else "threshold",
                                  "positive": decided == positive}
        if gradcam is not None:
            result["gradcam"] = gradcam
        return result

    def _overlays(self, paths: list[Path], decided: np.ndarray) -> list[str]:
        """Grad-CAM of the decided class for each image, as PNG data URIs."""
        with self.lock:
            explained = self.explainer.explain(paths, targets=[int(d) for d in decided])
        return [png_data_uri(overlay(e.image, e.heatmap)) for e in explained]


def png_data_uri(rgb: np.ndarray) -> str:
    image = Image.fromarray(rgb)
    factor = -(-OVERLAY_MIN_SIDE // max(image.size))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
