"""imgclf export: the ONNX graph carries its preprocessing and class names, proves parity, and is refused when stale."""

import csv
import hashlib
import json
import os
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import imgclf
import imgclf.serving.engine as engine_module
from clitools import assert_clean_error
from clitools import imgclf as imgclf_cli
from imgclf.cli import main
from imgclf.data.images import load_image
from imgclf.errors import ConfigError, RunDirError
from imgclf.evaluation.evaluate import predict_probs
from imgclf.evaluation.predictions import Predictions
from imgclf.models.networks import Preprocess
from imgclf.models.objective import Objective
from imgclf.runs.base import check_and_seal, load_run
from imgclf.serving import bundle, parity
from imgclf.serving.engine import OnnxEngine, predict_with_onnx
from imgclf.serving.export import export_run, to_onnx
from imgclf.serving.graph import CPU_FP32, InputSpec, NetworkGraph, array_loader, engine_probs, input_spec
from imgclf.serving.service import Service
from imgclf.workflows.ensemble import create_ensemble

from conftest import tiny_config
from imagefactory import make_class_folders

ROOT = Path(__file__).resolve().parent.parent
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def gray_binary(tmp_path_factory):
    """A 1-channel binary run with a sigmoid head and a chosen threshold, exported once."""
    base = tmp_path_factory.mktemp("gray")
    data = make_class_folders(base / "data", per_class=14, classes=["normal", "pneumonia"])
    run = imgclf.train(tiny_config(data, base / "run", data={"channels": 1}, model={"binary_head": "sigmoid"},
                                   train={"epochs": 4, "precision": "fp32"}, evaluate={"threshold": "youden"}))
    export_run(run)
    return run


def _csv_probs(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [r["path"] for r in rows], [r["predicted_label"] for r in rows], \
        np.array([[float(v) for k, v in r.items() if k.startswith("prob_")] for r in rows])


def test_graph_takes_uint8_at_the_runs_size_and_channels_with_a_dynamic_batch(gray_binary):
    path = gray_binary.path / "export" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (images,) = session.get_inputs()
    assert (images.name, images.type) == ("images", "tensor(uint8)")
    assert images.shape[1:] == [16, 16, 1] and isinstance(images.shape[0], str)  # 1-channel stays 1-channel
    assert [o.name for o in session.get_outputs()] == ["logits", "probabilities"]
    for batch in (1, 3, 9):
        logits, probs = session.run(None, {"images": np.zeros((batch, 16, 16, 1), np.uint8)})
        assert logits.shape == (batch, 1) and probs.shape == (batch, 2)  # sigmoid: one logit, two probabilities
        np.testing.assert_allclose(probs.sum(1), 1, atol=1e-6)


def test_metadata_props_read_back_through_onnxruntime(gray_binary):
    session = ort.InferenceSession(str(gray_binary.path / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["classes"]) == ["normal", "pneumonia"]
    assert (props["image_size"], props["channels"], props["resize_filter"]) == ("16", "1", "bilinear")
    assert float(props["threshold"]) == gray_binary.threshold and props["positive_class"] == "pneumonia"
    assert props["objective"] == "sigmoid" and props["opset"] == "18"
    assert props["torch_version"] == torch.__version__ and props["imgclf_version"]
    weights = hashlib.sha256((gray_binary.path / "model.safetensors").read_bytes()).hexdigest()
    assert props["weights_sha256"] == weights
    assert "EXIF" in props["preprocessing"] and "BILINEAR" in props["preprocessing"]


def test_export_json_records_the_parity_figures(gray_binary):
    record = json.loads((gray_binary.path / "export" / "export.json").read_text())
    figures = record["parity"]
    assert figures["passed"] and figures["split"] == "val" and figures["random_images"] == 4
    assert figures["images"] == figures["run_images"] + 4 and 0 < figures["run_images"] <= 64
    assert figures["max_abs_diff_probability"] <= 1e-4 and figures["top1_agreement"] == 1.0
    assert figures["max_abs_diff_batch1_vs_batch8"] <= 1e-5
    onnx_bytes = (gray_binary.path / "export" / "model.onnx").read_bytes()
    assert record["onnx_sha256"] == hashlib.sha256(onnx_bytes).hexdigest() and record["opset"] == 18


def test_predict_engine_onnx_writes_the_torch_engines_csv(gray_binary, tmp_path, capsys):
    folder = gray_binary.index().root
    assert main(["predict", str(gray_binary.path), str(folder), "--out", str(tmp_path / "t.csv")]) == 0
    assert main(["predict", str(gray_binary.path), str(folder), "--out", str(tmp_path / "o.csv"),
                 "--engine", "onnx"]) == 0
    t_paths, t_labels, t_probs = _csv_probs(tmp_path / "t.csv")
    o_paths, o_labels, o_probs = _csv_probs(tmp_path / "o.csv")
    assert o_paths == t_paths and len(o_paths) == 28
    np.testing.assert_allclose(o_probs, t_probs, atol=1e-4)
    # labels are the run's threshold decisions; only a probability within 1e-4 of it could flip one
    near = np.abs(t_probs[:, 1] - gray_binary.threshold) < 1e-4
    assert [a for a, n in zip(o_labels, near, strict=True) if not n] == [b for b, n in zip(t_labels, near,
                                                                                          strict=True) if not n]
    assert main(["predict", str(gray_binary.path), str(folder), "--out", str(tmp_path / "x.csv"),
                 "--engine", "onnx", "--tta", "flip"]) == 2
    assert "computes test-time augmentation 'none'" in capsys.readouterr().err


def test_evaluation_predict_and_the_parity_gate_decode_alike(gray_binary):
    """One resize (load_image) behind the cached evaluation, predict and the export's parity images:
    the torch engine answers the same for a validation image whichever way it came in."""
    root = gray_binary.index().root
    evaluated = Predictions.from_csv(gray_binary.path / "predictions_val.csv")  # training's final evaluation
    predicted = gray_binary.predict([root / p for p in evaluated.paths])
    np.testing.assert_allclose(predicted.probs, evaluated.probs, rtol=0, atol=1e-6)
    images, source = parity.parity_images(gray_binary, input_spec(gray_binary))
    assert source["split"] == "val" and source["run_images"] == len(evaluated.paths)
    np.testing.assert_allclose(engine_probs(gray_binary, images[:len(evaluated.paths)]), evaluated.probs,
                               rtol=0, atol=1e-6)


def test_the_export_and_serve_extras_are_in_dev():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0].lower() for r in requirements}

    assert names(extras["export"]) == {"onnx", "onnxruntime", "onnxscript"}
    assert names(extras["serve"]) == {"fastapi", "uvicorn", "python-multipart"}
    assert names(extras["export"]) | names(extras["serve"]) <= names(extras["dev"])


def test_python_predict_with_onnx_writes_the_same_csv_as_run_predict(gray_binary, tmp_path):
    """With class sub-folders both add the true label; with a plain folder neither does."""
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        shutil.copy(gray_binary.index().abspath(i), flat / f"{i}{gray_binary.index().abspath(i).suffix}")
    for name, folder, labelled in (("sub", gray_binary.index().root, True), ("flat", flat, False)):
        torch_preds = gray_binary.predict([folder], out=tmp_path / f"{name}-t.csv")
        onnx_preds = predict_with_onnx(gray_binary, [folder], out=tmp_path / f"{name}-o.csv")
        assert onnx_preds.has_labels == torch_preds.has_labels == labelled
        np.testing.assert_array_equal(onnx_preds.true, torch_preds.true)
        t_rows, o_rows = (list(csv.DictReader((tmp_path / f"{name}-{e}.csv").read_text().splitlines())) for e in "to")
        assert list(o_rows[0]) == list(t_rows[0]) and ("true_label" in t_rows[0]) == labelled
        assert [(r["path"], r.get("true_label")) for r in o_rows] == [(r["path"], r.get("true_label")) for r in t_rows]
        np.testing.assert_allclose(onnx_preds.probs, torch_preds.probs, rtol=0, atol=1e-4)


def test_a_run_trained_in_auto_precision_predicts_in_fp32_as_its_graph_does(trained_run):
    """Trained with --precision auto (bf16 on a bf16 CPU), the run's own torch engine predicts in fp32."""
    record = export_run(trained_run)
    figures = record["parity"]
    assert figures["passed"] and figures["reference"] == "torch engine, fp32 on cpu"
    configured = figures["torch_engine_as_configured"]
    assert configured["compute"] == ["fp32 on cpu"]
    assert configured["max_abs_diff_probability"] <= 1e-4
    assert record["objective"] == "softmax" and record["classes"] == trained_run.classes


def test_tta_views_run_inside_the_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    model[0].weight.data[..., 0] *= 3  # not mirror-symmetric, so the views change the answer
    pre = Preprocess(16, 3, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    graph = NetworkGraph(model, pre, sigmoid=False, tta="flip_shift").eval()
    session = ort.InferenceSession(to_onnx(graph, InputSpec.of(pre), 18).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    expected = predict_probs(model, Objective(3), array_loader(images, pre, 2), CPU_FP32, "flip_shift")
    plain = predict_probs(model, Objective(3), array_loader(images, pre, 2), CPU_FP32, "none")
    got = session.run(["probabilities"], {"images": images})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert np.abs(expected - plain).max() > 1e-3


def test_a_parity_miss_fails_the_export_and_writes_nothing(trained_run, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy, ignore=shutil.ignore_patterns("export"))
    real = parity.reference_probs
    monkeypatch.setattr(parity, "reference_probs", lambda run, images: np.roll(real(run, images), 1, axis=1))
    with pytest.raises(ConfigError, match=r"disagrees with the torch engine \(max \|Δprobability\|.*top-1 agreement"):
        export_run(load_run(copy))
    assert not (copy / "export").exists() or not any((copy / "export").iterdir())


def test_a_stale_or_tampered_export_is_refused(gray_binary, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(gray_binary.path, copy)
    OnnxEngine(load_run(copy))  # as exported: accepted
    onnx_file = copy / "export" / "model.onnx"
    original = onnx_file.read_bytes()
    onnx_file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(RunDirError, match="does not match the sha256 recorded in export.json"):
        OnnxEngine(load_run(copy))
    onnx_file.write_bytes(original)
    state = load_file(str(copy / "model.safetensors"))  # "re-training": other weights, sealed on purpose
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}, str(copy / "model.safetensors"))
    check_and_seal(copy)
    with pytest.raises(RunDirError, match="exported from other weights"):
        OnnxEngine(load_run(copy))
    assert main(["predict", str(copy), str(gray_binary.index().abspath(0)), "--engine", "onnx",
                 "--out", str(tmp_path / "p.csv")]) == 2


def test_a_planted_onnx_file_is_refused_without_being_read_into_memory(gray_binary, tmp_path, monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(gray_binary.path, copy)
    onnx_file = copy / "export" / "model.onnx"
    onnx_file.unlink()
    with open(onnx_file, "wb") as fh:  # sparse: 1 GB on paper, nothing on disk
        fh.truncate(1 << 30)
    read = []
    monkeypatch.setattr(bundle, "read_capped", lambda *a, **k: read.append(a) or b"")
    with pytest.raises(RunDirError, match="does not match the sha256 recorded in export.json"):
        OnnxEngine(load_run(copy))
    assert not read  # hashed as a stream, refused before anything was held
    onnx_file.unlink()
    os.mkfifo(onnx_file)
    with pytest.raises(RunDirError, match="not a regular file"):
        OnnxEngine(load_run(copy))


def constant_graph(values, input_name="images"):
    """An ONNX graph answering ``values`` for every image (uint8 N x C x H x W in): a swapped-in model."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", [input_name], ["f"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["f"], ["m"], keepdims=0, axes=[1, 2, 3]),
             helper.make_node("Unsqueeze", ["m", "one"], ["col"]),
             helper.make_node("Mul", ["col", "zero"], ["z"]),
             helper.make_node("Add", ["z", "row"], ["probabilities"])]
    inits = [helper.make_tensor("one", TensorProto.INT64, [1], [1]),
             helper.make_tensor("zero", TensorProto.FLOAT, [], [0]),
             helper.make_tensor("row", TensorProto.FLOAT, [len(values)], values)]
    graph = helper.make_graph(nodes, "swapped", [helper.make_tensor_value_info(input_name, TensorProto.UINT8,
                                                                               ["n", 1, 16, 16])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["n", len(values)])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@pytest.mark.parametrize("values,input_name,said", [
    ([0.2] * 5, "images", "answered (2, 5) for 2 images of 2 classes"),
    ([float("nan")] * 2, "images", "not probabilities"),
    ([0.9, 0.9], "images", "not probabilities"),
    ([0.5, 0.5], "pixels", "takes ['pixels']"),
])
def test_a_graph_swapped_in_with_its_hash_rewritten_is_refused_by_its_answers(gray_binary, tmp_path, values,
                                                                               input_name, said):
    """export.json is not sealed: whoever swaps model.onnx can write its hash there too. Its predictions were
    used as they came (5 columns under 2 class names, NaN)."""
    copy = tmp_path / "run"
    shutil.copytree(gray_binary.path, copy)
    graph = constant_graph(values, input_name)
    (copy / "export" / "model.onnx").write_bytes(graph)
    record = json.loads((copy / "export" / "export.json").read_text())
    record["onnx_sha256"] = hashlib.sha256(graph).hexdigest()
    (copy / "export" / "export.json").write_text(json.dumps(record))
    images = np.zeros((2, 1, 16, 16), dtype=np.uint8)
    with pytest.raises(RunDirError) as err:
        OnnxEngine(load_run(copy)).predict(images)
    assert said in str(err.value) and "imgclf export" in str(err.value), str(err.value)


def test_a_rechosen_threshold_makes_the_export_stale(gray_binary, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(gray_binary.path, copy)
    load_run(copy).choose_threshold("argmax")
    with pytest.raises(RunDirError, match="carries threshold"):
        OnnxEngine(load_run(copy))


def test_test_time_views_edited_into_the_config_make_the_export_stale(gray_binary, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(gray_binary.path, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    assert config["evaluate"]["tta"] == "none"
    config["evaluate"]["tta"] = "flip"
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    check_and_seal(copy)
    with pytest.raises(RunDirError, match="export computes test-time augmentation 'none' in its graph, the run now "
                                          "predicts with 'flip'"):
        OnnxEngine(load_run(copy))
    image = str(gray_binary.index().abspath(0))
    assert main(["predict", str(copy), image, "--engine", "onnx", "--out", str(tmp_path / "p.csv")]) == 2
    assert "imgclf export" in capsys.readouterr().err
    assert_clean_error(imgclf_cli("serve", copy, "--engine", "onnx", "--port", "0", timeout=120),
                       "test-time augmentation")  # refused before it listens: a server would not return


def test_an_export_record_edited_to_another_input_is_refused_and_serve_reads_the_export_once(gray_binary, tmp_path,
                                                                                              monkeypatch):
    copy = tmp_path / "run"
    shutil.copytree(gray_binary.path, copy)
    reads = []
    real = engine_module.verified_onnx_bytes
    monkeypatch.setattr(engine_module, "verified_onnx_bytes", lambda run: reads.append(run) or real(run))
    service = Service(load_run(copy), "onnx")
    service.load()
    assert service.load_error is None and service.engine.name == "onnx" and len(reads) == 1
    record = json.loads((copy / "export" / "export.json").read_text())
    record["image_size"] += 8
    (copy / "export" / "export.json").write_text(json.dumps(record))
    check_and_seal(copy)
    with pytest.raises(RunDirError, match=r"export was made for .* the run takes .*; run 'imgclf export"):
        OnnxEngine(load_run(copy))


@pytest.mark.slow
def test_soft_and_weighted_ensembles_export_to_one_graph(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=8)
    members = [imgclf.train(tiny_config(data, tmp_path / name, train={"epochs": 1, "seed": seed, "precision": "fp32"},
                                        model={"conv_filters": filters}))
               for name, seed, filters in (("a", 0, [8, 16]), ("b", 3, [4, 8]))]
    for method in ("soft", "weighted"):
        ensemble = create_ensemble([m.path for m in members], tmp_path / method, method)
        record = export_run(ensemble)
        assert record["objective"] == "ensemble" and record["parity"]["passed"]
        model = onnx.load(str(tmp_path / method / "export" / "model.onnx"))
        assert [i.name for i in model.graph.input] == ["images"]  # one graph, one input
        images = sorted(data.rglob("img 00[0-3].*"))
        torch_preds = ensemble.predict(images)
        onnx_preds = predict_with_onnx(ensemble, images)
        np.testing.assert_allclose(onnx_preds.probs, torch_preds.probs, atol=1e-5)


@pytest.mark.slow
def test_what_cannot_be_exported_says_why(tmp_path, pool_dataset):
    svm = imgclf.train(tiny_config(pool_dataset, tmp_path / "svm", model={"head": "svm"}, train={"epochs": 1}))
    assert_clean_error(imgclf_cli("export", svm.path, timeout=120), "is not exportable yet: its head is a "
                       "scikit-learn svm")
    with pytest.raises(ConfigError, match="--opset 7 is outside"):
        export_run(svm, opset=7)
    image = str(svm.index().abspath(0))  # predict --engine onnx: not "run imgclf export", which refuses it
    assert_clean_error(imgclf_cli("predict", svm.path, image, "--engine", "onnx", "--out", tmp_path / "p.csv",
                                  timeout=120), "is not exportable yet: its head is a scikit-learn svm",
                       "predict or serve it with --engine torch")


def test_export_cli_prints_the_parity_figures(gray_binary, capsys):
    assert main(["export", str(gray_binary.path), "--opset", "18"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement 100%" in out and "model.onnx (opset 18)" in out
    array = load_image(gray_binary.index().abspath(0), 16, 1)
    assert OnnxEngine(load_run(gray_binary.path)).predict(array[None]).shape == (1, 2)


def test_a_data_folder_given_for_the_parity_gate_must_hold_the_runs_images(gray_binary, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(gray_binary.path, copy)
    shutil.rmtree(copy / "export")
    assert main(["export", str(copy), "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    other = make_class_folders(tmp_path / "other", per_class=3, classes=["cats", "dogs"])  # not the run's images
    assert main(["export", str(copy), "--data", str(other)]) == 2
    assert "none of the" in capsys.readouterr().err and not (copy / "export" / "model.onnx").exists()
    assert main(["export", str(copy), "--data", str(gray_binary.index().root)]) == 0  # where they are: exported


def test_an_opset_the_exporter_cannot_reach_is_one_line_not_a_traceback(monkeypatch):
    """onnx 1.x names opsets up to 28, torch 2.14's converter fails past 25 (an onnx_ir SerdeError's traceback)."""
    def failing(*args, **kwargs):
        raise RuntimeError("Error calling _deserialize_graph with: main_graph\nOutput 'mean' is redeclared")

    monkeypatch.setattr(torch.onnx, "export", failing)
    with pytest.raises(ConfigError, match=r"ONNX exporter cannot write this model at --opset 27 \(RuntimeError: "
                                          r"Error calling _deserialize_graph with: main_graph\); use --opset 18"):
        to_onnx(nn.Linear(2, 2), InputSpec(8, 3, "bilinear"), 27)
