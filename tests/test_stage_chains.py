"""Stage chains behave like separate trainings: what each stage starts from, its own batch size,
--init-from a whole trained run, classical heads on trained features, augmentation with a frozen
backbone, and the Keras optimizer settings (decay, rho). Issue 16, items 5, 6, 7 and 8."""

import csv
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import imgclf
import imgclf.training.stages
from clitools import assert_clean_error
from clitools import run_main as run_cli
from imgclf.config import TrainConfig, build_config, load_config
from imgclf.config.stages import recipe_overrides, resolve_stages
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.training.optim import build_optimizer, build_schedule, step_schedule

from conftest import tiny_config
from imagefactory import make_class_folders

FIXTURE_CONFIG = Path(__file__).parent / "fixtures" / "run_v0_1" / "config.yaml"
SOURCE_MODEL = {"dense_layers": [8]}  # a head with a hidden dense layer: what --init-from must carry over


@pytest.fixture
def logged(caplog):
    """Records of the imgclf logger, whatever an earlier in-process CLI call did to its propagation."""
    logger = get_logger()
    attach = not logger.propagate  # else its records reach caplog through the root logger already
    if attach:
        logger.addHandler(caplog.handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    if attach:
        logger.removeHandler(caplog.handler)
    logger.setLevel(old_level)


@pytest.fixture
def fit_spy(monkeypatch):
    """The model's weights just before and just after each stage's fit, in stage order."""
    snapshots = {"before": [], "after": []}
    real_fit = imgclf.training.stages.fit

    def spy(model, *args, **kwargs):
        snapshots["before"].append(state_of(model))
        history = real_fit(model, *args, **kwargs)
        snapshots["after"].append(state_of(model))
        return history

    monkeypatch.setattr(imgclf.training.stages, "fit", spy)
    return snapshots


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A trained network run (hidden dense layer of 8) to start other trainings from."""
    base = tmp_path_factory.mktemp("source")
    data = make_class_folders(base / "data", per_class=14)
    return imgclf.train(tiny_config(data, base / "run", model=SOURCE_MODEL, train={"epochs": 3}))


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Epoch 1 is the only best: val_accuracy can never gain 2.0, so later epochs' weights differ from the best.
ONLY_FIRST_IS_BEST = {"monitor": "val_accuracy", "min_delta": 2.0, "early_stopping": False}


@pytest.mark.parametrize("restore_first", [False, True])
def test_the_next_stage_starts_from_the_last_weights_without_restore_best(tmp_path, pool_dataset, fit_spy, logged,
                                                                         restore_first):
    stages = [{"name": "a", "epochs": 3, "restore_best": restore_first}, {"name": "b", "epochs": 1}]
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", stages=stages, train=ONLY_FIRST_IS_BEST))
    end_of_a, start_of_b = fit_spy["after"][0], fit_spy["before"][1]
    best = load_file(str(run.path / "model.safetensors"))  # stage b restores the best: epoch 1's weights
    if restore_first:
        assert same(start_of_b, best) and not same(start_of_b, end_of_a)
    else:
        assert same(start_of_b, end_of_a) and not same(start_of_b, best)
        assert "stage a ends with its last weights (restore_best off)" in logged.text
    assert "stage b never beat the earlier stages' best (val_accuracy" in logged.text


def test_without_restore_best_in_the_last_stage_the_run_ends_with_its_last_weights(tmp_path, pool_dataset, fit_spy):
    stages = [{"name": "a", "epochs": 2}, {"name": "b", "epochs": 2, "restore_best": False}]
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", stages=stages, train=ONLY_FIRST_IS_BEST))
    assert same(load_file(str(run.path / "model.safetensors")), fit_spy["after"][-1])
    assert run.meta.epoch == 4 and (run.path / "best.safetensors").is_file()


def test_each_stage_trains_at_its_own_batch_size(tmp_path, pool_dataset, monkeypatch, logged):
    sizes = []
    real_loader = imgclf.training.stages.train_loader
    monkeypatch.setattr(imgclf.training.stages, "train_loader",
                        lambda prepared, aug, pre, batch_size, *a, **k: sizes.append(batch_size)
                        or real_loader(prepared, aug, pre, batch_size, *a, **k))
    stages = [{"name": "small", "epochs": 1, "batch_size": 4}, {"name": "large", "epochs": 1, "batch_size": 6}]
    imgclf.train(tiny_config(pool_dataset, tmp_path / "r", stages=stages))
    assert sizes == [4, 6]  # tiny_config's train.batch_size is 8: neither stage used it
    assert "stage small: freeze=none" in logged.text and "batch size 4" in logged.text


def test_init_from_starts_with_every_weight_of_the_run_head_included(tmp_path, source_run, fit_spy, logged):
    config = tiny_config(source_run.index().root, tmp_path / "r", model=SOURCE_MODEL,
                         train={"epochs": 1, "init_from": str(source_run.path)})
    run = imgclf.train(config)
    assert same(fit_spy["before"][0], load_file(str(source_run.path / "model.safetensors")))
    assert "head included, starts from its model.safetensors" in logged.text
    assert run.config.train.init_from == str(source_run.path)  # recorded, so the chain can be followed back


def test_init_from_another_network_or_other_classes_is_one_line_before_the_run_exists(tmp_path, source_run):
    wider = tiny_config(source_run.index().root, tmp_path / "a", model={"dense_layers": [16]},
                        train={"init_from": str(source_run.path)})
    # the first model field that differs is named: the shorthand, or the head's layer list it expands into
    with pytest.raises(ConfigError, match=r"--init-from .*: its model\.\w+ is .*8.*, this config's is .*16"):
        imgclf.train(wider)
    two = make_class_folders(tmp_path / "two", per_class=10, classes=["left bar", "right bar"])
    with pytest.raises(ConfigError, match="its classes are .* this dataset's are"):
        imgclf.train(tiny_config(two, tmp_path / "b", model=SOURCE_MODEL, train={"init_from": str(source_run.path)}))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_weights_given_a_run_directory_points_to_init_from(tmp_path, source_run):
    data = source_run.index().root
    result = run_cli("train", data, "--weights", source_run.path, "--out", tmp_path / "r", timeout=120)
    assert_clean_error(result, f"--weights {source_run.path} is a folder", f"pass --init-from {source_run.path}")
    both = run_cli("train", data, "--weights", tmp_path / "w.safetensors", "--init-from", source_run.path,
                   "--out", tmp_path / "r", timeout=120)
    assert_clean_error(both, "init_from and weights are both set")
    assert not (tmp_path / "r").exists()


def test_a_classical_head_on_a_trained_run_reads_its_trained_features(tmp_path, source_run, logged):
    config = tiny_config(source_run.index().root, tmp_path / "svm", model={**SOURCE_MODEL, "head": "logreg"},
                         train={"init_from": str(source_run.path)})
    run = imgclf.train(config)
    assert same(load_file(str(run.path / "model.safetensors")), load_file(str(source_run.path / "model.safetensors")))
    assert "never trained" not in logged.text and run.metrics["test"]["n"] == 9
    with pytest.raises(ConfigError, match="is a classical run"):
        imgclf.train(tiny_config(source_run.index().root, tmp_path / "again", model=SOURCE_MODEL,
                                 train={"init_from": str(run.path)}))


def test_a_classical_head_on_untrained_dense_layers_warns_loudly(tmp_path, pool_dataset, logged):
    imgclf.train(tiny_config(pool_dataset, tmp_path / "svm", model={"dense_layers": [8], "head": "logreg"}))
    warnings = [r.getMessage() for r in logged.records if r.levelno == logging.WARNING]
    assert any("dense layers [8] that were never trained" in w and "--init-from RUN" in w for w in warnings)


@pytest.mark.parametrize(("preset", "views", "cached", "said"), [
    ("medium", None, 5, "cached features of 5 augmented views per image"),
    ("medium", 3, 3, "cached features of 3 augmented views per image"),
    ("medium", 1, None, "trained uncached: augmentation is on and feature_views=1"),
    ("none", None, 1, "cached features (1 view per image)"),
])
def test_a_frozen_stage_never_drops_augmentation_and_says_what_it_does(tmp_path, pool_dataset, monkeypatch, logged,
                                                                      preset, views, cached, said):
    extracted = []
    real_extract = imgclf.training.stages.extract_features
    monkeypatch.setattr(imgclf.training.stages, "extract_features",
                        lambda backbone, loader, compute, n=1: extracted.append(n)
                        or real_extract(backbone, loader, compute, n))
    stage = {"name": "head", "freeze": "backbone", "epochs": 1, "feature_views": views}
    imgclf.train(tiny_config(pool_dataset, tmp_path / "r", stages=[stage], augment={"preset": preset}))
    assert extracted == ([] if cached is None else [cached, 1])  # train views, then val once
    stage_lines = [r.getMessage() for r in logged.records if r.getMessage().startswith("stage head:")]
    assert len(stage_lines) == 1 and said in stage_lines[0]


def test_keras_decay_divides_the_lr_by_one_plus_decay_times_the_updates_and_resumes():
    weight = torch.nn.Parameter(torch.ones(3))
    cfg = TrainConfig(optimizer="sgd", momentum=0.0, lr=0.1, schedule="keras_decay", decay=0.5, epochs=2)
    optimizer = build_optimizer([weight], cfg)
    schedule = build_schedule(optimizer, cfg)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        weight.sum().backward()
        optimizer.step()
    step_schedule(schedule, None)  # the end-of-epoch step leaves a per-batch schedule alone
    assert seen == pytest.approx([0.1 / (1 + 0.5 * t) for t in range(4)])
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 / 3)
    again = build_optimizer([weight], cfg)
    resumed = build_schedule(again, cfg)
    again.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(schedule.state_dict())
    again.step()
    assert again.param_groups[0]["lr"] == pytest.approx(0.1 / (1 + 0.5 * 5))


def test_keras_decay_in_a_training_steps_per_batch(tmp_path, pool_dataset):
    train = {"epochs": 2, "optimizer": "adam", "lr": 0.01, "schedule": "keras_decay", "decay": 0.1}
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", train=train))
    n, batch = len(run.index().subset("train").paths), 8
    steps = n // batch + (n % batch > 1)  # a last batch of one image is dropped
    with open(run.path / "history.csv") as fh:
        lrs = [float(row["lr"]) for row in csv.DictReader(fh)]
    assert lrs == pytest.approx([0.01, 0.01 / (1 + 0.1 * steps)])  # the lr each epoch starts with


def test_decay_without_the_keras_schedule_is_an_error_and_a_stage_schedule_drops_it():
    with pytest.raises(ConfigError, match="decay=1e-06 is used only by schedule=keras_decay"):
        build_config({"train": {"decay": 1e-6}})
    config = build_config({"train": {"schedule": "keras_decay", "decay": 1e-6},
                           "stages": [{"name": "a"}, {"name": "b", "schedule": "cosine"}]})
    (_, first), (_, second) = resolve_stages(config)
    assert (first.schedule, first.decay, second.schedule, second.decay) == ("keras_decay", 1e-6, "cosine", 0.0)


def test_rmsprop_rho_is_keras_for_new_runs_and_torch_for_runs_that_predate_it():
    param = [torch.nn.Parameter(torch.ones(1))]
    assert build_optimizer(param, TrainConfig(optimizer="rmsprop")).param_groups[0]["alpha"] == 0.9
    assert build_optimizer(param, TrainConfig(optimizer="rmsprop", rho=0.5)).param_groups[0]["alpha"] == 0.5
    assert load_config(FIXTURE_CONFIG).train.rho == 0.99  # a 0.1 run retrains with the alpha it had
    help_text = TrainConfig.model_fields["rho"].description
    assert "Keras" in help_text and "alpha" in help_text and "0.9" in help_text and "0.99" in help_text


def test_settings_the_default_transfer_recipe_replaces_are_named():
    values = {"model": {"name": "resnet18", "pretrained": True},
              "train": {"lr": 1e-4, "freeze": "backbone", "epochs": 5}}
    # --epochs caps the fine-tune: it applies; --lr 1e-4 is the fine-tune's own: it reaches the head alone
    assert recipe_overrides(build_config(values)) == {"lr": {"head": 1e-3}, "freeze": {"finetune": "none"}}
    assert recipe_overrides(build_config({**values, "stages": [{"name": "only"}]})) == {}
    chained = build_config({**values, "train": {**values["train"], "init_from": "/runs/a"}})
    assert [name for name, _ in resolve_stages(chained)] == ["train"]  # a trained head: no head-only recipe


def test_compile_on_a_stage_that_trains_over_cached_features_is_said_to_do_nothing(tmp_path, pool_dataset, logged,
                                                                                   monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: compiled.append(model) or model)
    stages = [{"name": "head", "epochs": 1, "freeze": "backbone"}]
    imgclf.train(tiny_config(pool_dataset, tmp_path / "r", stages=stages, train={"compile": True}))
    assert "--compile has no effect in stage head: it trains the head on cached features" in logged.text
    assert compiled == []
