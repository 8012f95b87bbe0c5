"""Issue 16 items 9-10: compare, per-epoch train/val precision-recall-F1, explain --layers, predict with true
labels from class sub-folders, audit of Fold0..FoldK, and what train prints at its end."""

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import imgclf
from clitools import assert_clean_error, run_main
from clitools import imgclf as imgclf_cli
from imgclf.cli import main
from imgclf.config import config_to_yaml
from imgclf.data.audit import audit_dataset
from imgclf.errors import RunDirError
from imgclf.evaluation.metrics import macro_scores
from imgclf.models.objective import Objective
from imgclf.reporting.compare import compare_runs
from imgclf.reporting.explain import Explainer, keras_names
from imgclf.runtime import Compute
from imgclf.training.fit import train_one_epoch
from imgclf.workflows.ensemble import create_ensemble

from conftest import tiny_config
from imagefactory import make_class_folders, make_split_folders

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1"
PER_EPOCH = ("precision_macro", "recall_macro", "f1_macro")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two runs on one split: the default simple CNN, and a narrower one without BatchNorm (conv -> ReLU)."""
    base = tmp_path_factory.mktemp("two")
    data = make_class_folders(base / "data", per_class=14)
    wide = imgclf.train(tiny_config(data, base / "wide", train={"epochs": 4}))
    plain = imgclf.train(tiny_config(data, base / "plain", model={"conv_filters": [4, 8], "conv_batchnorm": False},
                                     train={"epochs": 3}))
    return data, wide, plain


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def error_line(capsys, *args) -> str:
    """In-process CLI run that must fail with exit 2 and one ``imgclf: error:`` line (a subprocess costs seconds
    of torch import; each command's first error case goes through ``clitools`` instead)."""
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("imgclf: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- per-epoch precision, recall and F1 ------------------------------------------------------------------------

def test_history_records_macro_precision_recall_f1_for_train_and_val(two_runs):
    _, wide, _ = two_runs
    history = read_csv(wide.path / "history.csv")
    for split in ("train", "val"):
        for name in PER_EPOCH:
            values = [float(row[f"{split}_{name}"]) for row in history]
            assert len(values) == 4 and all(0 <= v <= 1 for v in values), (split, name)


def test_train_scores_come_from_the_epochs_own_predictions():
    """With lr 0 and no dropout or BatchNorm the epoch's predictions are the model's: the scores must match."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images, targets = torch.randn(20, 3, 2, 2), torch.randint(0, 3, (20,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets, torch.arange(20)),
                                         batch_size=6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    row = train_one_epoch(model, Objective(3), loader, optimizer, Compute(torch.device("cpu")), "test")
    expected = macro_scores(targets.numpy(), model(images).argmax(1).numpy(), 3)
    assert {k.removeprefix("train_"): v for k, v in row.items() if k.endswith("_macro")} == pytest.approx(expected)
    assert row["train_accuracy"] == pytest.approx(float((model(images).argmax(1) == targets).float().mean()))


# -- compare ------------------------------------------------------------------------------------------------------

def test_compare_writes_a_table_overlaid_curves_and_one_page(two_runs, tmp_path, capsys):
    _, wide, plain = two_runs
    assert main(["compare", str(wide.path), str(plain.path), "--out", str(tmp_path / "cmp")]) == 0
    printed = capsys.readouterr().out
    rows = {r["run"]: r for r in read_csv(tmp_path / "cmp" / "compare.csv")}
    assert set(rows) == {"wide", "plain"}
    for name, run in (("wide", wide), ("plain", plain)):
        row = rows[name]
        total = sum(p.numel() for p in run.model.parameters())
        assert int(row["parameters"]) == total == int(row["trainable_parameters"])  # one stage, nothing frozen
        history = read_csv(run.path / "history.csv")
        assert int(row["epochs"]) == len(history)
        assert float(row["training_seconds"]) == pytest.approx(sum(float(h["seconds"]) for h in history), abs=0.01)
        for split in ("val", "test"):
            for metric in ("accuracy", "f1_macro", "f1_weighted", "roc_auc_ovr"):
                assert float(row[f"{split}_{metric}"]) == pytest.approx(run.metrics[split][metric])
    assert int(rows["wide"]["parameters"]) > int(rows["plain"]["parameters"])
    for name in ("loss", "accuracy", *PER_EPOCH):
        assert (tmp_path / "cmp" / f"curves_{name}.png").stat().st_size > 5000, name
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page) and "<script" not in page
    assert page.count("data:image/png;base64,") == len(list((tmp_path / "cmp").glob("curves_*.png")))
    assert "<th>wide</th><th>plain</th>" in page and "different" not in page  # same split: no warning
    assert "parameters" in printed and re.search(r"test accuracy\s+\d\.\d{4}\s+\d\.\d{4}", printed)
    # what makes the runs differ, read off config.yaml (compare showed only their sizes and scores)
    assert "setting model.conv_filters differs: wide [8, 16], plain [4, 8]" in printed
    assert "setting train.epochs differs: wide 4, plain 3" in printed and "data.path" not in printed
    assert "Settings that differ" in page and "model.conv_filters</td>" in page
    (tmp_path / "cmp" / "curves_auc_of_an_older_comparison.png").write_bytes(b"png")
    result = run_main("compare", wide.path, plain.path, "--out", tmp_path / "cmp", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "curves_auc_of_an_older_comparison.png in" in result.stderr and "compare.html does not show it" \
        in result.stderr


def test_compare_counts_an_ensembles_members_and_an_old_run(two_runs, tmp_path):
    _, wide, plain = two_runs
    ensemble = create_ensemble([wide.path, plain.path], tmp_path / "ens", "soft")
    old = tmp_path / "old"
    shutil.copytree(FIXTURE, old)
    result = compare_runs([wide.path, ensemble.path, old], tmp_path / "cmp")
    rows = {r["run"]: r for r in result["rows"]}
    members = sum(sum(p.numel() for p in r.model.parameters()) for r in (wide, plain))
    assert rows["ens"]["parameters"] == members and rows["ens"]["trainable_parameters"] is None
    assert rows["ens"]["epochs"] is None and rows["ens"]["training_seconds"] is None
    old_metrics = json.loads((old / "metrics.json").read_text())
    assert rows["old"]["epochs"] == 2 and rows["old"]["val_accuracy"] == old_metrics["val"]["accuracy"]
    assert any(p.endswith("curves_precision_macro.png") for p in result["curves"])  # 0.1 did not record it; wide did
    page = Path(result["html"]).read_text()
    assert "No epochs to draw for ens" in page
    assert any("different val images" in note for note in result["notes"])  # the old run has its own data


def test_compare_refuses_bad_requests_in_one_line(two_runs, tmp_path, capsys):
    _, wide, plain = two_runs
    assert_clean_error(imgclf_cli("compare", wide.path, "--out", tmp_path / "a", timeout=120), "two or more")
    assert "listed twice" in error_line(capsys, "compare", wide.path, wide.path, "--out", tmp_path / "a")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    assert "--overwrite" in error_line(capsys, "compare", wide.path, plain.path, "--out", tmp_path / "full")
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["mine.txt"]


def test_compare_names_a_damaged_history_file_and_line(two_runs, tmp_path):
    _, wide, plain = two_runs
    copy = tmp_path / "copy"
    shutil.copytree(plain.path, copy)
    rows = read_csv(copy / "history.csv")
    rows[1]["val_loss"] = "nan"
    write_csv(copy / "history.csv", rows)
    with pytest.raises(RunDirError, match=r"history.csv:3: val_loss is 'nan', not a finite number"):
        compare_runs([wide.path, copy], tmp_path / "cmp")
    rows[1]["val_loss"], rows[1]["epoch"] = "0.5", ""
    write_csv(copy / "history.csv", rows)
    with pytest.raises(RunDirError, match=r"history.csv:3: epoch is '', not an epoch number"):
        compare_runs([wide.path, copy], tmp_path / "cmp")
    for planted in ("-5", "0", "1.5"):  # a negative or fractional epoch was drawn as given
        rows[1]["epoch"] = planted
        write_csv(copy / "history.csv", rows)
        with pytest.raises(RunDirError, match=rf"history.csv:3: epoch is '{re.escape(planted)}', not an epoch number"):
            compare_runs([wide.path, copy], tmp_path / "cmp")
    rows[1]["epoch"] = "2"
    write_csv(copy / "history.csv", [{**row, **{f"val_m{k}": "0.5" for k in range(100)}} for row in rows])
    with pytest.raises(RunDirError, match=r"history.csv has 1\d\d columns, more than imgclf writes \(64 at most\)"):
        compare_runs([wide.path, copy], tmp_path / "cmp")  # each would have been a curves_val_mK.png
    (copy / "history.csv").unlink()
    os.mkfifo(copy / "history.csv")  # read as the report reads it: capped, regular files only, never waited on
    with pytest.raises(RunDirError, match=r"history.csv is not a regular file"):
        compare_runs([wide.path, copy], tmp_path / "cmp")


# -- explain --feature-maps --layers ------------------------------------------------------------------------------

def test_keras_names_follow_a_plain_conv_chain_and_point_at_the_activation():
    class VggLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(),
                                          nn.MaxPool2d(2), nn.Conv2d(4, 8, 3), nn.ReLU(), nn.MaxPool2d(2))
            self.pre_logits = nn.Conv2d(8, 16, 1)  # timm's VGG keeps fc6 as a conv: not part of the blocks

    assert keras_names(VggLike()) == {"block1_conv1": "features.1", "block1_conv2": "features.3",
                                      "block1_pool": "features.4", "block2_conv1": "features.6",
                                      "block2_pool": "features.7"}

    class ResNetLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.layer1 = nn.Conv2d(3, 4, 3), nn.Sequential(nn.Conv2d(4, 4, 3))

    assert keras_names(ResNetLike()) == {}  # no plain chain: no Keras names invented


def test_explain_draws_the_named_layers(two_runs, tmp_path, capsys):
    data, _, plain = two_runs
    image = next((data / "left bar").iterdir())
    explainer = Explainer(plain)
    chosen = explainer.resolve_layers(["block1_conv1", "backbone.features.0", "features.3"])
    assert chosen == [("block1_conv1", "features.1"), ("backbone.features.0", "features.0"),
                      ("features.3", "features.3")]
    (title, relu), (_, conv), (_, second) = explainer.feature_maps(image, chosen)
    assert title == "block1_conv1 (features.1): 4 of 4 channels"
    assert relu.shape == conv.shape == (4, 16, 16) and second.shape == (8, 8, 8)
    np.testing.assert_allclose(relu, np.maximum(conv, 0), atol=1e-6)  # Keras's block1_conv1 is after the ReLU
    assert main(["explain", str(plain.path), str(image), "--out", str(tmp_path / "ex"), "--feature-maps",
                 "--layers", "block1_conv1,block2_conv1"]) == 0
    assert "feature maps of block1_conv1, block2_conv1" in capsys.readouterr().out
    assert len(list((tmp_path / "ex").glob("*_features.png"))) == 1


def test_explain_layer_errors_are_one_line(two_runs, tmp_path, capsys):
    data, _, plain = two_runs
    image = next((data / "left bar").iterdir())
    result = imgclf_cli("explain", plain.path, image, "--out", tmp_path / "a", "--feature-maps", "--layers",
                        "features.O", timeout=120)
    assert_clean_error(result, "--layers features.O", "close names: features.0")
    assert "add --feature-maps" in error_line(capsys, "explain", plain.path, image, "--out", tmp_path / "b",
                                              "--layers", "features.0")
    assert not (tmp_path / "a").exists()  # refused before anything was written


# -- predict: true labels from class sub-folders ------------------------------------------------------------------

def test_predict_adds_true_labels_from_class_subfolders_and_says_so(two_runs, tmp_path, capsys):
    data, wide, _ = two_runs
    assert main(["predict", str(wide.path), str(data), "--out", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert f"true labels from the class sub-folders of {data}: true_label column added (accuracy" in out
    rows = read_csv(tmp_path / "p.csv")
    assert len(rows) == 42 and all(r["true_label"] == Path(r["path"]).parent.name for r in rows)
    accuracy = np.mean([r["true_label"] == r["predicted_label"] for r in rows])
    assert f"(accuracy {accuracy:.4f})" in out


def test_predict_on_a_subset_of_classes_is_labelled_and_other_folders_are_not(two_runs, tmp_path, capsys):
    data, wide, _ = two_runs
    some = tmp_path / "some"
    shutil.copytree(data / "top bar", some / "top bar")
    preds = wide.predict([some])
    assert preds.has_labels and set(preds.true.tolist()) == {wide.classes.index("top bar")}

    mixed = tmp_path / "mixed"
    shutil.copytree(data / "top bar", mixed / "top bar")
    shutil.copytree(data / "left bar", mixed / "unsure")
    assert main(["predict", str(wide.path), str(mixed), "--out", str(tmp_path / "m.csv")]) == 0
    out = capsys.readouterr().out
    assert f"predicted unlabelled: 'unsure' in {mixed} is not a class sub-folder of the run" in out
    assert "true_label" not in read_csv(tmp_path / "m.csv")[0]

    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((data / "top bar").iterdir()), flat / "x.png")
    assert main(["predict", str(wide.path), str(flat), "--out", str(tmp_path / "f.csv")]) == 0
    out = capsys.readouterr().out
    assert "unlabelled" not in out and "true labels" not in out  # a plain folder of images: nothing to say
    assert "true_label" not in read_csv(tmp_path / "f.csv")[0]


# -- audit of Fold0..FoldK ----------------------------------------------------------------------------------------

@pytest.fixture
def fold_data(tmp_path):
    """Three folds; one Fold0 train image copied into Fold0/test (leakage) and a Fold1 test image into Fold2/test."""
    root = tmp_path / "folds"
    for i in range(3):
        make_split_folders(root / f"Fold{i}", {"train": 4, "valid": 2, "test": 2}, classes=["a", "b"], seed=10 * i)
    shutil.copy(root / "Fold0" / "train" / "a" / "img 000.jpg", root / "Fold0" / "test" / "a" / "leak.jpg")
    shutil.copy(root / "Fold1" / "test" / "b" / "img 000.png", root / "Fold2" / "test" / "b" / "again.png")
    return root


def test_audit_reads_fold_folders_fold_by_fold(fold_data):
    report = audit_dataset(fold_data, near=False)
    assert report["layout"] == "folds" and report["folds"] == ["Fold0", "Fold1", "Fold2"]
    assert report["counts"]["Fold0/train"] == {"a": 4, "b": 4}
    assert report["counts"]["Fold0/test"] == {"a": 3, "b": 2} and report["counts"]["Fold2/test"] == {"a": 2, "b": 3}
    assert report["images"] == 3 * 16 + 2
    leaks = report["exact_duplicates_across_splits"]
    assert [sorted(s for s, _ in g) for g in leaks] == [["Fold0/test", "Fold0/train"]]
    overlap = report["test_overlap_across_folds"]
    assert [sorted(s for s, _ in g) for g in overlap] == [["Fold1/test", "Fold2/test"]]


def test_audit_reads_fold_folders_of_class_folders_as_cv_does_each_its_fold_s_test(tmp_path):
    """It refused them ('Fold0 has no train folder'), which cv trains on: fold K tests FoldK, the others train."""
    for i in range(3):
        make_class_folders(tmp_path / "folds" / f"Fold{i}", 3, classes=["a", "b"], seed=i)
    shutil.copy(tmp_path / "folds" / "Fold0" / "a" / "img 000.jpg", tmp_path / "folds" / "Fold2" / "a" / "again.jpg")
    report = audit_dataset(tmp_path / "folds", near=False)
    assert report["counts"]["Fold1/test"] == {"a": 3, "b": 3} and report["counts"]["Fold2/test"] == {"a": 4, "b": 3}
    assert [sorted(s for s, _ in g) for g in report["test_overlap_across_folds"]] == [["Fold0/test", "Fold2/test"]]


def test_audit_cli_prints_folds_and_strict_fails_on_leakage(fold_data, tmp_path, capsys):
    assert main(["audit", str(fold_data), "--no-near", "--strict", "--json", str(tmp_path / "a.json")]) == 1
    out = capsys.readouterr().out
    assert "(folds)" in out and "Fold0/train" in out
    assert re.search(r"Fold0: 17 images, leakage 1 exact group\(s\)", out)
    assert re.search(r"Fold1: 16 images, leakage 0 exact", out)
    assert "test split of two or more folds: 1 group(s)" in out
    written = json.loads((tmp_path / "a.json").read_text())
    assert written["layout"] == "folds"
    # --no-near: "not searched", never "0 pairs", which reads as "none found"
    assert "near duplicates: not searched (--no-near)" in out and "Fold1: 16 images, leakage 0 exact group(s), near " \
        "pairs not searched" in out and "0 near pair" not in out
    assert written["near_duplicate_pairs"] is None and written["near_duplicate_pairs_across_splits_per_fold"] is None
    assert main(["audit", str(fold_data / "Fold1"), "--no-near", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "near duplicates: not searched (--no-near)" in out and "0 pair(s)" not in out
    assert json.loads((tmp_path / "b.json").read_text())["near_duplicates_across_splits"] is None
    assert "no Fold0..FoldK folders" in error_line(capsys, "audit", fold_data / "Fold0", "--layout", "folds")


# -- train prints its val and test lines ---------------------------------------------------------------------------

def test_train_ends_with_the_val_and_test_lines(tmp_path, capsys, pool_dataset):
    config = tmp_path / "tiny.yaml"
    config.write_text(config_to_yaml(tiny_config(pool_dataset, tmp_path / "run", train={"epochs": 2})))
    assert main(["train", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert lines[0].startswith("val: n=") and f"accuracy={metrics['val']['accuracy']:.4f}" in lines[0]
    assert lines[1].startswith("test: n=") and f"f1_macro={metrics['test']['f1_macro']:.4f}" in lines[1]
    assert lines[-1] == f"run: {tmp_path / 'run'}"


def test_compare_says_when_the_same_names_were_read_under_different_folders(two_runs, tmp_path):
    """Same file names, other pixels: only the relative paths were compared, so nothing was said."""
    data, wide, plain = two_runs
    shutil.copytree(data, tmp_path / "copy")
    other = imgclf.train(tiny_config(tmp_path / "copy", tmp_path / "other", train={"epochs": 1}))
    notes = compare_runs([wide.path, other.path], tmp_path / "cmp")["notes"]
    assert any(f"test images have the same names but were read under different folders (wide: {data.resolve()}, "
               f"other: {(tmp_path / 'copy').resolve()})" in note for note in notes), notes
    assert not any("different folders" in note for note in compare_runs([wide.path, plain.path],
                                                                           tmp_path / "same")["notes"])
