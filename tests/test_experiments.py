"""Cross-validation, grid search and their execution backends, on tiny data."""

import csv
import json
import shutil

import pytest

import imgclf
import imgclf.workflows.summary
from imgclf.errors import ConfigError
from imgclf.evaluation.metrics import compute_metrics
from imgclf.evaluation.predictions import Predictions
from imgclf.runs.network import NetworkRun as Run
from imgclf.workflows.cv import cross_validate
from imgclf.workflows.grid import grid_search, parse_params

from conftest import tiny_config
from imagefactory import make_class_folders, make_split_folders


def read(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def without_time(rows):
    return [{k: v for k, v in r.items() if k not in ("seconds", "run")} for r in rows]


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
    cross_validate(tiny_config(tmp_path / "data", tmp_path / "cv", train={"epochs": 2}))
    folds = read(tmp_path / "cv" / "folds.csv")
    assert len(folds) == 3
    split = read(tmp_path / "cv" / "fold_1" / "split.csv")
    assert sum(r["split"] == "test" for r in split) == 6 and all("valid" not in r["path"] or r["split"] == "val"
                                                                  for r in split)


def test_group_kfold_keeps_a_patient_in_one_fold(tmp_path):
    images = make_class_folders(tmp_path / "data" / "images", 12)
    rows = [[p.relative_to(tmp_path / "data").as_posix(), p.parent.name, f"patient{n // 3}"]
            for n, p in enumerate(sorted(q for q in images.rglob("*") if q.is_file()))]
    with open(tmp_path / "data" / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "group"], *rows])
    cross_validate(tiny_config(tmp_path / "data" / "labels.csv", tmp_path / "cv", train={"epochs": 2}), folds=3,
                   group_column="group")
    group_of = {str((tmp_path / "data" / p).resolve()): g for p, _, g in rows}
    fold_of_group: dict[str, set] = {}
    for i in range(3):
        for r in read(tmp_path / "cv" / "splits" / f"fold_{i}.csv"):
            if r["split"] == "test":
                fold_of_group.setdefault(group_of[str((tmp_path / "data" / r["path"]).resolve())], set()).add(i)
    assert fold_of_group and all(len(folds) == 1 for folds in fold_of_group.values())


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
    splits = {(trials / t / "split.csv").read_text() for t in ("trial_000", "trial_003")}
    assert len(splits) == 1  # every trial is judged on the same val (and test) images


def test_grid_resumes_finished_trials(tmp_path, pool_dataset, monkeypatch):
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


@pytest.mark.parametrize("backend", ["processes", "ray"])
def test_backends_give_the_sequential_results(tmp_path, pool_dataset, backend):
    if backend == "ray":
        pytest.importorskip("ray")
    grid = parse_params(["lr=0.01,0.001"])
    config = tiny_config(pool_dataset, tmp_path / "seq", train={"epochs": 2})
    seq = grid_search(config, grid)
    par = grid_search(config.model_copy(update={"out": str(tmp_path / backend)}), grid, backend=backend, n_jobs=2)
    assert without_time(seq["leaderboard"]) == without_time(par["leaderboard"])


def test_cv_resumes_after_a_killed_fold(tmp_path, pool_dataset, monkeypatch):
    config = tiny_config(pool_dataset, tmp_path / "cv", train={"epochs": 2})
    first = cross_validate(config, folds=2)
    (tmp_path / "cv" / "fold_1" / "result.json").unlink()  # fold 1 died before finishing
    trained = []
    real_train = imgclf.workflows.summary.train  # the name a fold or trial job calls
    monkeypatch.setattr(imgclf.workflows.summary, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    second = cross_validate(config, folds=2)
    assert len(trained) == 1 and without_time(first["folds"]) == without_time(second["folds"])


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
