"""`imgclf train DATA` with no model chosen: candidates on validation, the best kept, the others as baselines."""

import json
import logging
import shutil

import numpy as np
import pytest

from clitools import assert_clean_error, imgclf
from imgclf.cli.parser import main
from imgclf.config import build_config
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import setup_logging
from imgclf.runs.base import load_run
from imgclf.runs.files import read_baselines
from imgclf.workflows.autoselect import CLOSING_S, SELECTION_FILE, Pace, _limited, train_auto
from imgclf.workflows.candidates import (
    CANDIDATES,
    candidate_config,
    is_default_request,
    pretrained_input_size,
)

from imagefactory import make_class_folders

pytestmark = pytest.mark.slow


def noisy_folders(root, per_class=12, swaps=4):
    """Class folders where ``swaps`` images of each class carry another class's picture: nothing is perfect."""
    make_class_folders(root, per_class)
    classes = sorted(p.name for p in root.iterdir())
    for i, name in enumerate(classes):
        other = root / classes[(i + 1) % len(classes)]
        for image in sorted((root / name).iterdir())[:swaps]:
            shutil.move(image, other / f"swapped from {name} {image.name}")
    return root


def auto_config(data, out, **train):
    return build_config({"data": {"path": str(data), "image_size": 16, "val_fraction": 0.25, "test_fraction": 0.2},
                         "train": {"epochs": 2, "batch_size": 8, **train}, "out": str(out),
                         "evaluate": {"report": False, "bootstrap": 0}})


def test_every_candidate_trains_the_best_on_val_is_the_run_and_only_it_reads_test(tmp_path):
    data = noisy_folders(tmp_path / "data")
    run = train_auto(auto_config(data, tmp_path / "run"), budget_s=600)
    selection = json.loads((tmp_path / "run" / SELECTION_FILE).read_text())
    tried = selection["candidates"]
    assert list(tried) == list(CANDIDATES)  # nothing perfect, the budget ample: all three, in order
    best = max(tried, key=lambda n: (tried[n]["val"]["f1_macro"], -tried[n]["val"]["log_loss"]))
    assert selection["chosen"] == best
    assert run.path == tmp_path / "run" and load_run(run.path).metrics["test"]["n"] > 0  # sealed, test read once
    assert run.metrics["val"]["f1_macro"] == pytest.approx(tried[best]["val"]["f1_macro"])
    losers = sorted(p.name for p in (tmp_path / "run" / "candidates").iterdir())
    assert len(losers) == 2
    for loser in losers:
        path = tmp_path / "run" / "candidates" / loser
        assert load_run(path).metrics.keys() == {"val"} and not (path / "predictions_test.csv").exists()
    rows = read_baselines(tmp_path / "run" / "metrics.json")
    assert [r["role"] for r in rows].count("candidate") == 2 and rows[0]["name"] == "majority class"
    assert all("test" in r for r in rows if r["role"] == "baseline")  # baselines scored on the same test images
    assert (tmp_path / "run" / "plots" / "confusion_test.png").is_file()


def test_the_cli_default_stops_when_validation_is_perfect_and_prints_the_comparison(tmp_path, capsys, caplog,
                                                                                     monkeypatch):
    data = make_class_folders(tmp_path / "data", 14)  # clean bars: the probe is perfect on validation
    setup_logging()  # as the CLI does first (it turns propagation off), so that the patch below holds
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)
    caplog.set_level(logging.INFO, logger="imgclf")
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--image-size", "32", "--epochs", "2",
                 "--max-seconds", "600", "--no-report"]) == 0
    assert "no effect" not in caplog.text  # --epochs is for every candidate: the probe's fit is no reason to warn
    # ... but once the probe is chosen, and nothing else trained, the user learns --epochs shaped nothing
    assert "the chosen linear probe applied none of --epochs: it fits logistic regression" in caplog.text
    assert "--max-seconds 600 limits each network candidate's training (the linear probe has no epochs" in caplog.text
    out = capsys.readouterr().out
    assert "This model vs baselines, on the same images:" in out and "majority class (baseline)" in out
    assert "linear probe (EfficientNet-Lite0 features) (baseline)" not in out  # the chosen probe is the model
    selection = json.loads((tmp_path / "run" / SELECTION_FILE).read_text())
    assert selection["chosen"] == "linear probe" and list(selection["candidates"]) == ["linear probe"]
    assert not (tmp_path / "run" / "candidates").exists()  # nothing else ran
    assert main(["predict", str(tmp_path / "run"), str(data), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(Predictions.from_csv(tmp_path / "p.csv").paths) == 42


def test_a_later_candidate_is_skipped_with_a_line_when_the_budget_is_spent(tmp_path, caplog):
    data = noisy_folders(tmp_path / "data")
    caplog.set_level("INFO")
    train_auto(auto_config(data, tmp_path / "run"), budget_s=0.01)
    selection = json.loads((tmp_path / "run" / SELECTION_FILE).read_text())
    assert list(selection["candidates"]) == ["linear probe"]  # the first always runs
    assert "skipped small CNN: 0 s of the budget left (raise --budget to try it)" in caplog.text
    assert "the candidates weigh classes 'balanced'" in caplog.text
    written = [r.getMessage() for r in caplog.records if r.getMessage().startswith("run written to")]
    assert written[-1] == f"run written to {tmp_path / 'run'} (the chosen linear probe, moved up from candidates/probe)"
    caplog.clear()
    train_auto(auto_config(data, tmp_path / "given", sampler="none"), budget_s=0.01)  # an explicit choice is said
    assert "the candidates use --class-weight none and --sampler none as given" in caplog.text
    assert "weigh classes 'balanced'" not in caplog.text


def test_the_probes_pace_prices_the_closing_work_and_the_fine_tunes_minimum(monkeypatch):
    pace = Pace(deadline=100.0, counts={"train": 60, "val": 20, "test": 20})
    monkeypatch.setattr("imgclf.workflows.autoselect.time.perf_counter", lambda: 10.0)
    assert pace.closing() == 0.0 and pace.left() == 90.0  # before the probe nothing is known
    pace.learn(probe_seconds=8.0)  # 80 train+val images: 0.1 s each
    assert pace.closing() == pytest.approx(CLOSING_S + 0.1 * (20 + 100))  # the test pass + the probe's over all
    assert pace.left() == pytest.approx(90.0 - CLOSING_S - 12.0)
    assert Pace(100.0, pace.counts, baseline=False, per_image=0.1).closing() == pytest.approx(CLOSING_S + 2.0)
    assert pace.finetune_minimum(views=2) == pytest.approx(0.1 * (5 * 60 + 2 * 20))


def test_the_fine_tune_is_skipped_with_a_line_when_its_minimum_does_not_fit(tmp_path, caplog, monkeypatch):
    data = noisy_folders(tmp_path / "data")
    monkeypatch.setattr(Pace, "finetune_minimum", lambda self, views: 1e6)
    caplog.set_level("INFO")
    train_auto(auto_config(data, tmp_path / "run"), budget_s=600)
    selection = json.loads((tmp_path / "run" / SELECTION_FILE).read_text())
    assert list(selection["candidates"]) == ["linear probe", "small CNN"]
    assert "skipped fine-tuned EfficientNet-Lite0: at the linear probe's pace, caching its features and one " \
           "fine-tuning epoch need about 1000000 s" in caplog.text


def test_the_users_max_seconds_bounds_each_candidate_and_a_zero_budget_is_refused(tmp_path):
    data = make_class_folders(tmp_path / "data", 4)
    given = build_config({"data": {"path": str(data)}, "train": {"max_seconds": 20}})
    small = candidate_config(given, "small CNN", tmp_path / "c")
    assert _limited(small, 50.0).train.max_seconds == 20  # the user's limit, smaller than the share
    assert _limited(small, 12.0).train.max_seconds == 12.0  # the share, smaller than the user's limit
    assert_clean_error(imgclf("train", data, "--budget", "0"), "--budget 0: give the seconds")


def test_any_model_setting_trains_that_model_alone(tmp_path):
    data = make_class_folders(tmp_path / "data", 4)
    plain = build_config({"data": {"path": str(data)}, "train": {"epochs": 3}})
    assert is_default_request(plain)  # training settings apply to every candidate
    for chosen in ({"model": {"name": "simple_cnn"}}, {"model": {"dropout": 0.1}},
                   {"stages": [{"name": "a", "epochs": 1}]}):
        assert not is_default_request(build_config({"data": {"path": str(data)}, **chosen}))
    assert_clean_error(imgclf("train", data, "--model", "simple_cnn", "--budget", "30"),
                       "--budget applies only when no model setting is given")


def test_the_default_without_validation_images_is_one_line_and_makes_no_run(tmp_path):
    data = make_class_folders(tmp_path / "data", 4)
    result = imgclf("train", data, "--val-fraction", "0", "--out", tmp_path / "run")
    assert_clean_error(result, "no validation images: the default chooses among its candidates", "--val-fraction")
    assert not (tmp_path / "run").exists()


def test_the_default_refuses_several_processes_in_one_line(tmp_path):
    data = make_class_folders(tmp_path / "data", 4)
    assert_clean_error(imgclf("train", data, "--nproc", "2"), "tries its candidates on one process; pass --model")


def test_candidates_keep_every_training_setting_and_size_pretrained_inputs_from_the_images(tmp_path):
    data = make_class_folders(tmp_path / "data", 4, sizes=(40,))
    base = build_config({"data": {"path": str(data)}, "train": {"epochs": 7, "seed": 3}})
    for name in CANDIDATES:
        cfg = candidate_config(base, name, tmp_path / name, pretrained_size=96)
        assert (cfg.train.epochs, cfg.train.seed) == (7, 3)
        assert cfg.data.image_size == (None if name == "small CNN" else 96)
        assert (cfg.train.class_weight, cfg.train.sampler) == ("balanced", "none")  # measured: imbalance.py
    for chosen in ({"class_weight": "none"}, {"sampler": "weighted"}):  # the user's imbalance choice is kept
        cfg = candidate_config(build_config({"data": {"path": str(data)}, "train": chosen}), "small CNN", tmp_path)
        assert (cfg.train.class_weight, cfg.train.sampler) == (chosen.get("class_weight", "none"),
                                                               chosen.get("sampler", "none"))
    given = build_config({"data": {"path": str(data), "image_size": 48}})
    assert candidate_config(given, "linear probe", tmp_path / "x", pretrained_size=96).data.image_size == 48
    paths = sorted(data.rglob("*.*"))
    assert pretrained_input_size(paths) == 96  # 40 px images: ImageNet features need at least 96
    big = make_class_folders(tmp_path / "big", 2, sizes=(150,))
    assert pretrained_input_size(sorted(big.rglob("*.*"))) == 160  # rounded up to a multiple of 32
    assert pretrained_input_size([tmp_path / "missing.png"]) == 224
    assert np.isfinite(pretrained_input_size(paths))
