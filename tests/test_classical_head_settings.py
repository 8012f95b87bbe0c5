"""A classical head as a notebook calls it: a fixed parameter (head_param, no search) on raw features
(head_scale: false), e.g. the blood-cell notebook's plain SVC(). Issue 16 follow-ups, item 4."""

import csv
import json
import zipfile

import numpy as np
import pytest
import yaml

import imgclf
from imgclf.config import build_config
from imgclf.errors import ConfigError, RunDirError
from imgclf.runs.base import load_run
from imgclf.runs.heads import HEAD_FILE, make_head, save_head
from imgclf.runs.safehead import load_head
from imgclf.workflows.classical import head_unused_settings

from conftest import tiny_config


@pytest.mark.parametrize("kind,value", [("svm", 1.0), ("logreg", 1.0), ("knn", 3), ("rf", 20)])
def test_an_unscaled_head_round_trips_and_only_as_the_config_says(tmp_path, kind, value):
    rng = np.random.default_rng(0)
    x, y = rng.normal(5, 3, size=(40, 6)), np.arange(40) % 3
    head = make_head(kind, value, 0, False, y, scale=False).fit(x, y)
    assert [type(step).__name__ for _, step in head.steps] == [type(head.steps[-1][1]).__name__]
    save_head(head, tmp_path / HEAD_FILE)
    loaded = load_head(tmp_path / HEAD_FILE, kind, 6, 3, scaled=False)
    np.testing.assert_array_equal(loaded.predict_proba(x), head.predict_proba(x))
    assert load_head(tmp_path / HEAD_FILE, kind, scaled=False) is not None  # width from the estimator itself
    with pytest.raises(RunDirError, match=f"not the StandardScaler \\+ {kind} pipeline"):
        load_head(tmp_path / HEAD_FILE, kind, 6, 3)  # the config says scaled: a file without it is refused
    with pytest.raises(RunDirError, match="inconsistent"):
        load_head(tmp_path / HEAD_FILE, kind, 7, 3, scaled=False)  # a head for another backbone width
    save_head(make_head(kind, value, 0, False, y).fit(x, y), tmp_path / "scaled.skops")
    with pytest.raises(RunDirError, match=f"not the unscaled \\(head_scale: false\\) {kind} pipeline"):
        load_head(tmp_path / "scaled.skops", kind, 6, 3, scaled=False)


def test_head_settings_without_a_classical_head_are_errors():
    with pytest.raises(ConfigError, match="head_param applies only to --head svm, logreg, knn or rf"):
        build_config({"train": {"head_param": 1.0}})
    with pytest.raises(ConfigError, match="head_scale applies only to"):
        build_config({"train": {"head_scale": False}})
    with pytest.raises(ConfigError, match="head_param=2.5 is the knn head's n_neighbors: give a whole number"):
        build_config({"model": {"head": "knn"}, "train": {"head_param": 2.5}})
    with pytest.raises(ConfigError, match="head_param=2001 trees for the rf head: at most 2000"):
        build_config({"model": {"head": "rf"}, "train": {"head_param": 2001}})
    assert build_config({"model": {"head": "rf"}, "train": {"head_param": 2000}}).train.head_param == 2000


def test_a_head_file_whose_schema_is_over_the_cap_is_refused_before_it_is_parsed(tmp_path, monkeypatch):
    from imgclf.runs import safehead

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 4)), np.arange(30) % 3
    save_head(make_head("rf", 30, 0, False, y).fit(x, y), tmp_path / HEAD_FILE)
    assert load_head(tmp_path / HEAD_FILE, "rf", 4, 3) is not None
    with zipfile.ZipFile(tmp_path / HEAD_FILE) as archive:
        schema_size = archive.getinfo("schema.json").file_size  # ~15 kB a tree: 30 trees, ~0.5 MB
    monkeypatch.setattr(safehead, "MAX_SCHEMA_BYTES", schema_size - 1)
    monkeypatch.setattr(safehead.json, "loads", lambda *a, **k: pytest.fail("parsed an over-size schema"))
    with pytest.raises(RunDirError, match="schema.json is over 0 MB, far more than a head imgclf writes"):
        load_head(tmp_path / HEAD_FILE, "rf", 4, 3)


def test_a_plain_svc_on_raw_features_trains_once_and_is_recorded(tmp_path, pool_dataset):
    config = tiny_config(pool_dataset, tmp_path / "svc", model={"head": "svm"},
                         train={"head_param": 1.0, "head_scale": False})
    run = imgclf.train(config)
    with open(run.path / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["param"] for r in rows] == ["C=1.0"]  # no search: the one given value
    recorded = yaml.safe_load((run.path / "config.yaml").read_text())["train"]
    assert (recorded["head_param"], recorded["head_scale"]) == (1.0, False)
    reloaded = load_run(run.path)
    steps = reloaded.head.steps
    assert len(steps) == 1 and steps[0][1].estimator.C == 1.0  # Platt-calibrated SVC(C=1), no StandardScaler
    preds = reloaded.predict([pool_dataset])
    assert preds.probs.shape == (42, 3) and np.allclose(preds.probs.sum(1), 1)


def test_max_seconds_or_a_sampler_with_a_scikit_learn_head_says_it_has_no_effect(tmp_path, pool_dataset, caplog):
    caplog.set_level("INFO")
    config = tiny_config(pool_dataset, tmp_path / "r", model={"head": "logreg"},
                         train={"max_seconds": 30, "sampler": "weighted"})
    imgclf.train(config)
    assert "--max-seconds 30 has no effect with --head logreg" in caplog.text
    assert "--sampler weighted has no effect with --head logreg" in caplog.text


def test_every_setting_a_scikit_learn_head_cannot_apply_is_named(tmp_path):
    """Fitted once on un-augmented features: epochs, optimizer, stages and augmentation do nothing, and
    k-nearest neighbours take no class weights. Each such setting is named in the warning."""
    config = tiny_config(tmp_path, tmp_path / "r", model={"head": "knn"}, augment={"preset": "light",
                                                                                    "rotation_range": 20},
                         train={"class_weight": "balanced", "label_smoothing": 0.1, "average_best": 3,
                                "compile": True}, stages=[{"name": "a", "epochs": 2}])
    unused = head_unused_settings(config, "knn")
    assert {"--label-smoothing", "--average-best", "--compile", "--rotation-range", "--epochs", "--lr", "--stage",
            "--class-weight balanced"} <= set(unused)
    assert not {"--batch-size", "--seed", "--augment"} & set(unused)  # embedding batches; light is the default
    assert "--class-weight balanced" not in head_unused_settings(config, "logreg")
    assert head_unused_settings(build_config({"model": {"head": "svm"}}), "svm") == []


def test_more_neighbours_than_training_images_is_said_and_recorded_as_used(tmp_path, pool_dataset, caplog):
    caplog.set_level("INFO")
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", model={"head": "knn"}, train={"head_param": 500}))
    n_train = sum(json.loads((run.path / "dataset.json").read_text())["counts"]["train"].values())
    assert f"knn n_neighbors=500: more than the {n_train} training images" in caplog.text
    assert load_head(run.path / HEAD_FILE, "knn")[-1].n_neighbors == n_train
    first = next(csv.DictReader(open(run.path / "history.csv")))
    assert first["param"] == f"n_neighbors={n_train}"
