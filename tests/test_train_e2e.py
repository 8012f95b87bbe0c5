"""End-to-end through the Python API: a real (tiny) training run and what it writes."""

import csv
import json

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

import imgclf
from imgclf.errors import ConfigError, DataError
from imgclf.evaluation.metrics import compute_metrics
from imgclf.evaluation.predictions import Predictions

from conftest import tiny_config
from imagefactory import make_class_folders

RUN_FILES = ["config.yaml", "classes.json", "dataset.json", "split.csv", "model.safetensors", "model.json",
             "history.csv", "predictions_val.csv", "predictions_test.csv", "metrics.json", "summary.md",
             "plots/curves.png", "plots/confusion_test.png", "plots/roc_test.png"]


def test_a_run_directory_holds_everything(trained_run):
    for name in RUN_FILES:
        assert (trained_run.path / name).is_file(), name
    config = yaml.safe_load((trained_run.path / "config.yaml").read_text())
    assert config["train"]["seed"] == 42 and config["versions"]["torch"]
    assert json.loads((trained_run.path / "classes.json").read_text()) == ["left bar", "right bar", "top bar"]
    assert trained_run.metrics["test"]["accuracy"] >= 0.8  # the synthetic classes are learnable
    with open(trained_run.path / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1_macro"} <= set(rows[0])


def test_metrics_json_equals_metrics_recomputed_from_the_predictions_csv(trained_run):
    saved = json.loads((trained_run.path / "metrics.json").read_text())
    for split in ("val", "test"):
        recomputed = json.loads(json.dumps(compute_metrics(Predictions.from_csv(
            trained_run.path / f"predictions_{split}.csv"))))
        assert set(saved[split]) - set(recomputed) == {"threshold", "intervals"}  # added by evaluation
        assert {k: saved[split][k] for k in recomputed} == recomputed


def test_a_shuffling_loader_cannot_misalign_predictions(trained_run):
    ordered = trained_run.evaluate("test")
    a = Predictions.from_csv(trained_run.path / "predictions_test.csv")
    shuffled = trained_run.evaluate("test", shuffle=True)
    b = Predictions.from_csv(trained_run.path / "predictions_test.csv")
    # Row i is image i either way; only float rounding differs between batch compositions.
    assert a.paths == b.paths and np.array_equal(a.true, b.true) and np.array_equal(a.pred, b.pred)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    assert shuffled["accuracy"] == ordered["accuracy"] == trained_run.metrics["test"]["accuracy"]
    assert shuffled["log_loss"] == pytest.approx(ordered["log_loss"], abs=1e-6)


def test_the_best_checkpoint_is_the_model_that_was_kept(trained_run):
    history = list(csv.DictReader(open(trained_run.path / "history.csv")))
    best = min(history, key=lambda r: float(r["val_loss"]))
    assert json.loads((trained_run.path / "model.json").read_text())["epoch"] == int(best["epoch"])
    assert trained_run.metrics["val"]["log_loss"] == pytest.approx(float(best["val_loss"]), rel=1e-9)


def test_same_seed_same_results(tmp_path, pool_dataset):
    cfg = dict(augment={"preset": "medium"}, train={"epochs": 3, "patience": 3})
    a = imgclf.train(tiny_config(pool_dataset, tmp_path / "a", **cfg))
    b = imgclf.train(tiny_config(pool_dataset, tmp_path / "b", **cfg))
    wa, wb = load_file(a.path / "model.safetensors"), load_file(b.path / "model.safetensors")
    assert all(np.array_equal(wa[k].numpy(), wb[k].numpy()) for k in wa)
    assert a.metrics == b.metrics


def test_early_stopping_stops_and_restores(tmp_path, pool_dataset):
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", train={"epochs": 30, "patience": 1, "lr": 0.5,
                                                                        "optimizer": "sgd", "schedule": "none"}))
    history = list(csv.DictReader(open(run.path / "history.csv")))
    assert len(history) < 30
    losses = [float(r["val_loss"]) for r in history]
    assert losses[-1] >= min(losses)  # stopped after a non-improving epoch


@pytest.mark.parametrize("train", [
    {"class_weight": "balanced", "optimizer": "sgd", "nesterov": True, "schedule": "step"},
    {"sampler": "weighted", "optimizer": "rmsprop", "lr": 0.001, "schedule": "plateau", "label_smoothing": 0.1},
    {"optimizer": "adam", "monitor": "val_f1_macro"},
    {"optimizer": "adadelta", "lr": 1.0},
    {"optimizer": "adagrad"},
])
def test_training_options_run(tmp_path, pool_dataset, train):
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", train={"epochs": 2, "patience": 2, **train}))
    assert run.metrics["test"]["n"] == 9


def test_binary_sigmoid_head_with_class_weights(tmp_path):
    data = make_class_folders(tmp_path / "d", 12, classes=["normal", "pneumonia"])
    run = imgclf.train(tiny_config(data, tmp_path / "r", model={"binary_head": "sigmoid"},
                                   data={"positive_class": "pneumonia", "channels": 1},
                                   train={"class_weight": "balanced"}))
    test = run.metrics["test"]
    assert test["positive_class"] == "pneumonia" and {"sensitivity", "specificity", "ppv", "npv"} <= set(test)
    assert run.meta.output_units == 1


def test_predict_works_from_the_run_directory_alone(trained_run, tmp_path):
    new = make_class_folders(tmp_path / "new", 2, seed=9)
    run = imgclf.load_run(trained_run.path)
    preds = run.predict([new / "left bar", str(new / "right bar" / "*"), next((new / "top bar").iterdir())],
                        out=tmp_path / "p.csv")
    assert len(preds.paths) == 5
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert set(rows[0]) == {"path", "predicted_label", "confidence", "prob_left bar", "prob_right bar",
                            "prob_top bar"}
    assert sum(r["predicted_label"] == "left bar" for r in rows[:2]) == 2


def test_unreadable_image_fails_naming_it_unless_skipped(tmp_path, pool_dataset):
    (pool_dataset / "left bar" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(DataError, match="broken.jpg.*--skip-bad-images"):
        imgclf.train(tiny_config(pool_dataset, tmp_path / "r"))
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r2", data={"skip_bad_images": True}))
    assert "broken.jpg" in (run.path / "skipped_images.csv").read_text()
    assert "left bar/broken.jpg" not in (run.path / "split.csv").read_text()


def test_an_existing_run_directory_is_never_overwritten(tmp_path, pool_dataset):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        imgclf.train(tiny_config(pool_dataset, tmp_path / "r"))
    assert (tmp_path / "r" / "precious.txt").read_text() == "keep"
