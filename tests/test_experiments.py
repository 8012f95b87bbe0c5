"""Cross-validation, grid search and their execution backends, on tiny data."""

import csv
import json
import logging
import os
import re
import shutil

import pytest
import yaml

import imgclf
import imgclf.workflows.grid
import imgclf.workflows.summary
from clitools import assert_clean_error
from clitools import run_main as run_cli
from imgclf.config.stages import resolve_stages
from imgclf.data.audit import predefined_folds
from imgclf.errors import ConfigError, DataError, RunDirError
from imgclf.evaluation.metrics import compute_metrics
from imgclf.evaluation.predictions import Predictions
from imgclf.reporting.html import grid_sections
from imgclf.runs.network import NetworkRun as Run
from imgclf.workflows.cv import cross_validate
from imgclf.workflows.grid import grid_search, parse_params, trial_configs

from conftest import tiny_config
from imagefactory import make_class_folders, make_grouped_csv, make_split_folders


def read(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def without_time(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "run")} for r in rows]


def approx_floats(row: dict) -> dict:
    return {k: pytest.approx(v, rel=1e-5) if isinstance(v, float) else v for k, v in row.items()}


def test_stratified_kfold_writes_runs_tables_plot_and_pooled_predictions(tmp_path, pool_dataset):
    result = cross_validate(tiny_config(pool_dataset, tmp_path / "cv", train={"epochs": 3}), folds=3)
    folds = read(tmp_path / "cv" / "folds.csv")
    assert len(folds) == 3 and {"test_accuracy", "val_f1_macro", "test_roc_auc_ovr", "seconds"} <= set(folds[0])
    assert len({f["seed"] for f in folds}) == 3  # a derived seed per fold, recorded
    for i in range(3):
        assert (tmp_path / "cv" / f"fold_{i}" / "model.safetensors").is_file()
    summary = {r["metric"]: r for r in read(tmp_path / "cv" / "summary.csv")}
    assert set(summary["test_accuracy"]) >= {"count", "mean", "std", "min", "25%", "50%", "75%", "max",
                                             "ci95_low", "ci95_high"}
    assert float(summary["test_accuracy"]["ci95_low"]) <= float(summary["test_accuracy"]["mean"])
    oof = Predictions.from_csv(tmp_path / "cv" / "predictions_oof.csv")
    assert sorted(oof.paths) == sorted(str(p) for p in pool_dataset.rglob("*") if p.is_file())  # each once
    assert json.loads((tmp_path / "cv" / "metrics_oof.json").read_text()) == json.loads(json.dumps(
        compute_metrics(oof)))
    assert result["oof"]["n"] == 42 and (tmp_path / "cv" / "plots" / "folds.png").is_file()


def test_predefined_fold_folders(tmp_path):
    for i in range(3):
        make_split_folders(tmp_path / "data" / f"Fold{i}", {"train": 6, "valid": 2, "test": 2}, seed=i)
    config = tiny_config(tmp_path / "data", tmp_path / "cv", train={"epochs": 2})
    for folds, group, layout in ((5, None, "auto"), (None, "patient", "auto"), (None, None, "class_folders")):
        with pytest.raises(ConfigError, match="has its own 3 folds .Fold0..Fold2., which decide the splits"):
            cross_validate(config.model_copy(update={"data": config.data.model_copy(update={"layout": layout})}),
                           folds=folds, group_column=group)
    assert not (tmp_path / "cv").exists()  # refused before the folder was claimed
    cross_validate(config, folds=3)  # the number it has
    folds = read(tmp_path / "cv" / "folds.csv")
    assert len(folds) == 3
    split = read(tmp_path / "cv" / "fold_1" / "split.csv")
    assert sum(r["split"] == "test" for r in split) == 6 and all("valid" not in r["path"] or r["split"] == "val"
                                                                  for r in split)


def test_fold_folders_of_class_folders_test_each_fold_on_its_own_images_and_train_on_the_others(tmp_path, caplog):
    """A notebook's Fold0..Fold9 of class folders: each fold folder was split alone at random and tested on a third
    of itself (9 of 36 images scored out of fold). The folders numbered 1, 2, 4 are said in their runs' order."""
    for number in (1, 2, 4):
        make_class_folders(tmp_path / "data" / f"Fold{number}", per_class=4, seed=number)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        result = cross_validate(tiny_config(tmp_path / "data", tmp_path / "cv", train={"epochs": 1}))
    assert "numbered 1, 2, 4, not 0..2: their runs are fold_0..fold_2 in that order (fold_0 = Fold1" in caplog.text
    for i, number in enumerate((1, 2, 4)):
        split = read(tmp_path / "cv" / f"fold_{i}" / "split.csv")
        tested = {r["path"] for r in split if r["split"] == "test"}
        assert len(tested) == 12 and all(f"/Fold{number}/" in p for p in tested)
        assert not any(f"/Fold{number}/" in r["path"] for r in split if r["split"] != "test")
    assert result["oof"]["n"] == 36  # every image once


@pytest.mark.parametrize(("broken", "fragment"), [
    ("no_test", "fold folder {root}/Fold1 has no test images"),
    ("one_class_fewer", "fold folders Fold0 and Fold1 have different classes"),
    ("mixed", "{root}/Fold1: class folders, where the other fold folders"),
])
def test_fold_folders_of_splits_are_checked_before_any_fold_trains(tmp_path, broken, fragment):
    """Both ended after every fold had trained: 'predictions_test.csv does not exist', 'folds have different
    classes', with folds.csv and summary.csv written."""
    root = tmp_path / "data"
    for i in range(3):
        splits = {"train": 5, "valid": 2, "test": 2}
        classes = None
        if i == 1 and broken == "no_test":
            splits.pop("test")
        if i == 1 and broken == "one_class_fewer":
            classes = ["left bar", "right bar"]
        if i == 1 and broken == "mixed":
            make_class_folders(root / "Fold1", per_class=4)
            continue
        make_split_folders(root / f"Fold{i}", splits, classes, seed=i)
    with pytest.raises(DataError, match=re.escape(fragment.format(root=root))):
        cross_validate(tiny_config(root, tmp_path / "cv", train={"epochs": 1}))
    assert not (tmp_path / "cv").exists()


def test_group_kfold_keeps_a_patient_in_one_fold(tmp_path):
    labels = make_grouped_csv(tmp_path / "data", 12, lambda n: f"patient{n // 3}")
    rows = read(labels)
    cross_validate(tiny_config(tmp_path / "data" / "labels.csv", tmp_path / "cv", train={"epochs": 2}), folds=3,
                   group_column="group")
    group_of = {str((tmp_path / "data" / r["path"]).resolve()): r["group"] for r in rows}
    fold_of_group: dict[str, set] = {}
    for i in range(3):
        for r in read(tmp_path / "cv" / "splits" / f"fold_{i}.csv"):
            if r["split"] == "test":
                fold_of_group.setdefault(group_of[str((tmp_path / "data" / r["path"]).resolve())], set()).add(i)
    assert fold_of_group and all(len(folds) == 1 for folds in fold_of_group.values())
    for i in range(3):  # inside each fold, val takes whole patients too (it was drawn at random: one spanned both)
        by_split: dict[str, set] = {}
        for r in read(tmp_path / "cv" / f"fold_{i}" / "split.csv"):
            by_split.setdefault(r["split"], set()).add(group_of[str((tmp_path / "data" / r["path"]).resolve())])
        assert by_split["val"] and not by_split["val"] & by_split["train"] and not by_split["test"] & by_split["train"]
        assert yaml.safe_load((tmp_path / "cv" / f"fold_{i}" / "config.yaml").read_text())["data"]["group_column"] \
            == "group"


def test_grouped_folds_are_checked_before_the_folder_is_claimed_and_evaluate_data_cannot_reroot_them(tmp_path):
    make_grouped_csv(tmp_path / "data", 6, lambda n: f"p{n % 2}")
    config = tiny_config(tmp_path / "data" / "labels.csv", tmp_path / "cv", train={"epochs": 1})
    with pytest.raises(DataError, match="fold 0 of .*labels.csv: its training images form 1 group of --group-column "
                                        "group; its val takes whole groups and needs 2"):
        cross_validate(config, folds=2, group_column="group")  # 2 patients, 2 folds: each fold trains on one
    assert not (tmp_path / "cv").exists()  # it failed in a fold's run, after experiment.json and splits/
    cross_validate(tiny_config(tmp_path / "data" / "labels.csv", tmp_path / "cv3", train={"epochs": 1}), folds=2)
    assert_clean_error(run_cli("evaluate", tmp_path / "cv3" / "fold_0", "--data", tmp_path / "data"),
                       "lists its images by absolute path", "drop --data")  # it read the old images and said not


def test_cv_reruns_to_identical_numbers(tmp_path, pool_dataset):
    a = cross_validate(tiny_config(pool_dataset, tmp_path / "a", train={"epochs": 2}), folds=2)
    b = cross_validate(tiny_config(pool_dataset, tmp_path / "b", train={"epochs": 2}), folds=2)
    assert without_time(a["folds"]) == without_time(b["folds"]) and a["oof"] == b["oof"]


def test_grid_ranks_on_validation_and_reads_test_once_for_the_best(tmp_path, pool_dataset, monkeypatch):
    calls = []
    real_evaluate = Run.evaluate

    def spy(self, split="test", *args, **kwargs):
        calls.append((self.path.name, split))
        return real_evaluate(self, split, *args, **kwargs)

    monkeypatch.setattr(Run, "evaluate", spy)
    grid = parse_params(["lr=0.01,0.0001", "optimizer=adam,sgd"])
    result = grid_search(tiny_config(pool_dataset, tmp_path / "g", train={"epochs": 3}), grid)
    board = read(tmp_path / "g" / "leaderboard.csv")
    scores = [float(r["val_f1_macro"]) for r in board]
    assert len(board) == 4 and scores == sorted(scores, reverse=True)
    assert {"param_lr", "param_optimizer", "val_accuracy", "seconds"} <= set(board[0])
    test_calls = [c for c in calls if c[1] == "test"]
    assert test_calls == [(board[0]["trial"], "test")] and calls[-1] == test_calls[0]  # once, last, the best
    trials = tmp_path / "g" / "trials"
    assert [p.name for p in trials.glob("*/predictions_test.csv")] == ["predictions_test.csv"]
    assert result["test"]["n"] == 9
    best = trials / board[0]["trial"]  # closed as any run: baselines and summary.md beside its test scores
    assert "test" in json.loads((best / "metrics.json").read_text())["baselines"][0]
    assert "| test |" in (best / "summary.md").read_text()
    splits = {(trials / t / "split.csv").read_text() for t in ("trial_000", "trial_003")}
    assert len(splits) == 1  # every trial is judged on the same val (and test) images


def test_grid_resumes_finished_trials(tmp_path, pool_dataset, monkeypatch, caplog):
    config = tiny_config(pool_dataset, tmp_path / "g", train={"epochs": 2})
    grid = parse_params(["batch_size=4,8"])
    first = grid_search(config, grid)
    shutil.rmtree(tmp_path / "g" / "trials" / "trial_001")  # as if killed before it finished
    (tmp_path / "g" / "trials" / "trial_001").mkdir()
    trained = []
    real_train = imgclf.workflows.summary.train  # the name a fold or trial job calls
    monkeypatch.setattr(imgclf.workflows.summary, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    second = grid_search(config, grid)
    assert len(trained) == 1  # only the unfinished trial ran again
    assert without_time(first["leaderboard"]) == without_time(second["leaderboard"])
    record = tmp_path / "g" / "trials" / "trial_001" / "result.json"  # a hand-made winner: not believed
    record.write_text(json.dumps({**json.loads(record.read_text()), "val_f1_macro": 9.0, "params": {"lr": 0.5}}))
    rows = []  # the rows the trials give: a resumed best trial's as fresh, though it was scored on test since
    real_jobs = imgclf.workflows.grid.run_jobs
    monkeypatch.setattr(imgclf.workflows.grid, "run_jobs", lambda *a, **k: rows.extend(real_jobs(*a, **k)) or rows)
    third = grid_search(config, grid)
    assert len(trained) == 1 and without_time(third["leaderboard"]) == without_time(first["leaderboard"])
    assert rows and not any(key.startswith("test_") for row in rows for key in row)
    assert all("param_lr" not in row for row in third["leaderboard"])
    trials = tmp_path / "g" / "trials"  # as if an earlier run of this grid had another best, scored on test then
    other = next(name for name in ("trial_000", "trial_001") if name != third["best_trial"])
    shutil.copy(trials / third["best_trial"] / "predictions_test.csv", trials / other / "predictions_test.csv")
    caplog.set_level("WARNING", logger="imgclf")
    monkeypatch.setattr(imgclf.workflows.grid, "run_jobs", real_jobs)
    grid_search(config, grid)
    assert f"{other} was scored on test by an earlier run of this grid" in caplog.text
    leaderboard = grid_sections(tmp_path / "g")[0][2]  # report.html said "test was read once" all the same
    assert f"test was read for 2 trials: the best, and {other} when earlier runs of this grid" in leaderboard
    (trials / other / "predictions_test.csv").unlink()
    assert "test was read once, for the best trial." in grid_sections(tmp_path / "g")[0][2]


def test_grid_varies_any_field_from_yaml(tmp_path, pool_dataset):
    (tmp_path / "grid.yaml").write_text("model.conv_filters: [[8], [8, 16]]\naugment: [none, light]\n")
    result = grid_search(tiny_config(pool_dataset, tmp_path / "g", train={"epochs": 1}),
                         parse_params([], str(tmp_path / "grid.yaml")))
    assert len(result["leaderboard"]) == 4


def test_bad_grid_params_are_clear_errors():
    with pytest.raises(ConfigError, match="not a config field"):
        parse_params(["learning_rate=1,2"])
    with pytest.raises(ConfigError, match="NAME=V1,V2"):
        parse_params(["lr"])
    with pytest.raises(ConfigError, match=r"a list setting, so each value is a list, e.g. --param dense_layers=\["):
        parse_params(["dense_layers=512,256"])  # two trials of 512 and 256, or one of [512, 256]? brackets say
    with pytest.raises(ConfigError, match="stages have no field 'learning_rate'"):
        parse_params(["stages.1.learning_rate=1"])


def test_a_grid_over_the_trial_cap_or_an_unreadable_grid_file_is_one_clear_error(tmp_path):
    many = ",".join(str(k) for k in range(1, 23))  # 22 x 22 x 22 = 10,648 trials, each a config built up front
    with pytest.raises(ConfigError, match=r"grid: 10,648 trials \(22 lr x 22 batch_size x 22 epochs\); at most 10,000"):
        parse_params([f"lr={many}", f"batch_size={many}", f"epochs={many}"])
    assert len(parse_params([f"lr={many}", f"batch_size={many}"])["lr"]) == 22
    (tmp_path / "big.yaml").write_text("lr: [" + ", ".join(["0.1"] * 300_000) + "]\n")  # ~1.5 MB
    with pytest.raises(ConfigError, match="big.yaml is larger than 1,048,576 bytes"):
        parse_params([], str(tmp_path / "big.yaml"))
    with pytest.raises(ConfigError, match="--grid .*nothere.yaml: no such file"):
        parse_params([], str(tmp_path / "nothere.yaml"))
    os.mkfifo(tmp_path / "pipe.yaml")  # a FIFO would block a plain read forever
    with pytest.raises(ConfigError, match="pipe.yaml is not a regular file"):
        parse_params([], str(tmp_path / "pipe.yaml"))


TWO_STAGES = [{"name": "head", "freeze": "backbone", "epochs": 1}, {"name": "all", "epochs": 1}]


def test_list_values_stage_axes_and_coupled_settings_make_the_trials(tmp_path):
    (tmp_path / "grid.yaml").write_text("optimizer_lr: [{optimizer: rmsprop, lr: 1.0e-3},\n"
                                        "               {optimizer: adam, lr: 1.0e-4, weight_decay: 0}]\n")
    grid = parse_params(["dense_layers=[8];[16,8]", "stages.all.epochs=1,2"], str(tmp_path / "grid.yaml"))
    config = tiny_config(tmp_path, tmp_path / "g", stages=TWO_STAGES)
    trials = trial_configs(config, grid, tmp_path / "g")
    assert len(trials) == 2 * 2 * 2
    seen = {(c.train.optimizer, c.train.lr, c.train.weight_decay, tuple(c.model.dense_layers), c.stages[1].epochs)
            for _, _, c in trials}
    assert seen == {(opt, lr, decay, widths, epochs)
                    for opt, lr, decay in (("rmsprop", 1e-3, 1e-4), ("adam", 1e-4, 0.0))
                    for widths in ((8,), (16, 8)) for epochs in (1, 2)}
    assert {"optimizer", "lr", "weight_decay", "dense_layers", "stages.all.epochs"} >= set(trials[0][1])
    with pytest.raises(ConfigError, match="stages.3.lr: no such stage .* 0 head, 1 all"):
        trial_configs(config, parse_params(["stages.3.lr=0.1"]), tmp_path / "g")
    with pytest.raises(ConfigError, match="lr is varied twice"):
        parse_params(["train.lr=0.1"], str(tmp_path / "grid.yaml"))


def test_a_seed_in_the_grid_is_the_trials_seed_and_other_trials_get_derived_ones(tmp_path):
    config = tiny_config(tmp_path, tmp_path / "g")
    assert [c.train.seed for _, _, c in trial_configs(config, parse_params(["seed=1,2"]), tmp_path / "g")] == [1, 2]
    derived = [c.train.seed for _, _, c in trial_configs(config, parse_params(["lr=0.1,0.2"]), tmp_path / "g")]
    assert len(set(derived)) == 2 and config.train.seed not in derived


def test_a_grid_axis_that_a_stage_sets_for_itself_is_an_error(tmp_path, pool_dataset):
    config = tiny_config(pool_dataset, tmp_path / "g", stages=[TWO_STAGES[0], {**TWO_STAGES[1], "lr": 1e-4}])
    with pytest.raises(ConfigError, match=r"stage 1 \(all\) sets its own lr=0.0001, so the grid's lr=0.01 would not "
                                          r"reach it; vary stages.1.lr instead"):
        trial_configs(config, parse_params(["lr=0.01,0.001"]), tmp_path / "g")
    trial_configs(config, parse_params(["stages.1.lr=0.01,0.001", "optimizer=adam,sgd"]), tmp_path / "g")
    result = run_cli("grid", pool_dataset, "--param", "batch-size=8,16", "--stage", "name=a,epochs=1,batch_size=4",
                     "--out", tmp_path / "cli", timeout=120)
    assert_clean_error(result, "--param batch-size: stage 0 (a) sets its own batch_size=4")
    assert not (tmp_path / "cli" / "trials").exists()
    # the default transfer recipe shares --epochs out between its stages: an epochs axis reaches them (was refused)
    recipe = tiny_config(pool_dataset, tmp_path / "r", model={"name": "tf_efficientnet_lite0", "pretrained": True})
    trials = trial_configs(recipe, parse_params(["epochs=2,4"]), tmp_path / "r")
    assert [sum(s.epochs for _, s in resolve_stages(c)) for _, _, c in trials] == [2, 4]


def test_a_grid_of_coupled_optimizer_settings_runs_each_pair(tmp_path, pool_dataset):
    (tmp_path / "grid.yaml").write_text("optimizer_lr: [{optimizer: rmsprop, stages.all.lr: 1.0e-3, rho: 0.9},\n"
                                        "               {optimizer: adam, stages.all.lr: 1.0e-4}]\n")
    result = grid_search(tiny_config(pool_dataset, tmp_path / "g", stages=TWO_STAGES),
                         parse_params([], str(tmp_path / "grid.yaml")))
    board = read(tmp_path / "g" / "leaderboard.csv")
    assert len(board) == 2 and {"param_optimizer", "param_stages.all.lr", "param_rho"} <= set(board[0])
    pairs = {(r["param_optimizer"], float(r["param_stages.all.lr"])) for r in board}
    assert pairs == {("rmsprop", 1e-3), ("adam", 1e-4)}
    for row in board:
        trained = Run(tmp_path / "g" / "trials" / row["trial"]).config
        assert (trained.train.optimizer, trained.stages[1].lr) == (row["param_optimizer"],
                                                                  float(row["param_stages.all.lr"]))
    assert result["test"]["n"] == 9


@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_backends_give_the_sequential_results(tmp_path, pool_dataset, backend):
    if backend == "ray":
        pytest.importorskip("ray")
    grid = parse_params(["lr=0.01,0.001"])
    config = tiny_config(pool_dataset, tmp_path / "seq", train={"epochs": 2})
    seq = grid_search(config, grid)
    par = grid_search(config.model_copy(update={"out": str(tmp_path / backend)}), grid, backend=backend, n_jobs=2)
    # a worker computes with its share of the threads: sums of probabilities (log loss) may differ in the last bits
    assert [approx_floats(r) for r in without_time(seq["leaderboard"])] == without_time(par["leaderboard"])


def test_cv_resumes_after_a_killed_fold(tmp_path, pool_dataset, monkeypatch):
    config = tiny_config(pool_dataset, tmp_path / "cv", train={"epochs": 2})
    first = cross_validate(config, folds=2)
    (tmp_path / "cv" / "fold_1" / "result.json").unlink()  # fold 1 died before finishing
    trained = []
    real_train = imgclf.workflows.summary.train  # the name a fold or trial job calls
    monkeypatch.setattr(imgclf.workflows.summary, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    second = cross_validate(config, folds=2)
    assert len(trained) == 1 and without_time(first["folds"]) == without_time(second["folds"])
    # the same --out with other settings: refused, not answered with the folds trained before
    with pytest.raises(ConfigError, match=r"fold_0 was trained with other settings.*train.epochs: 2 -> 3"):
        cross_validate(tiny_config(pool_dataset, tmp_path / "cv", train={"epochs": 3}), folds=2)
    assert len(trained) == 1
    (tmp_path / "x").mkdir()  # the same folder spelt otherwise, with other loader processes: the same experiment
    respelt = config.model_copy(update={"out": str(tmp_path / "x" / ".." / "cv"),
                                        "data": config.data.model_copy(update={"workers": 1})})
    again = cross_validate(respelt, folds=2)["folds"]
    assert len(trained) == 1 and [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in first["folds"]]
    record = tmp_path / "cv" / "fold_0" / "result.json"
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({**saved, "test_accuracy": 0.123}))  # the record is not sealed: not believed
    assert cross_validate(config, folds=2)["folds"][0]["test_accuracy"] == first["folds"][0]["test_accuracy"]
    record.write_text(json.dumps({**saved, "seconds": "abc"}))
    with pytest.raises(RunDirError, match=r"result.json: seconds is 'abc', not a number of seconds; delete"):
        cross_validate(config, folds=2)
    record.write_text(json.dumps({**saved, "run": "/elsewhere"}))
    with pytest.raises(RunDirError, match="is not the record of"):
        cross_validate(config, folds=2)
    record.write_text(json.dumps(saved))
    (tmp_path / "cv" / "fold_1" / "result.json").unlink()  # killed after its run, before its record
    (tmp_path / "cv" / "fold_1" / "mynotes.txt").write_text("the user's")
    third = cross_validate(config, folds=2)
    assert len(trained) == 2 and (tmp_path / "cv" / "fold_1" / "mynotes.txt").read_text() == "the user's"
    assert without_time(third["folds"]) == without_time(first["folds"])


def test_summary_intervals_stay_in_the_metrics_range():
    from imgclf.workflows.summary import describe

    rows = [{"test_accuracy": a, "val_log_loss": loss, "seconds": t}
            for a, loss, t in ((1.0, 0.01, 2.0), (1.0, 0.02, 2.5), (0.8, 0.90, 9.0))]
    summary = {r["metric"]: r for r in describe(rows, ["test_accuracy", "val_log_loss", "seconds"])}
    accuracy = summary["test_accuracy"]
    assert accuracy["mean"] + 2 * accuracy["std"] > 1 and accuracy["ci95_high"] == 1.0  # a t-interval would pass 1
    assert 0 <= accuracy["ci95_low"] < accuracy["mean"]
    assert summary["val_log_loss"]["ci95_low"] == 0.0  # a loss is never negative; it has no upper bound
    assert summary["val_log_loss"]["ci95_high"] > 0.9
    assert summary["seconds"]["ci95_low"] == 0.0 and summary["seconds"]["max"] == 9.0


def test_cv_summary_has_a_time_row_per_fold(tmp_path, pool_dataset):
    cross_validate(tiny_config(pool_dataset, tmp_path / "cv", train={"epochs": 1}), folds=2)
    folds = read(tmp_path / "cv" / "folds.csv")
    summary = {r["metric"]: r for r in read(tmp_path / "cv" / "summary.csv")}
    seconds = [float(f["seconds"]) for f in folds]
    assert int(summary["seconds"]["count"]) == 2
    assert float(summary["seconds"]["mean"]) == pytest.approx(sum(seconds) / 2)
    assert float(summary["seconds"]["max"]) == pytest.approx(max(seconds))
    for name, row in summary.items():
        if name != "seconds" and not name.endswith("loss"):
            assert 0 <= float(row["ci95_low"]) <= float(row["ci95_high"]) <= 1, name


def test_rank_by_several_metrics_breaks_ties_in_order():
    from imgclf.workflows.grid import rank_keys, rank_results

    assert rank_keys("f1_macro, val_accuracy") == ["val_f1_macro", "val_accuracy"]
    results = [{"run": f"t{i}", "val_f1_macro": f1, "val_accuracy": acc, "val_log_loss": loss}
               for i, (f1, acc, loss) in enumerate(((0.8, 0.70, 0.5), (0.9, 0.60, 0.4), (0.8, 0.75, 0.3),
                                                    (None, 0.99, 0.1), (0.8, 0.75, 0.2)))]
    by_f1 = [r["run"] for r in rank_results(results, ["val_f1_macro"])]
    assert by_f1 == ["t1", "t0", "t2", "t4", "t3"]  # one metric: ties keep trial order, missing last
    by_f1_acc = [r["run"] for r in rank_results(results, rank_keys("f1_macro,accuracy"))]
    assert by_f1_acc == ["t1", "t2", "t4", "t0", "t3"]  # the 0.8 tie broken by accuracy, then trial order
    by_three = [r["run"] for r in rank_results(results, rank_keys("f1_macro,accuracy,loss"))]
    assert by_three == ["t1", "t4", "t2", "t0", "t3"]  # a loss breaks ties lowest first
    with pytest.raises(ConfigError, match="each once"):
        rank_keys("f1_macro,val_f1_macro")
    assert rank_keys("val_loss") == rank_keys("log_loss") == ["val_log_loss"]  # Keras's name for it
    with pytest.raises(ConfigError, match=r"--rank-by 'bogus' is not a metric a trial records; use one of accuracy"):
        rank_keys("f1_macro,bogus")  # before any trial trains
    with pytest.raises(ConfigError, match="'val_recall_weird' is not a validation metric"):
        rank_results(results, ["val_f1_macro", "val_recall_weird"])


def test_grid_ranked_by_two_metrics_records_the_list(tmp_path, pool_dataset):
    result = grid_search(tiny_config(pool_dataset, tmp_path / "g", train={"epochs": 1}),
                         parse_params(["lr=0.01,0.001"]), rank_by="f1_macro,accuracy")
    board = read(tmp_path / "g" / "leaderboard.csv")
    assert list(board[0])[:4] == ["rank", "trial", "val_f1_macro", "val_accuracy"]
    keys = [(-float(r["val_f1_macro"]), -float(r["val_accuracy"])) for r in board]
    assert keys == sorted(keys)
    best = json.loads((tmp_path / "g" / "best.json").read_text())
    assert best["rank_by"] == ["val_f1_macro", "val_accuracy"] == result["rank_by"]
    assert best["best_trial"] == board[0]["trial"] and best["val_accuracy"] == float(board[0]["val_accuracy"])


def write_best(grid_dir, params, trial="trial_001"):
    grid_dir.mkdir(parents=True, exist_ok=True)
    (grid_dir / "best.json").write_text(json.dumps({"best_trial": trial, "params": params, "test": None}))
    return grid_dir


CHAIN = [{"name": "model1", "freeze": "backbone"}, {"name": "model2", "epochs": 1}]


def test_cv_takes_a_chains_settings_from_its_grids_winners(tmp_path):
    from imgclf.workflows.cv import with_grid_winners

    config = tiny_config(tmp_path, tmp_path / "cv", train={"optimizer": "adam", "eps": 1e-7}, stages=CHAIN)
    one = write_best(tmp_path / "g1", {"optimizer": "adagrad", "initial_accumulator_value": 0.1, "lr": 0.001,
                                       "batch_size": 16, "epochs": 3, "augment": "light"})
    two = write_best(tmp_path / "g2", {"optimizer": "sgd", "eps": None, "lr": 0.01})
    chained = with_grid_winners(config, [f"model1={one}", f"1={two}"])
    first, second = chained.stages
    assert (first.optimizer, first.initial_accumulator_value, first.lr, first.batch_size, first.epochs) == \
        ("adagrad", 0.1, 0.001, 16, 3)
    assert (second.optimizer, second.eps, second.lr, second.epochs) == ("sgd", None, 0.01, 1)
    assert chained.augment.preset == "light" and chained.train.lr == config.train.lr  # not a stage field: the chain's
    plain = with_grid_winners(tiny_config(tmp_path, tmp_path / "cv"), [str(write_best(tmp_path / "g3", {"lr": 0.5}))])
    assert plain.train.lr == 0.5


@pytest.mark.parametrize("content,message", [
    ("{not json", "best.json is damaged"),
    ('{"best_trial": "t", "params": [1]}', "params"),
    ('{"best_trial": "t", "params": {"__class__": 1}}', "best.json: params: grid setting '__class__' is not a config"),
    ('{"best_trial": "t", "params": {"lr": "fast"}}', "lr"),
    ('{"best_trial": "t", "params": {"stages.0.lr": 0.1}}', "varied stages.0.lr, a stage of its own config"),
])
def test_a_tampered_best_json_is_a_one_line_error(tmp_path, content, message):
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "best.json").write_text(content)
    config = tiny_config(tmp_path, tmp_path / "cv", stages=CHAIN)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(config.model_dump()))
    result = run_cli("cv", tmp_path, "--config", path, "--from-grid", f"model1={tmp_path / 'g'}", timeout=60)
    assert_clean_error(result, message)
    assert not (tmp_path / "cv" / "fold_0").exists()


def test_two_grids_that_disagree_on_a_shared_setting_are_an_error(tmp_path):
    from imgclf.workflows.cv import with_grid_winners

    config = tiny_config(tmp_path, tmp_path / "cv", stages=CHAIN)
    one, two = write_best(tmp_path / "a", {"augment": "none"}), write_best(tmp_path / "b", {"augment": "light"})
    with pytest.raises(ConfigError, match="augment is 'none' in .* but 'light' in"):
        with_grid_winners(config, [f"model1={one}", f"model2={two}"])
    # the value given on the command line is kept, from either grid: the error's "pass the value"
    assert with_grid_winners(config, [f"model1={two}", f"model2={two}"], frozenset({"augment.preset"})).augment.preset \
        == "none" == config.augment.preset
    assert with_grid_winners(config, [f"model1={two}", f"model2={two}"]).augment.preset == "light"
    lr = write_best(tmp_path / "c", {"lr": 0.5})
    assert with_grid_winners(config, [f"model1={lr}"], frozenset({"train.lr"})).stages[0].lr == config.stages[0].lr
    assert with_grid_winners(config, [f"model1={lr}"]).stages[0].lr == 0.5
    with pytest.raises(ConfigError, match="no such stage"):
        with_grid_winners(config, [f"model9={one}"])


@pytest.mark.slow
def test_grid_then_cv_from_its_winner_on_the_command_line(tmp_path, pool_dataset):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(tiny_config(pool_dataset, tmp_path / "x", train={"epochs": 1}).model_dump()))
    grid = run_cli("grid", pool_dataset, "--config", path, "--param", "lr=0.01,0.002", "--rank-by",
                   "f1_macro,accuracy", "--out", tmp_path / "g", timeout=300)
    assert grid.returncode == 0, grid.stderr
    assert "val_f1_macro=" in grid.stdout and "val_accuracy=" in grid.stdout
    best = json.loads((tmp_path / "g" / "best.json").read_text())
    cv = run_cli("cv", pool_dataset, "--config", path, "--folds", "2", "--from-grid", tmp_path / "g",
                 "--out", tmp_path / "cv", timeout=300)
    assert cv.returncode == 0, cv.stderr
    for fold in ("fold_0", "fold_1"):
        assert Run(tmp_path / "cv" / fold).config.train.lr == best["params"]["lr"]


def test_a_folder_that_no_experiment_wrote_is_not_written_into(tmp_path, pool_dataset):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.csv").write_text("precious\n")
    with pytest.raises(ConfigError, match="already holds files .summary.csv. that no imgclf cv wrote"):
        cross_validate(tiny_config(pool_dataset, mine, train={"epochs": 1}), folds=2)
    with pytest.raises(ConfigError, match="that no imgclf grid wrote"):
        grid_search(tiny_config(pool_dataset, mine, train={"epochs": 1}), parse_params(["lr=0.1,0.01"]))
    assert sorted(p.name for p in mine.iterdir()) == ["summary.csv"] and (mine / "summary.csv").read_text() == \
        "precious\n"


@pytest.mark.parametrize("planted", ["splits", "fold_0", "trials", "trials/trial_000"])
def test_a_link_planted_inside_an_experiment_is_refused_before_anything_is_written_through_it(
        tmp_path, pool_dataset, planted):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    kind = "grid" if planted.startswith("trials") else "cv"
    out = tmp_path / kind
    out.mkdir()
    (out / "experiment.json").write_text(json.dumps({"kind": kind}))
    (out / planted).parent.mkdir(parents=True, exist_ok=True)
    (out / planted).symlink_to(elsewhere)
    config = tiny_config(pool_dataset, out, train={"epochs": 1})
    with pytest.raises(RunDirError, match=f"{planted} is a symbolic link or a file, not a folder of its own"):
        if kind == "cv":
            cross_validate(config, folds=2)
        else:
            grid_search(config, parse_params(["lr=0.1,0.01"]))
    assert list(elsewhere.iterdir()) == []


def test_fold_settings_the_data_cannot_take_leave_no_folder_behind(tmp_path, pool_dataset):
    config = tiny_config(pool_dataset, tmp_path / "cv", train={"epochs": 1})
    with pytest.raises(ConfigError, match="needs at least 2 folds"):
        cross_validate(config, folds=1)
    with pytest.raises(DataError, match="--group-column 'patient' needs a CSV dataset"):
        cross_validate(config, folds=2, group_column="patient")
    with pytest.raises(DataError, match=r"--folds 1000: .* holds \d+ images; give at most"):
        cross_validate(config, folds=1000)
    lonely = tmp_path / "lonely"
    shutil.copytree(pool_dataset, lonely)
    for extra in sorted((lonely / "top bar").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(DataError, match="class 'top bar' of .* has 1 image: the fold that tests it would train"):
        cross_validate(tiny_config(lonely, tmp_path / "cv"), folds=2)
    odd = tmp_path / "odd"
    shutil.copytree(pool_dataset, odd)
    source = next((odd / "top bar").iterdir())
    os.rename(source, os.path.join(os.fsencode(source.parent), b"n\xff.png"))
    with pytest.raises(DataError, match=r"n\\xff.png: its name is not UTF-8 text, and cv lists"):
        cross_validate(tiny_config(odd, tmp_path / "cv"), folds=2)
    assert not (tmp_path / "cv").exists()


def test_fold_folders_numbered_twice_are_refused_and_other_folders_are_said(tmp_path, caplog):
    for name in ("Fold0", "Fold1", "fold_1"):
        make_split_folders(tmp_path / "data" / name, {"train": 4, "valid": 2, "test": 2})
    config = tiny_config(tmp_path / "data", tmp_path / "cv", train={"epochs": 1})
    with pytest.raises(DataError, match=r"two folders for fold 1 \(Fold1, fold_1\): their test images would be "
                                        "pooled twice"):
        cross_validate(config)
    shutil.rmtree(tmp_path / "data" / "fold_1")
    (tmp_path / "data" / "extra").mkdir()
    caplog.set_level("WARNING")
    assert predefined_folds(tmp_path / "data") == [tmp_path / "data" / "Fold0", tmp_path / "data" / "Fold1"]
    assert "extra is not a Fold0..FoldK folder: not read" in caplog.text


def test_a_warning_every_trial_meets_is_printed_once(tmp_path):
    data = make_split_folders(tmp_path / "data", {"train": 6, "val": 2, "test": 2})
    path = tmp_path / "config.yaml"  # its val/test fractions: moot for a dataset with its own splits
    path.write_text(json.dumps(tiny_config(data, tmp_path / "x", train={"epochs": 1}).model_dump()))
    grid = run_cli("grid", data, "--config", path, "--param", "lr=0.01,0.002", "--out", tmp_path / "g")
    assert grid.returncode == 0, grid.stderr
    moot = [line for line in grid.stderr.splitlines() if "no effect" in line and "has its own splits" in line]
    assert len(moot) == 1 and "--val-fraction 0.2" in moot[0], grid.stderr


def test_settings_given_twice_are_refused_and_a_configs_out_is_the_experiments(tmp_path, pool_dataset):
    error = assert_clean_error
    error(run_cli("grid", pool_dataset, "--lr", "0.01", "--param", "lr=0.1,0.2", "--out", tmp_path / "g"),
          "train.lr: set on the command line, and the grid sets other values; drop one")
    error(run_cli("grid", pool_dataset, "--lr", "0.01", "--param", "lr=0.01", "--param", "epochs=1", "--out",
                  tmp_path / "g", "--rank-by", "bogus"), "--rank-by 'bogus'")  # the same value: nothing replaced
    (tmp_path / "grid.yaml").write_text("lr: [1e-3]\n")  # YAML reads 1e-3 as a string; the trial takes 0.001
    error(run_cli("grid", pool_dataset, "--lr", "0.001", "--grid", tmp_path / "grid.yaml", "--out", tmp_path / "g",
                  "--rank-by", "bogus"), "--rank-by 'bogus'")
    error(run_cli("grid", pool_dataset, "--param", "out=a,b", "--out", tmp_path / "g"),
          "grid out: not a setting a grid varies")
    for command in ("cv", "grid", "train"):
        error(run_cli(command, pool_dataset, "--data", tmp_path / "other", "--out", tmp_path / "g"),
              f"DATA {pool_dataset} and --data {tmp_path / 'other'}: give the dataset once")
    assert not (tmp_path / "g").exists()
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(tiny_config(pool_dataset, tmp_path / "from_config", train={"epochs": 1}).model_dump(
        mode="json")))
    result = run_cli("cv", "--config", path, "--folds", "2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "from_config" / "folds.csv").is_file() and not (tmp_path / "cv").exists()


def test_a_grid_setting_given_twice_is_refused_not_replaced(tmp_path):
    with pytest.raises(ConfigError, match=r"lr is varied twice \(axes lr and train.lr\)"):
        parse_params(["lr=0.1,0.2", "train.lr=0.3"])  # both trials would have trained at 0.3
    with pytest.raises(ConfigError, match="grid setting 'lr' is given twice"):
        parse_params(["lr=0.1,0.2", "lr=0.3"])
    (tmp_path / "grid.yaml").write_text("lr: [0.5, 0.6]\n")
    with pytest.raises(ConfigError, match="grid setting 'lr' is given twice"):
        parse_params(["lr=0.1"], str(tmp_path / "grid.yaml"))
    # one value twice: two identical trials ranked as two (YAML reads 1e-3 as text; seeded apart, they looked unlike)
    for params, listed in ((["lr=1e-3, 0.001"], "0.001"), (["batch_size=16,16"], "16")):
        with pytest.raises(ConfigError, match=f"grid {params[0].split('=')[0]}: the value {listed} is listed twice"):
            parse_params(params)
    (tmp_path / "grid.yaml").write_text("lr: [1e-3, 0.001]\n")
    with pytest.raises(ConfigError, match="grid lr: the value 0.001 is listed twice"):
        parse_params([], str(tmp_path / "grid.yaml"))
    assert parse_params(["lr=1e-3,1e-2", "optimizer=adam,sgd"]) == {"lr": [0.001, 0.01], "optimizer": ["adam", "sgd"]}


@pytest.mark.parametrize("axis", ["split_seed=1,2", "val_fraction=0.2,0.3", "data.test_fraction=0.2,0.3"])
def test_a_grid_axis_that_would_change_the_split_is_refused(tmp_path, axis):
    """Trials are ranked on validation: with split_seed 1 and 2 each trial had its own val and test images."""
    config = tiny_config(tmp_path / "data", tmp_path / "g")
    name = axis.split("=")[0].rsplit(".", 1)[-1]
    with pytest.raises(ConfigError, match=rf"grid data.{name}: trial_000 has .*, trial_001 .*; all trials share one "
                                          rf"train/val/test split.*give data.{name} once"):
        trial_configs(config, parse_params([axis]), tmp_path / "g")
    seeds = trial_configs(config.model_copy(update={"data": config.data.model_copy(update={"split_seed": None})}),
                          parse_params(["seed=1,2"]), tmp_path / "g")  # the split follows the base seed, not these
    assert {t.data.split_seed for _, _, t in seeds} == {config.train.seed}
    assert not (tmp_path / "g").exists()
