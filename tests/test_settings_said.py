"""Settings a run cannot honour are said or refused, never dropped: an audit of every setting against every
mode (a threshold or plateau schedule with no validation split, feature-cache settings of a partly frozen
backbone, explicit default values the transfer recipe replaces, a classical head's resume and its unused
model flags, the grid winner's baselines, cv's pooled thresholds and pooled split folders)."""

import json
import logging
import shutil

import numpy as np
import pytest

import imgclf
from imgclf.config import build_config
from imgclf.config.stages import recipe_overrides, resolve_stages
from imgclf.data.index import build_index
from imgclf.errors import DataError, RunDirError
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.models.networks import resolve_preprocess
from imgclf.reporting.format import fmt, read_history
from imgclf.reporting.html import training_html
from imgclf.runs.manifest import INCOMPLETE
from imgclf.workflows.candidates import FINETUNE_CANDIDATE, candidate_config
from imgclf.workflows.classical import head_unused_settings
from imgclf.workflows.cv import pooled_predictions
from imgclf.workflows.folds import plan_folds
from imgclf.workflows.plan import plan_lines
from imgclf.workflows.settings import refuse_without_validation, unused_settings, warn_replaced_settings
from imgclf.workflows.train import resume_training

from conftest import tiny_config
from imagefactory import make_class_folders, make_split_folders

NO_VAL = {"val_fraction": 0.0, "test_fraction": 0.2}
NO_STOPPING = {"early_stopping": False, "restore_best": False, "epochs": 1}


@pytest.fixture
def logged(caplog):
    logger = get_logger()
    logger.addHandler(caplog.handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old_level)


@pytest.fixture
def two_classes(tmp_path):
    return make_class_folders(tmp_path / "data", per_class=10, classes=["cat", "dog"])


@pytest.mark.parametrize("sections,said", [
    ({"evaluate": {"threshold": "max_f1", "report": False}}, "--threshold max_f1 chooses the threshold on them"),
    ({"train": {**NO_STOPPING, "schedule": "plateau"}}, "--schedule plateau lowers the learning rate"),
])
def test_settings_that_read_validation_are_refused_without_it(tmp_path, two_classes, sections, said):
    config = tiny_config(two_classes, tmp_path / "run", data={"val_fraction": 0.0}, **{"train": NO_STOPPING,
                                                                                        **sections})
    with pytest.raises(DataError, match="no validation images") as err:
        imgclf.train(config)
    assert said in str(err.value) and "--val-fraction" in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before the run directory is made


def test_a_run_without_validation_still_trains_when_nothing_needs_it(tmp_path, two_classes):
    run = imgclf.train(tiny_config(two_classes, tmp_path / "run", data=NO_VAL, train=NO_STOPPING))
    assert "test" in run.metrics and "val" not in run.metrics


def test_a_lone_last_feature_row_is_left_out_where_the_head_s_batchnorm_trains_and_that_is_said(tmp_path, logged):
    """It was a ValueError from BatchNorm1d ('more than 1 value per channel'): the cached-feature loader kept it."""
    data = make_class_folders(tmp_path / "data", per_class=8)
    config = tiny_config(data, tmp_path / "run", model={"head_batchnorm": True}, augment={"preset": "light"},
                         train={"freeze": "backbone", "epochs": 1, "feature_views": 2})
    train_images = len(build_index(config.data, config.data.split_seed).subset("train"))
    batch = 2 * train_images - 1  # 2 views of each image: one row alone in the second batch
    imgclf.train(config.model_copy(update={"train": config.train.model_copy(update={"batch_size": batch})}))
    assert f"{2 * train_images} training feature rows in batches of {batch} leave one alone" in logged.text
    assert "training images in batches" not in logged.text  # the views are cached from every image


def test_feature_cache_settings_of_a_partly_frozen_backbone_are_said(tmp_path, pool_dataset, logged):
    imgclf.train(tiny_config(pool_dataset, tmp_path / "run", train={"freeze": "last:1", "feature_views": 3,
                                                                     "epochs": 1}))
    assert ("feature_views=3 has no effect: no stage freezes the whole backbone (last:1 trains part of it)"
            in logged.text)
    logged.clear()  # a stage that freezes it whole reads the setting: the next stage's last:1 is no news
    stages = [{"name": "head", "freeze": "backbone", "epochs": 1}, {"name": "some", "freeze": "last:1", "epochs": 1}]
    imgclf.train(tiny_config(pool_dataset, tmp_path / "two", stages=stages, train={"feature_views": 3}))
    assert "has no effect" not in logged.text


def test_a_frozen_backbone_reads_its_feature_settings_without_a_warning(tmp_path, pool_dataset, logged):
    imgclf.train(tiny_config(pool_dataset, tmp_path / "run", train={"freeze": "backbone", "feature_views": 2,
                                                                     "epochs": 1}))
    assert "has no effect" not in logged.text and "head trained on cached features" in logged.text


def test_typed_defaults_that_the_transfer_recipe_replaces_are_named():
    typed = build_config({"model": {"name": "resnet18", "pretrained": True},
                          "train": {"lr": 0.001, "freeze": "none", "freeze_bn": False}})
    assert recipe_overrides(typed) == {"freeze": {"head": "backbone"}, "freeze_bn": {"finetune": True},
                                       "lr": {"finetune": 1e-4}}
    # a config rebuilt from a whole dump (a run's config.yaml, a cv fold's) counts only values off the defaults
    assert recipe_overrides(build_config(typed.model_dump())) == {}
    off = build_config({**typed.model_dump(), "train": {**typed.train.model_dump(), "lr": 0.01}})
    assert recipe_overrides(off) == {"lr": {"head": 0.001, "finetune": 1e-4}}
    older = typed.model_dump()  # a run's config.yaml from before a train field existed: still a dump
    del older["train"]["average_best"]
    assert recipe_overrides(build_config({**older, "versions": {"imgclf": "0.1"}})) == {}
    # a classical head trains no stage: no recipe replaces anything
    assert recipe_overrides(build_config({"model": {"name": "resnet18", "pretrained": True, "head": "svm"},
                                          "train": {"lr": 0.001}})) == {}
    # a value the recipe uses anyway is no news: --freeze-bn is what its fine-tune does
    assert recipe_overrides(build_config({"model": {"name": "resnet18", "pretrained": True},
                                          "train": {"freeze_bn": True}})) == {}


def test_a_setting_every_stage_replaces_is_said_only_when_a_stage_differs():
    stages = [{"name": "a", "lr": 0.01}, {"name": "b", "lr": 0.001}]
    config = build_config({"train": {"lr": 0.001}, "stages": stages})
    assert any("--lr 0.001 reaches no stage" in line for line in unused_settings(config, [("a", config.train)]))
    same = build_config({"train": {"lr": 0.01}, "stages": [{"name": "a", "lr": 0.01}]})
    assert not any("reaches no stage" in line for line in unused_settings(same, [("a", same.train)]))


def test_a_stage_s_own_setting_it_cannot_read_is_said_even_where_another_stage_reads_that_setting():
    """Both were silent: the run-wide checks warn only when no stage at all reads the setting."""
    stages = [{"name": "head", "freeze": "backbone", "backbone_lr_mult": 0.1},
              {"name": "all", "freeze": "none", "feature_views": 3, "feature_cache": False}]
    config = build_config({"model": {"name": "resnet18"}, "stages": stages})
    lines = unused_settings(config, resolve_stages(config))
    assert "warning: stage head: backbone_lr_mult=0.1 has no effect: the stage freezes the backbone" in lines
    assert ("warning: stage all: feature_views=3 and feature_cache=False has no effect: the stage trains the backbone "
            "(none), and only a frozen backbone's features are cached") in lines
    read = build_config({"model": {"name": "resnet18"}, "stages": [{**stages[0], "backbone_lr_mult": 1.0,
                                                                     "feature_views": 3}, {"name": "all"}]})
    assert not any("stage head" in line or "stage all" in line for line in unused_settings(read, resolve_stages(read)))


def test_min_delta_without_a_best_epoch_to_pick_is_said():
    config = build_config({"train": {"min_delta": 0.01, **NO_STOPPING}})
    assert any("min_delta=0.01 has no effect" in line for line in unused_settings(config, [("t", config.train)]))
    kept = build_config({"train": {"min_delta": 0.01}})
    assert not any("min_delta" in line for line in unused_settings(kept, [("t", kept.train)]))


def test_weights_map_without_a_weights_file_and_recipe_replacements_are_said(logged):
    warn_replaced_settings(build_config({"model": {"name": "resnet18", "pretrained": True, "weights_map": "name"},
                                         "train": {"lr": 0.001}}))
    assert "--weights-map name has no effect without --weights FILE" in logged.text
    assert "these settings do not apply there: --lr 0.001 (stage finetune: 0.0001)" in logged.text
    logged.clear()
    warn_replaced_settings(build_config({"model": {"name": "resnet18", "pretrained": True},
                                         "train": {"freeze_bn": False}}))
    assert "--no-freeze-bn (stage finetune: True)" in logged.text
    logged.clear()
    warn_replaced_settings(build_config({"model": {"name": "resnet18", "weights": "/w.pth", "weights_map": "name"}}))
    assert logged.text == ""


def test_a_classical_head_names_the_model_flags_it_cannot_apply():
    config = build_config({"model": {"name": "resnet18", "head": "svm", "binary_head": "sigmoid", "dropout": 0.3,
                                     "head_batchnorm": True}})
    assert {"--binary-head sigmoid", "--dropout 0.3", "--head-batchnorm"} <= set(head_unused_settings(config, "svm"))
    assert head_unused_settings(build_config({"model": {"head": "svm"}}), "svm") == []
    # --init-from requires the source run's head layout, whose trained layers the features pass through
    chained = build_config({**config.model_dump(), "train": {"init_from": "/runs/a"}})
    assert head_unused_settings(chained, "svm") == []


def test_tta_is_said_to_skip_the_per_epoch_validation():
    config = build_config({"evaluate": {"tta": "flip"}})
    lines = plan_lines(config, resolve_preprocess(config.model, 16, 1, "bilinear"),
                       [("train", config.train)], None)
    assert any("--tta flip" in line and "per-epoch validation" in line for line in lines)


def test_a_resumed_classical_head_is_fitted_again_on_its_saved_split(tmp_path, pool_dataset, logged):
    config = tiny_config(pool_dataset, tmp_path / "run", model={"name": "simple_cnn", "conv_filters": [8],
                                                                "head": "logreg"})
    imgclf.train(config)
    with pytest.raises(RunDirError, match="has finished: --resume continues a killed or failed run"):
        resume_training(tmp_path / "run")
    split = (tmp_path / "run" / "split.csv").read_text()
    (tmp_path / "run" / INCOMPLETE).write_text("")  # as a kill leaves it
    shutil.copy(next((pool_dataset / "left bar").iterdir()), pool_dataset / "left bar" / "added later.png")
    run = resume_training(tmp_path / "run")
    assert "--head logreg has no epochs to continue: fitted again on the run's saved split" in logged.text
    assert (tmp_path / "run" / "split.csv").read_text() == split  # not a fresh scan (it would hold the new image)
    assert not (tmp_path / "run" / INCOMPLETE).exists() and "test" in run.metrics
    assert "replacing its files" not in logged.text


def _fold_run(folder, paths, true, probs, decided, root=None):
    folder.mkdir()
    Predictions(paths, ["neg", "pos"], np.array(true), np.array(probs), np.array(decided)).to_csv(
        folder / "predictions_test.csv")
    (folder / "dataset.json").write_text(json.dumps({"root": str(root or folder / "data")}))
    return folder


def test_pooled_out_of_fold_decisions_keep_each_folds_threshold(tmp_path):
    # each fold decided "pos" at its own low threshold, though argmax says "neg"
    a = _fold_run(tmp_path / "a", ["x.png", "y.png"], [1, 0], [[0.7, 0.3], [0.9, 0.1]], [1, 0])
    b = _fold_run(tmp_path / "b", ["z.png"], [1], [[0.6, 0.4]], [1])
    pooled = pooled_predictions([a, b])
    assert pooled.pred.tolist() == [1, 0, 1]
    assert pooled_predictions([a]).probs.argmax(axis=1).tolist() == [0, 0]  # what argmax would have said


def test_pooled_predictions_of_fold_folders_name_each_image_where_it_is_and_say_one_tested_twice(tmp_path, logged):
    """A fold folder's runs list test/cat/1.png: two folds' rows read alike, and a copy of one image in two folds'
    test folders was counted twice without a word."""
    for fold in ("Fold0", "Fold1"):
        (tmp_path / "data" / fold / "test").mkdir(parents=True)
        (tmp_path / "data" / fold / "test" / "1.png").write_bytes(b"the same image")
    (tmp_path / "data" / "Fold1" / "test" / "2.png").write_bytes(b"another image")
    runs = [_fold_run(tmp_path / f"fold_{i}", paths, [1] * len(paths), [[0.4, 0.6]] * len(paths), [1] * len(paths),
                      tmp_path / "data" / f"Fold{i}") for i, paths in enumerate([["test/1.png"],
                                                                                  ["test/1.png", "test/2.png"]])]
    pooled = pooled_predictions(runs)
    assert pooled.paths == [str(tmp_path / "data" / f) for f in ("Fold0/test/1.png", "Fold1/test/1.png",
                                                                   "Fold1/test/2.png")]
    assert (f"1 image(s) were tested by more than one fold (byte-identical files, e.g. fold_0:"
            f"{tmp_path / 'data' / 'Fold0' / 'test' / '1.png'} = fold_1:") in logged.text


def test_cv_over_a_datasets_own_split_says_it_pools_it(tmp_path, logged):
    data = make_split_folders(tmp_path / "data", {"train": 4, "val": 2, "test": 2})
    plan_folds(tiny_config(data, tmp_path / "cv"), 2)
    assert "cv pools the 24 images of" in logged.text and "(test+train+val) into 2 folds" in logged.text
    logged.clear()
    plan_folds(tiny_config(make_class_folders(tmp_path / "pool", 4), tmp_path / "cv2"), 2)
    assert "cv pools" not in logged.text


def test_a_resumed_run_from_before_the_refusals_is_warned_not_blocked(logged):
    config = build_config({"train": {**NO_STOPPING, "schedule": "plateau"}, "evaluate": {"threshold": "youden"}})
    refuse_without_validation(config, [("train", config.train)], resumed=True)
    assert "do nothing: --schedule plateau" in logged.text and "--threshold youden chooses" in logged.text
    with pytest.raises(DataError, match="or pass --threshold argmax"):
        refuse_without_validation(config, [("train", config.train)])
    stopping = build_config({"train": {"schedule": "plateau"}})  # early stopping was refused before, and still is
    with pytest.raises(DataError, match="early stopping and restore-best need them"):
        refuse_without_validation(stopping, [("train", stopping.train)], resumed=True)


def test_a_default_candidate_keeps_what_was_typed_so_the_recipe_names_it(tmp_path):
    base = build_config({"data": {"path": str(tmp_path)}, "train": {"lr": 0.001}})
    finetune = candidate_config(base, FINETUNE_CANDIDATE, tmp_path / "c")
    assert recipe_overrides(finetune) == {"lr": {"finetune": 1e-4}}
    assert finetune.train.lr == 0.001 and finetune.train.feature_views == 2  # the candidate's own views kept


def test_the_summary_and_report_name_the_monitor_and_whether_the_best_epoch_was_kept(tmp_path, pool_dataset):
    """report.html showed the lowest val loss whatever --monitor was, and summary.md a 'best epoch' whose weights
    --no-restore-best had not kept."""
    train = {"epochs": 3, "monitor": "val_accuracy", "early_stopping": False, "restore_best": False}
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "run", train=train))
    history = read_history(run.path / "history.csv")
    best = max(history, key=lambda row: row["val_accuracy"])["epoch"]  # the first of equals, as the stopper
    summary = (run.path / "summary.md").read_text()
    assert f"- best epoch by val_accuracy: {best}; the model keeps the last epoch's weights" in summary
    page = training_html(run.path, "val_accuracy")
    assert "best val_<wbr>accuracy" in page and "best val loss" not in page
    assert f"<td>{fmt(max(row['val_accuracy'] for row in history))}</td>" in page


def test_a_split_without_a_class_says_its_macro_scores_count_that_class_as_zero(tmp_path, logged):
    data = make_split_folders(tmp_path / "data", {"train": 6, "val": 3, "test": 3})
    shutil.rmtree(data / "val" / "left bar")
    run = imgclf.train(tiny_config(data, tmp_path / "run", train={"epochs": 1}))
    assert ("val has no image of class(es) 'left bar': their precision, recall and F1 count as 0 in val's macro "
            "averages (balanced accuracy leaves them out)") in logged.text
    assert run.metrics["val"]["per_class"]["left bar"]["support"] == 0
    assert "test has no image" not in logged.text
