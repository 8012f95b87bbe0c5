"""Baselines on the run's own validation and test images: the majority class and the linear probe."""

import json
import logging
import os

import numpy as np
import pytest

from clitools import run_main
from imgclf.config import build_config
from imgclf.errors import RunDirError
from imgclf.reporting.html import training_seconds
from imgclf.runs.files import read_baselines, read_metrics
from imgclf.workflows import baselines, probecache
from imgclf.workflows.autoselect import CLOSING_S, Pace
from imgclf.workflows.baselines import (
    MAJORITY_NAME,
    PROBE_NAME,
    baseline_rows,
    majority_row,
    stratified_sample,
    write_baselines,
)
from imgclf.workflows.lifecycle import setup_run

from imagefactory import make_class_folders


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Three classes, 'top bar' holding three times the images of the others (so the majority is known)."""
    root = tmp_path_factory.mktemp("baselines")
    data = make_class_folders(root / "data", 8, classes=["left bar", "right bar"])
    make_class_folders(root / "more", 24, classes=["top bar"])
    (root / "more" / "top bar").rename(data / "top bar")
    config = build_config({"data": {"path": str(data), "image_size": 64, "val_fraction": 0.25,
                                    "test_fraction": 0.25}, "out": str(root / "run")})
    return setup_run(config)


def test_the_majority_row_always_predicts_the_most_frequent_training_class(setup):
    row = majority_row(setup.prepared, ["val", "test"], None)
    val = setup.index.subset("val")
    share = float(np.mean(val.targets == setup.index.classes.index("top bar")))
    assert row["name"] == MAJORITY_NAME and "'top bar'" in row["note"]
    assert row["val"]["accuracy"] == pytest.approx(share) and row["val"]["n"] == len(val)
    assert row["val"]["balanced_accuracy"] == pytest.approx(1 / 3)
    assert "per_class" not in row["val"]  # rows keep the scalar metrics a table shows


def test_the_linear_probe_learns_what_the_majority_cannot(setup):
    rows = baseline_rows(setup.prepared, setup.preprocess, setup.compute, setup.config, ["val", "test"])
    majority, probe = rows
    assert probe["name"] == PROBE_NAME and probe["note"].startswith("logistic regression, C=")
    assert probe["val"]["f1_macro"] > majority["val"]["f1_macro"]
    assert probe["test"]["n"] == len(setup.index.subset("test")) and probe["seconds"] > 0


def test_the_probe_fits_on_a_stratified_sample_beyond_its_limit_and_says_so(setup, monkeypatch):
    monkeypatch.setattr(baselines, "PROBE_MAX_TRAIN", 6)
    monkeypatch.setattr(baselines, "PROBE_MIN_PER_CLASS", 2)
    targets = setup.index.subset("train").targets
    sample = stratified_sample(targets, 6, seed=0)
    assert len(sample) < len(targets) and np.all(np.diff(sample) > 0)
    kept = np.bincount(targets[sample], minlength=len(setup.index.classes))
    assert kept.min() >= 2 and kept.argmax() == np.bincount(targets).argmax()  # each class 2+, the largest largest
    np.testing.assert_array_equal(sample, stratified_sample(targets, 6, seed=0))
    probe = baseline_rows(setup.prepared, setup.preprocess, setup.compute, setup.config, ["val"])[1]
    assert f"fitted on a stratified {len(sample)} of the {len(targets)} training images" in probe["note"]
    assert probe["val"]["n"] == len(setup.index.subset("val"))  # val is scored in full


def test_a_small_class_keeps_all_its_images_in_the_sample():
    targets = np.array([0] * 1000 + [1] * 5 + [2] * 300)
    sample = stratified_sample(targets, 200, seed=1)
    counts = np.bincount(targets[sample])
    assert counts[1] == 5 and counts[0] > counts[2] > 20 and len(sample) <= 200 + 3 + 20
    assert np.array_equal(stratified_sample(targets[:50], 200, seed=1), np.arange(50))  # under the limit: all


def test_no_baseline_skips_the_probe_and_no_val_skips_it_with_a_reason(setup):
    config = setup.config.model_copy(update={"evaluate": setup.config.evaluate.model_copy(update={"baseline": False})})
    rows = baseline_rows(setup.prepared, setup.preprocess, setup.compute, config, ["val"])
    assert [r["name"] for r in rows] == [MAJORITY_NAME]
    rows = baseline_rows(setup.prepared, setup.preprocess, setup.compute, setup.config, ["test"])
    assert rows[1]["note"].startswith("skipped: no validation images") and "test" not in rows[1]


def test_baselines_live_beside_the_splits_of_metrics_json(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"val": {"n": 4, "accuracy": 0.5, "f1_macro": 0.4}}))
    rows = [{"name": MAJORITY_NAME, "role": "baseline", "val": {"n": 4, "accuracy": 0.5, "f1_macro": 0.5},
             "seconds": 0.1, "note": ""}]
    write_baselines(tmp_path, rows)
    assert read_metrics(tmp_path / "metrics.json") == {"val": {"n": 4, "accuracy": 0.5, "f1_macro": 0.4}}
    assert read_baselines(tmp_path / "metrics.json") == rows


@pytest.mark.parametrize("tampered", [[{"name": "x", "role": "oracle"}], {"not": "a list"},
                                      [{"name": "x", "role": "baseline", "val": {"n": -1}}],
                                      [{"name": "x" * 5000, "role": "baseline"}]])
def test_a_tampered_baselines_entry_is_one_line_naming_the_file(tmp_path, tampered):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"val": {"n": 4}, "baselines": tampered}))
    for read in (read_metrics, read_baselines):
        with pytest.raises(RunDirError, match=r"metrics\.json: baselines") as err:
            read(path)
        assert "\n" not in str(err.value)


@pytest.fixture
def logs(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)  # the CLI turns it off
    caplog.set_level("INFO")
    return caplog


def _entry(setup, splits, sample):
    return baselines.probe_cache_entry(setup.prepared, setup.preprocess, setup.compute, splits, sample)[0]


def _features(setup, splits, sample):
    return baselines.cached_probe_features(setup.prepared, setup.preprocess, setup.compute, 8, splits, sample)


def test_a_rerun_reads_the_probe_features_from_the_cache(setup, monkeypatch, logs):
    targets = setup.index.subset("train").targets
    sample = stratified_sample(targets, 6, seed=3)[1:]  # a sample, not the whole split, and not in order 0..n
    _entry(setup, ["val", "test"], sample).unlink(missing_ok=True)
    computed = _features(setup, ["val", "test"], sample)
    entry = _entry(setup, ["val", "test"], sample)
    assert entry.is_file() and computed["train"].shape == (len(sample), baselines.PROBE_FEATURES)

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran again")

    monkeypatch.setattr(baselines, "probe_features", no_backbone)
    cached = _features(setup, ["val", "test"], sample)
    assert list(cached) == ["train", "val", "test"] and "features read from the cache" in logs.text
    for split, values in computed.items():
        np.testing.assert_array_equal(cached[split], values)
    assert _entry(setup, ["val", "test"], sample[1:]) != entry  # another sample: another entry


@pytest.mark.parametrize("damage", ["truncate", "nan", "out of range", "float64", "fifo", "symlink", "folder",
                                    "garbage", "huge header"])
def test_a_damaged_probe_cache_entry_is_computed_again_with_a_one_line_warning(setup, damage, logs, tmp_path):
    sample = np.arange(len(setup.index.subset("train")))
    entry = _entry(setup, ["val"], sample)
    entry.unlink(missing_ok=True)
    good = _features(setup, ["val"], sample)
    stored = np.load(entry)
    entry.unlink()
    if damage == "truncate":
        np.save(entry, stored)
        entry.write_bytes(entry.read_bytes()[:-100])
    elif damage in ("nan", "out of range"):
        bad = stored.copy()
        bad[0, 0] = np.nan if damage == "nan" else 100.0
        np.save(entry, bad)
    elif damage == "float64":
        np.save(entry, stored.astype(np.float64))
    elif damage == "fifo":
        os.mkfifo(entry)
    elif damage == "symlink":
        np.save(tmp_path / "elsewhere.npy", stored)
        entry.symlink_to(tmp_path / "elsewhere.npy")
    elif damage == "folder":
        entry.mkdir()
    elif damage == "garbage":
        entry.write_bytes(b"\x93NUMPY garbage" * 50)
    else:
        entry.write_bytes(b"\x93NUMPY\x02\x00" + b"\xff\xff\xff\x7f" + b" " * 5_000_000)
    logs.clear()
    again = _features(setup, ["val"], sample)
    warnings = [r.getMessage() for r in logs.records if "feature cache entry" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0] and str(entry) in warnings[0]
    for split, values in good.items():
        np.testing.assert_array_equal(again[split], values)
    if damage != "folder":  # a folder in the way stays; the features are computed each time
        assert entry.is_file() and not entry.is_symlink()
        np.testing.assert_array_equal(np.load(entry), stored)  # rewritten whole
    else:
        entry.rmdir()


def test_the_budget_sets_aside_the_probe_s_sample_not_every_training_image():
    many = Pace(deadline=0.0, counts={"train": 50_000, "val": 100, "test": 100}, per_image=0.01)
    few = Pace(deadline=0.0, counts={"train": 500, "val": 100, "test": 100}, per_image=0.01)
    assert few.closing() == pytest.approx(CLOSING_S + 0.01 * (100 + 700))
    assert many.closing() == pytest.approx(CLOSING_S + 0.01 * (100 + 2 * baselines.PROBE_MAX_TRAIN + 200))


def _probe(setup, config=None):
    return baselines.probe_row(setup.prepared, setup.preprocess, setup.compute, config or setup.config,
                               ["val", "test"])


def _scores_file(setup):
    sample = stratified_sample(setup.index.subset("train").targets, baselines.PROBE_MAX_TRAIN, setup.config.train.seed)
    return probecache.row_file(_entry(setup, ["val", "test"], sample))


def _no_fit(*args, **kwargs):
    raise AssertionError("the probe was fitted again")


def test_a_rerun_reads_the_probe_s_scores_and_a_changed_setting_fits_again(setup, monkeypatch, logs):
    _scores_file(setup).unlink(missing_ok=True)
    fitted = _probe(setup)
    assert json.loads(_scores_file(setup).read_text())["val"] == fitted["val"]
    monkeypatch.setattr(baselines, "_fit_probe", _no_fit)
    read = _probe(setup)
    assert "scores read from the cache" in logs.text
    assert {k: v for k, v in read.items() if k != "seconds"} == {k: v for k, v in fitted.items() if k != "seconds"}
    assert setup.config.train.class_weight != "balanced"
    weighted = setup.config.model_copy(update={"train": setup.config.train.model_copy(
        update={"class_weight": "balanced"})})
    with pytest.raises(AssertionError, match="fitted again"):  # another fit: its key differs
        _probe(setup, weighted)


def test_the_probe_s_scores_are_keyed_by_labels_classes_and_settings(setup):
    targets = setup.index.subset("train").targets
    key = probecache.fit_key(setup.index, targets, ["val"], setup.config, baselines.ROW_METRICS)
    positive = setup.config.model_copy(update={"data": setup.config.data.model_copy(
        update={"positive_class": "top bar"})})
    others = [probecache.fit_key(setup.index, targets[::-1], ["val"], setup.config, baselines.ROW_METRICS),
              probecache.fit_key(setup.index, targets, ["val", "test"], setup.config, baselines.ROW_METRICS),
              probecache.fit_key(setup.index, targets, ["val"], positive, baselines.ROW_METRICS),
              probecache.fit_key(setup.index, targets, ["val"], setup.config, baselines.ROW_METRICS[:-1])]
    assert key == probecache.fit_key(setup.index, targets.copy(), ["val"], setup.config, baselines.ROW_METRICS)
    assert len({key, *others}) == 5


@pytest.mark.parametrize("damage", ["garbage", "extra field", "string score", "missing score", "nan", "above 1",
                                    "other count", "other C", "other splits", "fifo", "symlink", "folder", "huge"])
def test_a_damaged_probe_scores_entry_is_fitted_again(setup, damage, logs, tmp_path, monkeypatch):
    kept = _scores_file(setup)
    kept.unlink(missing_ok=True)
    fitted = _probe(setup)
    stored = json.loads(kept.read_text())
    kept.unlink()
    if damage == "garbage":
        kept.write_bytes(b"\xff{not json")
    elif damage not in ("fifo", "symlink", "folder", "huge"):
        val = stored["val"]
        changed = {"extra field": {**stored, "note": "<script>"},
                   "string score": {**stored, "val": {**val, "accuracy": "1.0"}},
                   "missing score": {**stored, "val": {k: v for k, v in val.items() if k != "f1_macro"}},
                   "nan": {**stored, "val": {**val, "f1_macro": float("nan")}},
                   "above 1": {**stored, "val": {**val, "accuracy": 1.5}},
                   "other count": {**stored, "val": {**val, "n": val["n"] + 1}},
                   "other C": {**stored, "C": 123.0},
                   "other splits": {k: v for k, v in stored.items() if k != "test"}}[damage]
        kept.write_text(json.dumps(changed))
    elif damage == "fifo":
        os.mkfifo(kept)
    elif damage == "symlink":
        (tmp_path / "elsewhere.json").write_text(json.dumps(stored))
        kept.symlink_to(tmp_path / "elsewhere.json")
    elif damage == "folder":
        kept.mkdir()
    else:
        kept.write_text(json.dumps(stored) + " " * 10_000_000)
    logs.clear()
    again = _probe(setup)
    assert again["val"] == fitted["val"] and again["test"] == fitted["test"] and again["note"] == fitted["note"]
    warnings = [r.getMessage() for r in logs.records if "probe cache entry" in r.getMessage()]
    if damage == "other splits":  # a valid row of another fit: replaced without a warning
        assert warnings == []
    else:
        assert len(warnings) == 1 and "\n" not in warnings[0] and str(kept) in warnings[0]
    if damage == "folder":  # a folder in the way stays; the probe is fitted each time
        kept.rmdir()
    else:
        assert kept.is_file() and not kept.is_symlink() and json.loads(kept.read_text()) == stored


def test_train_prints_its_own_training_seconds_beside_the_baselines(tmp_path):
    """The terminal's comparison said 'n/a' for this run where report.html gave its seconds."""
    data = make_class_folders(tmp_path / "data", 10)
    result = run_main("train", data, "--model", "simple_cnn", "--epochs", "2", "--image-size", "16", "--no-report",
                      "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    own = next(line for line in result.stdout.splitlines() if line.strip().startswith("this run"))
    assert own.split()[-1] == f"{training_seconds(tmp_path / 'run'):.3f}"
