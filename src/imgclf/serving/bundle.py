"""``RUN/export/``: the ONNX file, and ``export.json`` saying what it was made from and how well it agreed.

The export is an output of the run, not part of its seal, and like every run file it is untrusted:
``export.json`` is size-capped and schema-checked, ``model.onnx`` must have the sha256 that
``export.json`` records, and the weights it was made from (``weights_sha256``) must still be the
run's, so an export left over from before a re-training is refused instead of served.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from imgclf.errors import ConfigError, RunDirError
from imgclf.runs import files as runfiles
from imgclf.runs.ensemble import ENSEMBLE_FILE, EnsembleRun
from imgclf.runs.heads import HEAD_FILE
from imgclf.runs.manifest import file_sha256
from imgclf.runs.network import MODEL_FILE
from imgclf.safeio import read_capped, require_regular

EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
EXPORT_FILE = "export.json"
FORMAT = 1
MAX_ONNX_BYTES = 2 << 30  # protobuf's own limit; a bigger file is not one imgclf wrote
SHA256 = r"^[0-9a-f]{64}$"


class ExportFile(BaseModel):
    """export.json: the ONNX file's hash and inputs, the source weights' hash, and the parity figures."""

    model_config = ConfigDict(extra="forbid")
    format: Literal[1]
    onnx_sha256: str = Field(pattern=SHA256)
    weights_sha256: str = Field(pattern=SHA256)
    opset: StrictInt = Field(ge=1, le=1000)
    classes: list[runfiles.ClassName] = Field(min_length=2, max_length=runfiles.MAX_CLASSES)
    image_size: StrictInt = Field(ge=1, le=4096)
    channels: Literal[1, 3]
    resize_filter: Literal["bilinear", "bicubic", "nearest"]
    tta: str
    objective: Literal["softmax", "sigmoid", "ensemble"]
    threshold: StrictFloat | None = Field(None, ge=0, le=1)
    positive_class: str | None = None
    versions: dict[str, str]
    created: str
    parity: dict[str, Any]


def require(module: str, extra: str) -> ModuleType:
    """An optional dependency, or a one-line ConfigError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{module} is not installed; it comes with imgclf's [{extra}] extra: "
                          f"pip install 'imgclf[{extra}]'") from None


def export_dir(run) -> Path:
    return Path(run.path) / EXPORT_DIR


def has_export(run) -> bool:
    return (export_dir(run) / EXPORT_FILE).is_file()


def weights_sha256(run) -> str:
    """The sha256 of what decides the run's answers: its weights, or an ensemble's spec and members'."""
    if isinstance(run, EnsembleRun):
        parts = [file_sha256(run.path / ENSEMBLE_FILE), *(weights_sha256(m) for m in run.members)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    digest = file_sha256(run.path / MODEL_FILE)
    if (run.path / HEAD_FILE).is_file():
        digest = hashlib.sha256(f"{digest}:{file_sha256(run.path / HEAD_FILE)}".encode()).hexdigest()
    return digest


def read_export(run) -> ExportFile:
    path = export_dir(run) / EXPORT_FILE
    return runfiles.validate(path, ExportFile, runfiles.read_json(path))


def verified_onnx_bytes(run) -> tuple[bytes, ExportFile]:
    """``model.onnx``'s bytes once they match export.json and the run as it is now; else a RunDirError."""
    info = read_export(run)
    folder = export_dir(run)
    path, redo = folder / ONNX_FILE, f"run 'imgclf export {run.path}' again"
    mismatch = f"{path} does not match the sha256 recorded in {EXPORT_FILE} (changed or replaced); {redo}"
    try:  # hashed as a stream first: a file that is not the export is refused without being held in memory
        require_regular(path, RunDirError, redo)  # never a FIFO's endless wait
        if file_sha256(path) != info.onnx_sha256:
            raise RunDirError(mismatch)
        data = read_capped(path, MAX_ONNX_BYTES, RunDirError, redo, why="larger than any ONNX file imgclf writes")
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing but {folder / EXPORT_FILE} lists it; {redo}") from None
    if hashlib.sha256(data).hexdigest() != info.onnx_sha256:  # loaded from these bytes: no swap between check and use
        raise RunDirError(mismatch)
    if info.weights_sha256 != weights_sha256(run):
        raise RunDirError(f"{path} was exported from other weights than the run has now (re-trained or "
                          f"re-ensembled since); {redo}")
    if info.classes != run.classes:
        raise RunDirError(f"{folder / EXPORT_FILE} lists classes {info.classes}, the run {run.classes}; {redo}")
    if info.threshold != run.threshold:
        raise RunDirError(f"{path} carries threshold {info.threshold}, the run now {run.threshold} (re-chosen since "
                          f"the export); {redo}")
    return data, info
