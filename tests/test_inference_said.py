"""Commands that use a trained run do what they are asked or say why not: evaluate under torchrun refuses a
classical head (it scored the untrained linear layer), a threshold is never chosen on views predict does not
average, scores under another --tta record it, a majority vote says it drops members' thresholds, model-info
says what a classical head classifies with, serve's pixel limit cannot exceed what Pillow decodes."""

import csv
import json
import logging
import shutil

import numpy as np
import pytest

import imgclf
from clitools import assert_clean_error, run_main
from imgclf.config import build_config
from imgclf.errors import ConfigError, RunDirError
from imgclf.evaluation.predictions import Predictions
from imgclf.runs import manifest
from imgclf.runs.base import load_run
from imgclf.runs.network import NetworkRun
from imgclf.serving.server import ServeOptions
from imgclf.training.ddp import DistSettings
from imgclf.workflows.backends import run_jobs
from imgclf.workflows.cv import cross_validate
from imgclf.workflows.distributed import evaluate_on_ranks
from imgclf.workflows.ensemble import check_members, create_ensemble
from imgclf.workflows.settings import warn_replaced_settings

from conftest import tiny_config
from imagefactory import make_class_folders

BINARY = {"threshold": "max_f1", "report": False, "bootstrap": 0, "baseline": False}


@pytest.fixture(scope="module")
def binary_runs(tmp_path_factory):
    """Two binary runs deciding at a max-F1 threshold, and a logistic-regression head run, on one split."""
    base = tmp_path_factory.mktemp("binary")
    data = make_class_folders(base / "data", per_class=10, classes=["cat", "dog"])
    runs = [imgclf.train(tiny_config(data, base / f"run{seed}", train={"epochs": 2, "seed": seed},
                                     evaluate=BINARY)) for seed in (1, 2)]
    head = imgclf.train(tiny_config(data, base / "logreg", model={"head": "logreg"}, train={"epochs": 1}))
    return runs, head


def test_evaluate_under_torchrun_refuses_a_classical_head_run(binary_runs):
    _, head = binary_runs
    with pytest.raises(ConfigError, match="an ensemble or a --head run evaluates on one process"):
        evaluate_on_ranks(head.path, "test", None, None, None, DistSettings())


def test_a_threshold_is_never_chosen_on_views_predict_does_not_average(binary_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(binary_runs[0][0].path, run)
    chosen = json.loads((run / "threshold.json").read_text())
    assert_clean_error(run_main("evaluate", run, "--tta", "flip", "--threshold", "youden"),
                       "--threshold youden with --tta flip", "predict, serve and the export decide on the run's own")
    assert json.loads((run / "threshold.json").read_text()) == chosen  # refused before anything was written
    assert_clean_error(run_main("evaluate", run, "--threshold", ""), "threshold must be argmax")


def test_scores_under_another_tta_record_it_and_the_runs_own_do_not(binary_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(binary_runs[0][0].path, run)
    result = run_main("evaluate", run, "--tta", "flip")
    assert result.returncode == 0, result.stderr
    assert "scored with --tta flip, recorded in metrics.json" in result.stdout
    assert json.loads((run / "metrics.json").read_text())["test"]["tta"] == "flip"
    again = run_main("evaluate", run, "--tta", "none")  # the run's own: nothing to record
    assert again.returncode == 0 and "scored with --tta" not in again.stdout
    assert "tta" not in json.loads((run / "metrics.json").read_text())["test"]


def test_scores_of_images_read_under_another_folder_record_it_and_say_so(binary_runs, tmp_path):
    """evaluate --data OTHER beside a dataset still in place scored other images as the run's test and recorded
    nothing: the metrics now name the folder, and a warning says the run's own is still there."""
    run, own = tmp_path / "run", binary_runs[0][0].index().root
    shutil.copytree(binary_runs[0][0].path, run)
    other = shutil.copytree(own, tmp_path / "look-alike")
    result = run_main("evaluate", run, "--data", other)
    assert result.returncode == 0, result.stderr
    assert f"warning: --data {other}: the run's own dataset folder {own} is still there" in result.stderr
    assert json.loads((run / "metrics.json").read_text())["test"]["data"] == str(other.resolve())
    assert run_main("report", run).returncode == 0  # the page says it too, not only "Images under" the old folder
    assert f"another folder than the run's dataset: test under <code>{other.resolve()}</code>" in \
        (run / "report.html").read_text()
    assert run_main("evaluate", run, "--data", other, "--threshold", "youden", "--split", "val").returncode == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val"]["data"] == metrics["test"]["data"] == str(other.resolve())  # test re-decided, still so
    again = run_main("evaluate", run, "--data", own)  # the run's own folder, named: nothing to say or record
    assert again.returncode == 0 and "warning: --data" not in again.stderr
    assert "data" not in json.loads((run / "metrics.json").read_text())["test"]


def test_a_majority_vote_says_it_counts_members_argmax_not_their_thresholds(binary_runs, tmp_path, caplog):
    runs, _ = binary_runs
    caplog.set_level("WARNING", logger="imgclf")
    create_ensemble([r.path for r in runs], tmp_path / "vote", method="majority")
    assert "a majority vote counts each member's most probable class, not the decision" in caplog.text
    caplog.clear()
    create_ensemble([r.path for r in runs], tmp_path / "soft", method="soft")
    assert "majority vote" not in caplog.text


def test_model_info_says_a_classical_head_classifies_and_refuses_a_weights_map_alone(binary_runs):
    shown = run_main("model-info", binary_runs[1].path)
    assert shown.returncode == 0 and "a scikit-learn logreg classifier fitted on these features" in shown.stdout
    named = run_main("model-info", "simple_cnn", "--head", "svm", "--image-size", "16")
    assert named.returncode == 0 and "scikit-learn svm classifier" in named.stdout
    assert_clean_error(run_main("model-info", "simple_cnn", "--weights-map", "position"),
                       "model-info shows the model, which --weights-map would not change")


def test_serve_refuses_a_pixel_limit_that_pillow_would_override():
    with pytest.raises(ConfigError, match="refused as decompression bombs whatever the limit; give at most"):
        ServeOptions(max_pixels=500_000_000).check()
    ServeOptions(max_pixels=100_000_000).check()


def test_features_of_a_run_whose_dataset_moved_says_how_to_give_it(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4)
    run = imgclf.train(tiny_config(data, tmp_path / "run", train={"epochs": 1}))
    data.rename(tmp_path / "moved")
    assert_clean_error(run_main("features", run.path, "--out", tmp_path / "f.npz"), "is gone; give where it is now",
                       f"imgclf features {run.path} NEW_LOCATION")
    assert run_main("features", run.path, tmp_path / "moved", "--out", tmp_path / "f.npz").returncode == 0


def test_model_info_refuses_stage_keys_that_do_not_shape_the_model_and_says_the_recipes_freeze(tmp_path):
    assert_clean_error(run_main("model-info", "simple_cnn", "--stage", "name=a,lr=0.5,epochs=3"),
                       "which --stage epochs, lr would not change")
    assert run_main("model-info", "simple_cnn", "--image-size", "16", "--stage", "name=a,freeze=last:1").returncode == 0
    shown = run_main("model-info", "tf_efficientnet_lite0", "--pretrained", "--freeze", "last:2", "--image-size", "64",
                     "--depth", "1")
    assert shown.returncode == 0, shown.stderr
    assert "these settings do not apply there: --freeze last:2 (stage head: backbone, finetune: none)" in shown.stderr


def test_audit_refuses_overwrite_without_a_file_to_overwrite(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4)
    assert_clean_error(run_main("audit", data, "--overwrite", "--no-near"), "audit writes no file without --json")


def test_warnings_logged_in_worker_processes_reach_the_command(caplog):
    config = build_config({"model": {"name": "resnet18", "pretrained": True, "weights_map": "name"}})
    caplog.set_level("WARNING", logger="imgclf")
    results = run_jobs(warn_replaced_settings, [(config,), (config,)], "processes", 2)
    assert results == [None, None]
    said = [r.getMessage() for r in caplog.records if "--weights-map name has no effect" in r.getMessage()]
    assert len(said) == 2  # one per job here; a command's console says a repeated warning once


def test_explain_refuses_layers_that_name_nothing(binary_runs, tmp_path):
    image = next(p for p in (binary_runs[0][0].index().root / "cat").iterdir())
    for empty in ("", ","):
        assert_clean_error(run_main("explain", binary_runs[0][0].path, image, "--out", tmp_path / "x", "--feature-maps",
                                    "--layers", empty), "names no layer")


def test_compare_says_when_runs_decide_or_test_differently(binary_runs, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(binary_runs[0][0].path, first)
    shutil.copytree(binary_runs[0][1].path, second)
    assert run_main("evaluate", second, "--threshold", "argmax").returncode == 0
    assert run_main("evaluate", second, "--tta", "flip").returncode == 0
    result = run_main("compare", first, second, "--out", tmp_path / "cmp")
    assert result.returncode == 0, result.stderr
    assert "decide by different threshold rules (first: max_f1, second: argmax)" in result.stderr
    assert "average different test-time augmentations (first: none, second: flip)" in result.stderr
    same = run_main("compare", first, binary_runs[0][1].path, "--out", tmp_path / "same")
    assert "threshold rules" not in same.stderr and "test-time augmentations" not in same.stderr


def test_a_rechosen_threshold_redecides_every_scored_split_and_the_files_that_show_them(binary_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(binary_runs[0][0].path, run)
    before = json.loads((run / "metrics.json").read_text())["test"]
    assert run_main("evaluate", run, "--threshold", "argmax", "--split", "val").returncode == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["threshold"] is None and metrics["val"]["threshold"] is None  # test too, not just val
    assert metrics["test"]["roc_auc_ovr"] == before["roc_auc_ovr"]  # the same probabilities, decided again
    saved = Predictions.from_csv(run / "predictions_test.csv")
    assert (saved.pred == saved.probs.argmax(axis=1)).all()
    assert f"| test | {metrics['test']['accuracy']:.4f} |" in (run / "summary.md").read_text()
    assert not (run / "report.html").exists()  # trained with --no-report: evaluate keeps it so
    assert run_main("report", run).returncode == 0  # asked for: from now on evaluate refreshes it
    assert run_main("evaluate", run, "--tta", "flip").returncode == 0
    assert "Scored with another test-time augmentation than the run's: test with" in (run / "report.html").read_text()


def test_cv_refuses_to_pool_a_fold_whose_threshold_was_rechosen(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=8, classes=["cat", "dog"])
    config = tiny_config(data, tmp_path / "cv", train={"epochs": 1})
    cross_validate(config, folds=2)
    assert run_main("evaluate", tmp_path / "cv" / "fold_0", "--threshold", "youden").returncode == 0
    with pytest.raises(RunDirError, match="fold_0 now decides by --threshold youden .* this run asks argmax"):
        cross_validate(config, folds=2)


def test_members_naming_the_positive_class_that_others_leave_unset_agree(binary_runs, caplog, monkeypatch):
    """cat/dog with --positive-class dog and without it decide alike: no warning that they score otherwise."""
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)
    caplog.set_level(logging.WARNING, logger="imgclf")
    first, other = (load_run(run.path) for run in binary_runs[0])
    assert first.config.data.positive_class is None

    def naming(run, positive):
        run.__dict__["config"] = run.config.model_copy(update={"data": run.config.data.model_copy(
            update={"positive_class": positive})})

    naming(other, "dog")
    check_members([first, other])
    assert "scores as" not in caplog.text  # was: "positive class the second" against "positive class dog"
    naming(other, "cat")
    check_members([first, other])
    assert "positive class dog" in caplog.text and "positive class cat" in caplog.text


@pytest.mark.parametrize(("row", "fragment"), [
    ("/etc/passwd,cat,cat,0.9,0.9,0.1", "'/etc/passwd' is not an image of the split"),  # was scored as test, n=1
    ("{path},cat,cat,0.9,7.5,-6.5", "line 2: the probabilities are not each in 0..1 summing to 1"),  # a traceback
    ("{path},{other},cat,0.9,0.9,0.1", "is labelled"),
])
def test_choosing_a_threshold_again_refuses_saved_predictions_that_are_not_the_split_s(binary_runs, tmp_path, row,
                                                                                     fragment):
    run = tmp_path / "run"
    shutil.copytree(binary_runs[0][0].path, run)
    saved = Predictions.from_csv(run / "predictions_test.csv")
    true = saved.classes[saved.true[0]]
    tampered = row.format(path=saved.paths[0], other=next(c for c in saved.classes if c != true))
    if "{other}" not in row:
        tampered = tampered.replace(",cat,cat,", f",{true},{true},", 1)
    header = (run / "predictions_test.csv").read_text().splitlines()[0]
    (run / "predictions_test.csv").write_text(f"{header}\n{tampered}\n")
    threshold_before = (run / "threshold.json").read_bytes()
    result = run_main("evaluate", str(run), "--split", "val", "--threshold", "youden")
    assert_clean_error(result, "predictions_test.csv", fragment)
    assert (run / "threshold.json").read_bytes() == threshold_before  # refused before anything was written


def test_predict_under_a_threshold_writes_the_decided_class_s_confidence_and_says_the_threshold(binary_runs,
                                                                                               tmp_path):
    run = binary_runs[0][0]
    out = tmp_path / "p.csv"
    result = run_main("predict", str(run.path), str(run.index().root), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"where its probability is at least {run.threshold:.4f} (max_f1, chosen on val)" in result.stdout
    assert "threshold was chosen" not in result.stderr
    flipped = run_main("predict", str(run.path), str(run.index().root), "--out", str(out), "--overwrite", "--tta",
                       "flip")
    assert "warning: --tta flip: the threshold was chosen on the run's own validation probabilities" in flipped.stderr
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert all(float(r["confidence"]) == float(r[f"prob_{r['predicted_label']}"]) for r in rows)
    # it was the larger probability: decided 'dog' at 0.3 below a threshold of 0.25, it said cat's 0.7
    Predictions(["a.png"], ["cat", "dog"], np.array([-1]), np.array([[0.7, 0.3]])).at_threshold(0.25, 1).to_csv(out)
    assert out.read_text().splitlines()[1] == "a.png,dog,0.3,0.7,0.3"


def test_predict_and_features_never_overwrite_a_file_of_the_run(binary_runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(binary_runs[0][0].path, run)
    images = str(binary_runs[0][0].index().root)
    before = (run / "config.yaml").read_bytes()
    for command in (["predict", str(run), images], ["features", str(run)]):
        for name in ("config.yaml", "predictions_test.csv"):
            result = run_main(*command, "--out", str(run / name), "--overwrite")
            assert_clean_error(result, f"--out {run / name} is the run's own file")
    assert (run / "config.yaml").read_bytes() == before  # it was replaced with --overwrite
    assert run_main("predict", str(run), images, "--out", str(run / "mine.csv")).returncode == 0  # the user's name


def test_a_threshold_rule_on_a_multiclass_run_is_refused_before_any_image_is_read(trained_run, monkeypatch):
    """It decoded and predicted every validation image (every member's, for an ensemble) first."""
    read = []
    monkeypatch.setattr(NetworkRun, "probabilities", lambda self, *a, **k: read.append(1))
    result = run_main("evaluate", str(trained_run.path), "--threshold", "youden")
    assert_clean_error(result, "--threshold youden needs a binary task; this run has 3 classes")
    assert not read


def test_a_threshold_is_chosen_again_on_a_dataset_that_moved(binary_runs, tmp_path):
    """--data names the moved folder; the check of the saved predictions asked for the old one (dataset gone)."""
    run = tmp_path / "run"
    shutil.copytree(binary_runs[0][0].path, run)
    data = binary_runs[0][0].index().root
    dataset = json.loads((run / "dataset.json").read_text())
    (run / "dataset.json").write_text(json.dumps({**dataset, "root": str(tmp_path / "gone")}))
    manifest.reseal(run, "dataset.json")
    result = run_main("evaluate", str(run), "--split", "val", "--threshold", "youden", "--data", str(data))
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "threshold.json").read_text())["rule"] == "youden"
