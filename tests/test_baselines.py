"""Baselines on the run's own validation and test images: the majority class and the linear probe."""

import json
import logging
import os

import numpy as np
import pytest

from imgclf.config import build_config
from imgclf.errors import RunDirError
from imgclf.runs.files import read_baselines, read_metrics
from imgclf.workflows import baselines
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
    assert set(np.bincount(targets[sample])) >= {2} and np.bincount(targets[sample]).argmax() == np.bincount(
        targets).argmax()  # each class at least 2, the largest class still the largest
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


def _newest_probe_entry(setup):
    return max(setup.prepared.decoded.file.parent.glob("*.probe.npy"), key=lambda p: p.stat().st_mtime_ns)


def test_a_rerun_reads_the_probe_features_from_the_cache(setup, monkeypatch, logs):
    first = baseline_rows(setup.prepared, setup.preprocess, setup.compute, setup.config, ["val", "test"])[1]
    entry = _newest_probe_entry(setup)
    assert np.load(entry).shape[1] == baselines.PROBE_FEATURES

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran again")

    monkeypatch.setattr(baselines, "probe_features", no_backbone)
    again = baseline_rows(setup.prepared, setup.preprocess, setup.compute, setup.config, ["val", "test"])[1]
    assert again["val"] == first["val"] and again["test"] == first["test"]
    assert "features read from the cache" in logs.text


@pytest.mark.parametrize("damage", ["truncate", "nan", "fifo", "garbage"])
def test_a_damaged_probe_cache_entry_is_computed_again_with_a_warning(setup, damage, logs):
    baseline_rows(setup.prepared, setup.preprocess, setup.compute, setup.config, ["val"])
    entry = _newest_probe_entry(setup)
    good = np.load(entry)
    if damage == "truncate":
        entry.write_bytes(entry.read_bytes()[:-100])
    elif damage == "nan":
        bad = good.copy()
        bad[0, 0] = np.nan
        np.save(entry, bad)
    elif damage == "fifo":
        entry.unlink()
        os.mkfifo(entry)
    else:
        entry.write_bytes(b"\x93NUMPY garbage" * 50)
    row = baseline_rows(setup.prepared, setup.preprocess, setup.compute, setup.config, ["val"])[1]
    assert "feature cache entry" in logs.text and "damaged" in logs.text
    assert row["val"]["f1_macro"] >= 0 and np.array_equal(np.load(entry), good)  # rewritten whole
