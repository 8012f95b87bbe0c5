import csv
import json
import logging
import shutil

import numpy as np
import pytest
import timm
import torch
from torch import nn

import imgclf
from imgclf.cli import main
from imgclf.data.index import build_index
from imgclf.errors import ConfigError, RunDirError
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import setup_logging
from imgclf.runs.base import load_run
from imgclf.runs.ensemble import combine
from imgclf.runs.heads import HEAD_FILE
from imgclf.runs.safehead import load_head
from imgclf.training.averaging import BestWeights, average_if_better
from imgclf.workflows.ensemble import check_members, create_ensemble, fit_weights
from imgclf.workflows.grid import grid_search, parse_params

from conftest import tiny_config
from imagefactory import make_class_folders, make_grouped_csv


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three different models on one dataset and one split: two CNNs and an SVM on CNN features."""
    base = tmp_path_factory.mktemp("members")
    data = make_class_folders(base / "data", per_class=16)
    shared = {"data": {"split_seed": 7}}
    return [imgclf.train(tiny_config(data, base / "wide", train={"epochs": 4}, **shared)),
            imgclf.train(tiny_config(data, base / "narrow", model={"conv_filters": [4, 8]},
                                     train={"epochs": 4, "seed": 3}, **shared)),
            imgclf.train(tiny_config(data, base / "svm", model={"head": "svm"}, **shared))]


def test_soft_weighted_and_majority_votes():
    a = np.array([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]])
    b = np.array([[0.6, 0.4], [0.8, 0.2], [0.45, 0.55]])
    c = np.array([[0.3, 0.7], [0.7, 0.3], [0.1, 0.9]])
    np.testing.assert_allclose(combine([a, b], "soft"), (a + b) / 2)
    np.testing.assert_allclose(combine([a, b], "weighted", [0.25, 0.75]), 0.25 * a + 0.75 * b)
    votes = combine([a, b, c], "majority")
    np.testing.assert_allclose(votes.sum(1), 1)
    assert votes.argmax(1).tolist() == [0, 0, 1] and votes[2, 1] == pytest.approx(1, abs=1e-5)
    tie = combine([a[:1], c[:1]], "majority")  # one vote each: the mean probability decides
    assert tie.argmax(1).tolist() == [0] and tie[0, 0] == pytest.approx(0.5, abs=1e-5)


def test_fitted_weights_favour_the_member_that_is_right():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    good = np.full((300, 3), 0.1)
    good[np.arange(300), y] = 0.8
    noise = rng.dirichlet(np.ones(3), 300)
    w = fit_weights([noise, good], y)
    assert w.sum() == pytest.approx(1) and (w >= 0).all() and w[1] > 0.9


def test_ensemble_is_a_run_whose_probabilities_are_the_members_mean(members, tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(["ensemble", *(str(m.path) for m in members), "--out", str(out)]) == 0
    assert "soft-vote ensemble of 3 runs" in capsys.readouterr().out
    ensemble = load_run(out)
    parts = [Predictions.from_csv(m.path / "predictions_test.csv") for m in members]
    got = Predictions.from_csv(out / "predictions_test.csv")
    assert all(p.paths == got.paths for p in parts)
    np.testing.assert_allclose(got.probs, np.mean([p.probs for p in parts], axis=0), atol=1e-9)
    assert ensemble.metrics["test"]["n"] == len(got.paths)
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "soft-vote ensemble of 3 runs" in page and 'id="plots-test"' in page and "no single model" in page
    assert main(["evaluate", str(out), "--split", "val"]) == 0
    assert main(["explain", str(out), str(members[0].index().abspath(0))]) == 2
    assert "no single model" in capsys.readouterr().err
    assert main(["predict", str(out), str(members[0].index().abspath(0)), "--out", str(tmp_path / "p.csv")]) == 0
    with open(tmp_path / "p.csv") as fh:
        row = next(csv.DictReader(fh))
    single = [m.predict([members[0].index().abspath(0)]).probs[0] for m in members]
    assert float(row[f"prob_{ensemble.classes[0]}"]) == pytest.approx(np.mean(single, axis=0)[0])
    folder = members[0].index().root  # class sub-folders: the ensemble says where its true labels came from
    assert ensemble.predict([folder]).label_note.startswith("true labels from the class sub-folders of")


def test_weighted_and_majority_ensembles(members, tmp_path):
    weighted = create_ensemble([m.path for m in members], tmp_path / "w", "weighted")
    assert weighted.spec.fitted_on == "val" and sum(weighted.spec.weights) == pytest.approx(1)
    val = [m.probabilities("val") for m in members]
    best_single = min(_log_loss(v) for v in val)
    assert weighted.metrics["val"]["log_loss"] <= best_single + 1e-6  # fitted on val: never worse there
    majority = create_ensemble([m.path for m in members], tmp_path / "m", "majority")
    assert set(majority.metrics) == {"val", "test"}


def _log_loss(preds: Predictions) -> float:
    return float(-np.log(np.clip(preds.probs[np.arange(len(preds.true)), preds.true], 1e-12, 1)).mean())


def test_members_must_share_classes_and_split(members, tmp_path):
    data = members[0].index().root
    other_split = imgclf.train(tiny_config(data, tmp_path / "other", train={"epochs": 1}, data={"split_seed": 8}))
    with pytest.raises(ConfigError, match="split its images differently"):
        create_ensemble([members[0].path, other_split.path], tmp_path / "bad")
    two = make_class_folders(tmp_path / "two", per_class=10, classes=["a", "b"])
    other_classes = imgclf.train(tiny_config(two, tmp_path / "ab", train={"epochs": 1}))
    with pytest.raises(ConfigError, match="classes"):
        create_ensemble([members[0].path, other_classes.path], tmp_path / "bad2")
    with pytest.raises(ConfigError, match="at least two"):
        create_ensemble([members[0].path], tmp_path / "bad3")


@pytest.mark.parametrize("head", ["svm", "logreg", "knn", "rf"])
def test_classical_heads_choose_their_parameter_on_val_and_work_like_any_run(tmp_path, pool_dataset, head):
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / head, model={"head": head}))
    with open(run.path / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) >= 2 and all(r["param"] for r in rows)  # the validation grid, one row per value
    assert run.metrics["test"]["accuracy"] >= 0.8
    reloaded = load_run(run.path)
    preds = reloaded.predict([pool_dataset])
    assert preds.probs.shape == (42, 3) and np.allclose(preds.probs.sum(1), 1)
    saved = Predictions.from_csv(run.path / "predictions_test.csv")
    again = reloaded.probabilities("test")
    np.testing.assert_allclose(again.probs, saved.probs, atol=1e-6)


def test_a_head_file_with_foreign_types_is_refused(tmp_path, members):
    from skops.io import dump

    dump({"head": Foreign()}, tmp_path / HEAD_FILE)
    with pytest.raises(RunDirError, match="refusing to load"):
        load_head(tmp_path / HEAD_FILE, "svm")


class Foreign:
    pass


def test_classical_heads_compete_in_the_grid(tmp_path, pool_dataset):
    result = grid_search(tiny_config(pool_dataset, tmp_path / "g", train={"epochs": 3}),
                         parse_params(["head=linear,logreg"]))
    assert sorted(r["param_head"] for r in result["leaderboard"]) == ["linear", "logreg"]
    assert result["test"] is not None


def test_features_npz_holds_embeddings_labels_and_paths(members, tmp_path):
    run = members[0]
    assert main(["features", str(run.path), "--out", str(tmp_path / "f.npz")]) == 0
    z = np.load(tmp_path / "f.npz")
    index = run.index()
    assert z["features"].shape == (len(index), 16) and z["labels"].tolist() == index.targets.tolist()
    assert z["paths"].tolist() == [str(p) for p in index.paths] and z["classes"].tolist() == list(index.classes)
    with torch.no_grad():
        image = run.probabilities("test")  # the same model: features feed the head's logits
    assert image.probs.shape[1] == 3
    assert main(["features", "resnet10t", str(index.root), "--image-size", "32", "--out", str(tmp_path / "r.npz")]) == 0
    named = np.load(tmp_path / "r.npz")
    assert named["features"].shape == (len(index), 512)
    default = imgclf.build_config({"data": {"path": str(index.root)}}).data  # what `imgclf train DATA` splits by
    expected = build_index(default, default.split_seed)
    assert dict(zip(named["paths"].tolist(), named["splits"].tolist(), strict=True)) == \
        dict(zip(map(str, expected.paths), expected.splits, strict=True))  # was seed 0: 21 of 48 moved


def test_features_of_other_images_with_a_grouped_run_splits_them_at_random_and_says_so(tmp_path, caplog,
                                                                                      monkeypatch):
    make_grouped_csv(tmp_path, 8, lambda n: f"p{n // 2}", column="patient")
    data = tmp_path / "images"
    run = imgclf.train(tiny_config(tmp_path / "labels.csv", tmp_path / "run", train={"epochs": 1},
                                   data={"group_column": "patient"}))
    setup_logging()
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)
    # a folder has no patient column: it was "needs a CSV dataset", so no other dataset could be embedded
    assert main(["features", str(run.path), str(data), "--out", str(tmp_path / "f.npz")]) == 0
    assert "the run's --group-column patient is its own CSV's; these images are split at random" in caplog.text


def test_features_of_a_backbone_too_small_for_its_input_is_one_line(members, tmp_path, capsys):
    root = str(members[0].index().root)
    assert main(["features", "simple_cnn", root, "--image-size", "4", "--out", str(tmp_path / "f.npz")]) == 2
    err = capsys.readouterr().err  # was a RuntimeError's traceback from the first batch
    assert "image_size 4 is too small for simple_cnn" in err and "Traceback" not in err
    assert "--conv-filters" not in err  # a train flag: features takes no layers
    assert not (tmp_path / "f.npz").exists()


def test_features_of_a_named_backbone_come_from_the_weights_asked_for(members, tmp_path, capsys, caplog, monkeypatch):
    """--weights is loaded (an all-zero state dict gives all-zero embeddings); with neither it nor --pretrained
    the backbone is random, and the command says so. A run embeds as trained: backbone flags are refused."""
    root = str(members[0].index().root)
    zeros = tmp_path / "zeros.pt"
    torch.save({k: torch.zeros_like(v) for k, v in timm.create_model("resnet10t", num_classes=0).state_dict().items()},
               zeros)
    argv = ["features", "resnet10t", root, "--image-size", "32", "--out"]
    setup_logging()  # as the CLI does first (it turns propagation off), so that the patch below holds
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)
    assert main([*argv, str(tmp_path / "zero.npz"), "--weights", str(zeros)]) == 0
    assert "random" not in caplog.text
    assert main([*argv, str(tmp_path / "random.npz")]) == 0
    assert "weights are random" in caplog.text
    assert not np.load(tmp_path / "zero.npz")["features"].any() and np.load(tmp_path / "random.npz")["features"].any()
    assert main(["features", str(members[0].path), "--image-size", "32", "--out", str(tmp_path / "x.npz")]) == 2
    assert "drop --image-size" in capsys.readouterr().err and not (tmp_path / "x.npz").exists()
    assert main([*argv, str(tmp_path / "y.npz"), "--pretrained", "--weights", str(zeros)]) == 2
    assert "keep one" in capsys.readouterr().err


def test_weight_averaging_keeps_the_average_only_when_validation_agrees():
    model = nn.Linear(2, 1, bias=False)
    bests = BestWeights(3)
    for epoch, value in enumerate([1.0, 2.0, 6.0], 1):
        model.weight.data.fill_(value)
        bests.add(model, epoch)
    assert bests.epochs == [1, 2, 3] and bests.average()["weight"].flatten().tolist() == [3.0, 3.0]

    class Runner:  # validation loss is the distance of the weight from a target
        def __init__(self, target):
            self.target = target
            self.config = imgclf.build_config({"train": {"monitor": "val_loss"}})

        def validate(self):
            return {"val_loss": abs(model.weight.data[0, 0].item() - self.target)}

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        model.weight.data.fill_(6.0)
        assert average_if_better(model, bests, Runner(3.0), {}, Path(tmp) / "m.safetensors")
        assert model.weight.data[0, 0].item() == 3.0 and (Path(tmp) / "m.safetensors").is_file()
        model.weight.data.fill_(6.0)
        assert not average_if_better(model, bests, Runner(6.0), {}, Path(tmp) / "n.safetensors")
        assert model.weight.data[0, 0].item() == 6.0  # the best epoch stays


def test_a_run_with_weight_averaging_is_never_worse_than_its_best_epoch_on_val(tmp_path, pool_dataset):
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "avg", train={"epochs": 8, "average_best": 3}))
    with open(run.path / "history.csv") as fh:
        best_epoch_loss = min(float(r["val_loss"]) for r in csv.DictReader(fh))
    assert run.metrics["val"]["log_loss"] <= best_epoch_loss + 1e-4


def test_a_classical_head_sits_on_the_given_backbone_weights(members, tmp_path):
    from safetensors.torch import load_file

    source = members[0]
    data = source.index().root
    head = {"head": "logreg", "weights": str(source.path / "model.safetensors")}
    run = imgclf.train(tiny_config(data, tmp_path / "on_cnn", model=head))
    given, used = load_file(source.path / "model.safetensors"), load_file(run.path / "model.safetensors")
    backbone = [k for k in given if k.startswith("backbone.")]
    assert backbone and all(torch.equal(given[k], used[k]) for k in backbone)


def test_runs_trained_with_different_seeds_share_a_split_and_ensemble(tmp_path, pool_dataset):
    """The split does not follow --seed: retraining for seed variance or an ensemble needs no --split-seed."""
    one = imgclf.train(tiny_config(pool_dataset, tmp_path / "s1", train={"epochs": 2, "seed": 1}))
    two = imgclf.train(tiny_config(pool_dataset, tmp_path / "s2", train={"epochs": 2, "seed": 2}))
    assert (one.path / "split.csv").read_bytes() == (two.path / "split.csv").read_bytes()
    assert not np.array_equal(next(one.model.parameters()).detach(), next(two.model.parameters()).detach())
    ensemble = create_ensemble([one.path, two.path], tmp_path / "ens")
    assert ensemble.metrics["test"]["n"] == one.metrics["test"]["n"]


def test_members_scored_otherwise_than_the_first_are_named(members, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)  # an in-process CLI call turns it off
    caplog.set_level(logging.WARNING, logger="imgclf")
    first, other = load_run(members[0].path), load_run(members[1].path)
    check_members([first, other])
    assert "scores as" not in caplog.text
    other.__dict__["config"] = other.config.model_copy(update={"evaluate": other.config.evaluate.model_copy(
        update={"bootstrap": 7})})
    check_members([first, other])
    assert f"the ensemble scores as {first.path} does" in caplog.text and "bootstrap 7" in caplog.text


def test_a_member_replaced_or_changed_after_the_ensemble_was_made_is_refused(members, tmp_path, caplog, monkeypatch):
    """ensemble.json kept only the members' paths: another run copied to a member's path was used without a word,
    with the weights, threshold and metrics fitted on the old one."""
    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(members[0].path, first)
    shutil.copytree(members[1].path, second)
    images = str(members[0].index().root)
    ensemble = create_ensemble([first, second], tmp_path / "ens", "soft", evaluate_test=False)
    assert len(load_run(ensemble.path).predict([images]).paths) > 0  # as made: it predicts
    shutil.rmtree(second)
    shutil.copytree(members[2].path, second)  # another run, same classes and split, at the member's path
    with pytest.raises(RunDirError, match=f"ensemble member {second} changed since the ensemble was made"):
        load_run(ensemble.path).predict([images])
    spec = json.loads((ensemble.path / "ensemble.json").read_text())
    spec.pop("member_seals")  # an ensemble made before the seals were recorded: still opens, and says so
    (ensemble.path / "ensemble.json").write_text(json.dumps(spec))
    assert main(["seal", str(ensemble.path)]) == 0
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)  # main() set its own handler
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert len(load_run(ensemble.path).members) == 2
    assert "was made before imgclf recorded its members' seals" in caplog.text
