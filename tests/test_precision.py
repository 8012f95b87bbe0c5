"""Compute settings: precision choice, memory format, and accuracy parity of bf16 with fp32."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

import imgclf
from imgclf.cli import main
from imgclf.errors import ConfigError
from imgclf.runs.base import load_run
from imgclf.runtime import Compute, cpu_supports_bf16, resolve_precision
from imgclf.serving.engine import predict_with_onnx
from imgclf.serving.export import export_run
from imgclf.workflows.demo import demo_config, write_digits

from conftest import tiny_config
from imagefactory import make_class_folders


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)


def test_channels_last_batches_and_models():
    compute = Compute.resolve("cpu", "fp32", None)
    assert compute.channels_last
    model = compute.prepare(torch.nn.Conv2d(3, 4, 3))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    assert compute.batch(torch.randn(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    assert compute.batch(torch.randn(2, 5)).shape == (2, 5)  # cached features stay as they are
    plain = Compute.resolve("cpu", "fp32", False).batch(torch.randn(2, 3, 8, 8))
    assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_bf16_and_fp32_reach_the_same_demo_accuracy(tmp_path):
    """Stated tolerance: test accuracies within 0.03 of each other on the digits demo."""
    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    write_digits(tmp_path / "digits")
    accuracy = {}
    for precision in ("fp32", "bf16"):
        config = demo_config(tmp_path, epochs=8, overrides={"train": {"precision": precision},
                                                            "evaluate": {"report": False, "baseline": False}})
        config = config.model_copy(update={"out": str(tmp_path / precision)})
        accuracy[precision] = imgclf.train(config).metrics["test"]["accuracy"]
    assert accuracy["fp32"] >= 0.9 and abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.03, accuracy


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """A run trained in bf16 autocast (what --precision auto picks on this CPU), sealed and finished."""
    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    base = tmp_path_factory.mktemp("bf16")
    data = make_class_folders(base / "data", per_class=14)
    return imgclf.train(tiny_config(data, base / "run", train={"epochs": 4, "precision": "bf16"}))


def test_a_bf16_run_still_predicts_in_fp32_on_its_device(bf16_run):
    assert bf16_run.config.train.precision == "bf16"
    assert bf16_run.compute == Compute(torch.device("cpu"), "fp32", True)  # channels_last kept


def test_a_bf16_run_answers_the_same_through_torch_and_onnx(bf16_run, tmp_path):
    pytest.importorskip("onnxruntime")
    export_run(bf16_run)
    folder = bf16_run.index().root
    for engine in ("torch", "onnx"):
        assert main(["predict", str(bf16_run.path), str(folder), "--out", str(tmp_path / f"{engine}.csv"),
                     "--engine", engine]) == 0
    torch_rows, onnx_rows = (_rows(tmp_path / f"{engine}.csv") for engine in ("torch", "onnx"))
    assert [r["path"] for r in onnx_rows] == [r["path"] for r in torch_rows] and len(torch_rows) == 42
    assert [r["true_label"] for r in onnx_rows] == [r["true_label"] for r in torch_rows]
    np.testing.assert_allclose(_probs(onnx_rows), _probs(torch_rows), rtol=0, atol=1e-4)
    saved = _rows(bf16_run.path / "predictions_val.csv")  # written by training's final evaluation
    graph = predict_with_onnx(bf16_run, [bf16_run.index().root / r["path"] for r in saved])
    np.testing.assert_allclose(graph.probs, _probs(saved), rtol=0, atol=1e-4)


def test_metrics_json_equals_a_later_evaluate(bf16_run, tmp_path):
    saved = json.loads((bf16_run.path / "metrics.json").read_text())
    copy = tmp_path / "run"
    shutil.copytree(bf16_run.path, copy)
    for split in ("val", "test"):
        assert main(["evaluate", str(copy), "--split", split]) == 0
        assert load_run(copy).metrics[split] == saved[split], split


def _rows(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _probs(rows: list[dict]) -> np.ndarray:
    return np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])
