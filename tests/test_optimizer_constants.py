"""Keras's optimizer constants as settings: eps, Adadelta's rho, Adagrad's initial accumulator (issue 16
follow-ups). Each defaults to torch's value, is recorded in config.yaml, and is an error with an optimizer
that does not use it."""

import pytest
import torch
import yaml

import imgclf
from clitools import assert_clean_error
from clitools import run_main as run_cli
from imgclf.config import TrainConfig, build_config, load_config
from imgclf.config.stages import resolve_stages
from imgclf.errors import ConfigError
from imgclf.training.optim import build_optimizer
from imgclf.workflows.grid import parse_params, trial_configs
from imgclf.workflows.settings import unused_settings

from conftest import tiny_config


def group(optimizer: str, **settings) -> dict:
    param = [torch.nn.Parameter(torch.ones(1))]
    return build_optimizer(param, TrainConfig(optimizer=optimizer, **settings)).param_groups[0]


def test_unset_constants_keep_torchs_defaults():
    assert group("adam")["eps"] == 1e-8 and group("rmsprop")["eps"] == 1e-8
    assert (group("adadelta")["eps"], group("adadelta")["rho"]) == (1e-6, 0.9)
    assert (group("adagrad")["eps"], group("adagrad")["initial_accumulator_value"]) == (1e-10, 0.0)


def test_kerass_constants_reach_the_torch_optimizers():
    for name in ("adam", "adamw", "rmsprop", "adadelta", "adagrad"):
        assert group(name, eps=1e-7)["eps"] == 1e-7, name
    assert group("adadelta", rho=0.95)["rho"] == 0.95
    assert group("adagrad", initial_accumulator_value=0.1)["initial_accumulator_value"] == 0.1
    param = torch.nn.Parameter(torch.ones(1))
    adagrad = build_optimizer([param], TrainConfig(optimizer="adagrad", initial_accumulator_value=0.1))
    assert adagrad.state[param]["sum"].item() == pytest.approx(0.1)


def test_a_constant_for_another_optimizer_is_an_error():
    with pytest.raises(ConfigError, match="eps=1e-07 does not apply to sgd .* drop --eps"):
        build_config({"train": {"optimizer": "sgd", "eps": 1e-7}})
    with pytest.raises(ConfigError, match="initial_accumulator_value=0.1 does not apply to adam .used by adagrad"):
        build_config({"train": {"optimizer": "adam", "initial_accumulator_value": 0.1}})
    result = run_cli("train", "nowhere", "--optimizer", "sgd", "--eps", "1e-7", timeout=60)
    assert_clean_error(result, "eps=1e-07 does not apply to sgd")


def test_a_stage_that_switches_optimizer_drops_only_what_its_optimizer_cannot_use():
    config = build_config({"train": {"optimizer": "adagrad", "eps": 1e-7, "initial_accumulator_value": 0.1},
                           "stages": [{"name": "a"}, {"name": "b", "optimizer": "adam"},
                                      {"name": "c", "optimizer": "sgd"}, {"name": "d", "optimizer": "adam",
                                                                         "eps": 1e-3}]})
    resolved = {name: (cfg.eps, cfg.initial_accumulator_value) for name, cfg in resolve_stages(config)}
    assert resolved == {"a": (1e-7, 0.1), "b": (1e-7, None), "c": (None, None), "d": (1e-3, None)}
    bad = build_config({"train": {"optimizer": "adam"}, "stages": [{"name": "x", "optimizer": "sgd", "eps": 1e-7}]})
    with pytest.raises(ConfigError, match=r"stage 0 \(x\): .*eps=1e-07 does not apply to sgd"):
        resolve_stages(bad)


def test_constants_are_recorded_and_read_back(tmp_path):
    config = build_config({"train": {"optimizer": "adadelta", "rho": 0.95, "eps": 1e-7}})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump()))
    recorded = yaml.safe_load(path.read_text())["train"]
    assert (recorded["rho"], recorded["eps"], recorded["initial_accumulator_value"]) == (0.95, 1e-7, None)
    assert load_config(path).train == config.train


def test_runs_from_before_rho_reached_adadelta_retrain_as_they_trained(tmp_path):
    old = {"versions": {"imgclf": "0.1"}, "train": {"optimizer": "adadelta"},
           "stages": [{"name": "a", "optimizer": "rmsprop"}, {"name": "b"}, {"name": "c", "optimizer": "adam"}]}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(old))
    config = load_config(path)
    assert config.train.rho == 0.9 and [s.rho for s in config.stages] == [0.99, 0.9, None]
    rmsprop_run = {"versions": {"imgclf": "0.1"}, "train": {"optimizer": "rmsprop"}}
    path.write_text(yaml.safe_dump(rmsprop_run))
    assert load_config(path).train.rho == 0.99


def test_a_grid_couples_each_optimizer_with_its_keras_constants(tmp_path):
    (tmp_path / "grid.yaml").write_text(
        "optimizer: [{optimizer: adam}, {optimizer: sgd, eps: null},\n"
        "            {optimizer: adadelta, rho: 0.95}, {optimizer: adagrad, initial_accumulator_value: 0.1}]\n")
    config = tiny_config(tmp_path, tmp_path / "g", train={"optimizer": "adam", "eps": 1e-7})
    trials = trial_configs(config, parse_params([], str(tmp_path / "grid.yaml")), tmp_path / "g")
    seen = [(c.train.optimizer, c.train.eps, c.train.rho, c.train.initial_accumulator_value) for _, _, c in trials]
    assert seen == [("adam", 1e-7, 0.9, None), ("sgd", None, 0.9, None), ("adadelta", 1e-7, 0.95, None),
                    ("adagrad", 1e-7, 0.9, 0.1)]
    with pytest.raises(ConfigError, match=r"trial_001 \{'optimizer': 'sgd'\}: .*eps=1e-07 does not apply to sgd"):
        trial_configs(config, parse_params(["optimizer=adam,sgd"]), tmp_path / "g")


def test_settings_an_optimizer_never_reads_are_said_not_ignored(tmp_path, pool_dataset, caplog):
    stages = [("head", TrainConfig(optimizer="adam", momentum=0.5)),
              ("tune", TrainConfig(optimizer="sgd", momentum=0.5)),
              ("last", TrainConfig(optimizer="sgd", momentum=0.0, nesterov=True, rho=0.5))]
    lines = unused_settings(build_config({}), stages)
    assert lines == ["warning: momentum=0.5 has no effect with adam (read by sgd, rmsprop only), in stage(s) head",
                     "warning: rho=0.5 has no effect with sgd (read by rmsprop, adadelta only), in stage(s) last",
                     "warning: nesterov has no effect with momentum=0 (Nesterov needs momentum), in stage(s) last"]
    assert unused_settings(build_config({}), [("train", TrainConfig(optimizer="adam"))]) == []  # defaults
    caplog.set_level("INFO")
    run_cfg = tiny_config(pool_dataset, tmp_path / "r", train={"optimizer": "adamw", "momentum": 0.0, "epochs": 1})
    imgclf.train(run_cfg)
    assert "momentum=0.0 has no effect with adamw" in caplog.text


def test_schedule_stage_and_augment_settings_that_do_nothing_are_said():
    config = build_config({"train": {"lr": 0.5, "step_size": 3, "gamma": 0.5, "patience": 2, "early_stopping": False,
                                     "freeze": "backbone", "backbone_lr_mult": 3, "average_best": 3,
                                     "restore_best": False},
                           "augment": {"preset": "none", "fill_mode": "reflect", "cval": 100},
                           "stages": [{"name": "a", "epochs": 1, "lr": 0.01}, {"name": "b", "epochs": 1, "lr": 0.1}]})
    text = "\n".join(unused_settings(config, [("a", config.train)]))
    for said in ("step_size=3 has no effect with the cosine schedule", "gamma=0.5 has no effect with the cosine",
                 "patience=2 has no effect without early stopping", "backbone_lr_mult=3 has no effect: the "
                 "backbone is frozen", "--lr 0.5 reaches no stage", "--cval 100 has no effect with fill_mode reflect",
                 "--fill-mode reflect has no effect", "--average-best 3 has no effect with --no-restore-best"):
        assert said in text
    assert "--epochs" not in text  # the default reaches no stage either, but nobody asked for it
    both = build_config({"train": {"sampler": "weighted", "class_weight": "balanced"}})
    assert "both balance the classes" in "\n".join(unused_settings(both, [("train", both.train)]))
    cached = unused_settings(build_config({}), [("all", TrainConfig(feature_views=3, feature_cache=False))])
    assert cached == ["warning: feature_cache=False and feature_views=3 has no effect: every layer trains in every "
                      "stage, and only a frozen backbone's features are cached"]
    recipe = [("head", TrainConfig(freeze="backbone", feature_views=3)), ("tune", TrainConfig(feature_views=3))]
    assert unused_settings(build_config({}), recipe) == []  # the head stage caches its 3 views
    tuned = [("head", TrainConfig(freeze="backbone", backbone_lr_mult=0.1)),
             ("tune", TrainConfig(backbone_lr_mult=0.1))]
    assert unused_settings(build_config({}), tuned) == []  # the fine-tune reads it
    one_sets_lr = config.model_copy(update={"stages": [config.stages[0], config.stages[1].model_copy(
        update={"lr": None})]})
    assert "reaches no stage" not in "\n".join(unused_settings(one_sets_lr, [("a", config.train)]))
