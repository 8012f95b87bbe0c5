"""``imgclf export RUN``: the run as ``RUN/export/model.onnx``, preprocessing and class names inside, parity proven.

Steps: build the run's graph (``graph.py``), export it with torch's ONNX exporter at an explicit
opset, traced with a batch of 2 so the batch dimension stays dynamic; write the metadata a user of
another language needs into ``metadata_props``; ``onnx.checker`` with ``full_check``; load it in
onnxruntime and pass the parity gate (``parity.py``). Only then is ``model.onnx`` moved into place and
``export.json`` written beside it; a miss writes nothing.
"""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

from imgclf import atomic
from imgclf.config.defaults import DEFAULT_OPSET
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.runs.ensemble import EnsembleRun
from imgclf.runs.manifest import file_sha256
from imgclf.serving.bundle import EXPORT_DIR, EXPORT_FILE, FORMAT, ONNX_FILE, export_dir, require, weights_sha256
from imgclf.serving.graph import InputSpec, build_graph, input_spec, tta_of
from imgclf.serving.parity import parity_gate, parity_images
from imgclf.versions import version

log = get_logger("export")
MIN_OPSET = 18
TRACE_BATCH = 2  # a batch of 1 would let the exporter specialise the batch dimension to 1
PREPROCESSING = ("Input 'images': uint8, N x {size} x {size} x {channels} (batch, height, width, channels). Decode "
                 "the file (a JPEG, unless the filter is NEAREST, in Pillow's draft mode: libjpeg's DCT scaling by "
                 "the largest of 1/2, 1/4, 1/8 that keeps it at least {size} x {size}), apply its EXIF orientation, "
                 "convert to {mode} (alpha composited onto black, 16-bit divided by 257, palette expanded), resize "
                 "to {size} x {size} with Pillow's {filter} filter (reducing_gap=2.0), keep uint8. Scaling, "
                 "normalisation, the network and its softmax or sigmoid run inside the graph.")


def export_run(run, opset: int = DEFAULT_OPSET, data_root: str | Path | None = None) -> dict:
    """Export ``run`` (a network run or an ensemble of them); returns what export.json records."""
    onnx = require("onnx", "export")
    ort = require("onnxruntime", "export")
    require("onnxscript", "export")
    check_opset(opset, onnx)
    spec, graph = input_spec(run), build_graph(run)
    model = to_onnx(graph, spec, opset)
    props = model_metadata(run, spec, opset)
    onnx.helper.set_model_props(model, props)
    model.producer_name, model.doc_string = "imgclf", props["preprocessing"]
    images, source = parity_images(run, spec, data_root)
    target = atomic.inner_folder(run.path, EXPORT_DIR) / ONNX_FILE
    with atomic.atomic_path(target) as tmp:
        onnx.save_model(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        session = load_session(ort, tmp, opset)
        parity = {**source, **parity_gate(run, session, images)}
        onnx_sha256 = file_sha256(tmp)
    record = {"format": FORMAT, "onnx_sha256": onnx_sha256, "weights_sha256": props["weights_sha256"],
              "opset": opset, "classes": run.classes, "image_size": spec.size, "channels": spec.channels,
              "resize_filter": spec.interpolation, "tta": props["tta"], "objective": props["objective"],
              "threshold": run.threshold, "positive_class": props.get("positive_class"),
              "versions": json.loads(props["versions"]), "created": datetime.now(UTC).isoformat(timespec="seconds"),
              "parity": parity}
    atomic.write_json(export_dir(run) / EXPORT_FILE, record)
    return record


def check_opset(opset: int, onnx) -> None:
    newest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= newest:
        raise ConfigError(f"--opset {opset} is outside what torch's exporter and onnx {onnx.__version__} write; "
                          f"use {MIN_OPSET} to {newest} (default {DEFAULT_OPSET})")


def to_onnx(graph: torch.nn.Module, spec: InputSpec, opset: int):
    """The graph as an ONNX ModelProto: input ``images`` (dynamic batch), outputs ``logits`` and ``probabilities``."""
    example = torch.zeros(TRACE_BATCH, spec.size, spec.size, spec.channels, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's own deprecation chatter is not the user's concern
        try:
            program = torch.onnx.export(graph, (example,), None, input_names=["images"],
                                        output_names=["logits", "probabilities"], opset_version=opset, dynamo=True,
                                        dynamic_shapes=({0: batch},), verbose=False, optimize=True)
        except Exception as err:  # e.g. opsets 26-28, which onnx names but torch 2.14's converter cannot reach
            first = (str(err).splitlines() or [type(err).__name__])[0][:200]
            raise ConfigError(f"torch {torch.__version__}'s ONNX exporter cannot write this model at --opset {opset} "
                              f"({type(err).__name__}: {first}); use --opset {DEFAULT_OPSET}") from None
    return program.model_proto


def load_session(ort, path: Path, opset: int):
    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own untyped errors for an opset it cannot run
        first = (str(err).splitlines() or [type(err).__name__])[0][:200]
        raise ConfigError(f"onnxruntime {ort.__version__} cannot load the graph at --opset {opset} ({first}); "
                          f"use --opset {DEFAULT_OPSET}") from None


def model_metadata(run, spec: InputSpec, opset: int) -> dict[str, str]:
    """``metadata_props``: everything another program needs to feed the graph and read its answer."""
    binary = len(run.classes) == 2
    props = {
        "classes": json.dumps(run.classes, ensure_ascii=False),
        "image_size": str(spec.size), "channels": str(spec.channels), "resize_filter": spec.interpolation,
        "input": f"images: uint8 [batch, {spec.size}, {spec.size}, {spec.channels}] (NHWC)",
        "outputs": "logits: as trained (ensembles: log of the combined probabilities); probabilities: [batch, "
                   f"{len(run.classes)}] in class order",
        "objective": objective_name(run), "tta": tta_of(run), "opset": str(opset),
        "weights_sha256": weights_sha256(run),
        "versions": json.dumps({"imgclf": version(), "torch": torch.__version__,
                                "onnx": _installed("onnx"), "onnxruntime": _installed("onnxruntime")}),
        "preprocessing": PREPROCESSING.format(size=spec.size, channels=spec.channels,
                                              mode="grayscale (ITU-R 601 luma)" if spec.channels == 1 else "RGB",
                                              filter=spec.interpolation.upper()),
    }
    props["imgclf_version"], props["torch_version"] = version(), torch.__version__
    if binary:
        props["positive_class"] = run.classes[run.positive]
    if run.threshold is not None:
        props["threshold"] = repr(float(run.threshold))
    return props


def objective_name(run) -> str:
    if isinstance(run, EnsembleRun):
        return "ensemble"
    return "sigmoid" if run.objective.sigmoid else "softmax"


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
