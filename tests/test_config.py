import argparse
import logging

import pytest
import yaml

from imgclf.cli.flags import config_from_args, given_settings
from imgclf.cli.parser import build_parser
from imgclf.config import build_config, config_fields, config_to_yaml, flag_name, load_config
from imgclf.config.run import MONITORS
from imgclf.errors import ConfigError
from imgclf.evaluation.metrics import validation_row
from imgclf.workflows.gridparams import parse_params


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = build_config({"train": {"epochs": 7}, "model": {"conv_filters": [64, 64, 64, 64]}})
    path = tmp_path / "c.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(("values", "fragment"), [
    ({"train": {"lr": -1}}, "train.lr"),
    ({"train": {"batch_size": 0}}, "train.batch_size"),
    ({"data": {"val_fraction": 1.0}}, "data.val_fraction"),
    ({"train": {"epochs": 3, "patience": 5}}, "patience=5 is larger than epochs=3"),
    ({"train": {"epochs": "many"}}, "train.epochs"),
    ({"train": {"optimzer": "adam"}}, "did you mean optimizer"),
    ({"trian": {}}, "did you mean train"),
    ({"data": {"val_fraction": 0.6, "test_fraction": 0.5}}, "below 1"),
    ({"data": {"workers": 100000}}, "data.workers"),  # a tampered config.yaml would fork that many at predict
    ({"train": {"seed": 10**20}}, "train.seed"),  # overflowed inside torch, after the data was scanned
    ({"data": {"split_seed": 2**40}}, "data.split_seed"),
    ({"augment": {"brightness_range": [float("nan"), 1.0]}}, "brightness_range"),  # trained to a NaN loss
    # YAML's on/yes/true: lax pydantic read them as 1 (lr 1, grayscale, 1 degree), silently
    ({"train": {"lr": True}}, "lr: true: yes/no where a number is expected"),
    ({"data": {"channels": True}}, "channels: true: yes/no"),
    ({"augment": {"rotation_range": True}}, "rotation_range: true"),
    ({"model": {"dense_layers": [True]}}, "dense_layers: [true]"),
    ({"augment": {"brightness_range": [True, 2]}}, "brightness_range: [true, 2]"),
    ({"stages": [{"name": "a", "epochs": True}]}, "epochs: true"),
    ({"train": {"monitor": "val_acc"}}, "monitor 'val_acc' is not a validation metric; use one of val_loss, val_"),
])
def test_bad_values_fail_with_one_line_naming_the_setting(values, fragment):
    with pytest.raises(ConfigError) as err:
        build_config(values)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_yes_no_settings_still_take_yes_no_values():
    cfg = build_config({"train": {"early_stopping": False, "feature_cache": True}, "model": {"pretrained": False}})
    assert cfg.train.early_stopping is False and cfg.train.feature_cache is True


def test_every_config_field_has_a_unique_cli_flag_with_help():
    flags = [flag_name(section, name) for section, name, _ in config_fields()]
    assert len(flags) == len(set(flags))
    assert all(info.description for _, _, info in config_fields())
    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for required in ("--model", "--epochs", "--batch-size", "--lr", "--optimizer", "--image-size", "--channels",
                     "--augment", "--class-weight", "--seed", "--patience", "--no-early-stopping", "--out"):
        assert required in train_help


def test_stage_flags_replacing_the_config_file_s_stages_are_said(tmp_path, caplog):
    base = tmp_path / "stages.yaml"
    base.write_text(yaml.safe_dump({"stages": [{"name": "head", "freeze": "backbone", "epochs": 2},
                                               {"name": "all", "freeze": "none", "epochs": 2}]}))
    args = build_parser().parse_args(["train", "--config", str(base), "--stage", "name=extra,freeze=last:1,epochs=1"])
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        cfg = config_from_args(args)
    assert [stage.name for stage in cfg.stages] == ["extra"]
    assert f"--stage replaces the 2 stage(s) of {base} (head, all)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        config_from_args(build_parser().parse_args(["train", "--stage", "name=extra,freeze=last:1,epochs=1"]))
    assert "replaces" not in caplog.text  # no file stages: nothing was replaced
    with caplog.at_level(logging.WARNING, logger="imgclf"):  # a stage chain: the next stages from a trained run's
        config_from_args(build_parser().parse_args(["train", "--config", str(base), "--init-from", str(tmp_path),
                                                    "--stage", "name=extra,freeze=last:1,epochs=1"]))
    assert "replaces" not in caplog.text


def test_flags_override_the_config_file(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"train": {"epochs": 50, "lr": 0.1}, "model": {"name": "resnet18"}}))
    args = build_parser().parse_args(["train", "--config", str(base), "--epochs", "5", "--conv-filters",
                                      "16,32", "--no-early-stopping", "--channels", "1"])
    cfg = config_from_args(args)
    assert (cfg.train.epochs, cfg.train.lr, cfg.model.name) == (5, 0.1, "resnet18")
    assert cfg.model.conv_filters == [16, 32]
    assert cfg.train.early_stopping is False and cfg.data.channels == 1
    assert given_settings(args) == {"train.epochs", "model.conv_filters", "train.early_stopping", "data.channels"}


def test_unset_flags_keep_defaults():
    cfg = config_from_args(argparse.Namespace(config=None))
    assert cfg == build_config({})


def test_a_bad_stage_is_a_one_line_error_naming_the_stage():
    from imgclf.config.stages import resolve_stages

    config = build_config({"stages": [{"name": "head", "freeze": "backbone"},
                                      {"name": "all", "epochs": 2, "patience": 5}]})
    with pytest.raises(ConfigError) as err:
        resolve_stages(config)
    assert str(err.value).startswith("stage 1 (all):") and "patience=5" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not a policy"):
        build_config({"train": {"freeze": "some"}})


def test_paths_are_stored_absolute_with_what_was_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = build_config({"data": {"path": "data", "cache_dir": "~/cache"}, "model": {"weights": "w/b.pth"}})
    assert cfg.data.path == str(tmp_path / "data") and cfg.data.path_as_typed == "data"
    assert cfg.data.cache_dir.endswith("/cache") and not cfg.data.cache_dir.startswith("~")
    assert cfg.data.cache_dir_as_typed == "~/cache"
    assert (cfg.model.weights, cfg.model.weights_as_typed) == (str(tmp_path / "w" / "b.pth"), "w/b.pth")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(cfg))
    assert load_config(saved) == cfg  # read back from another directory: the same places
    assert not any(flag_name(s, n).endswith("_as_typed") for s, n, _ in config_fields())  # no flags for them


def test_an_old_config_without_typed_paths_still_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"data": {"path": "/data/xray"}, "model": {"name": "simple_cnn"}}))
    cfg = load_config(old)
    assert (cfg.data.path, cfg.data.path_as_typed, cfg.model.weights) == ("/data/xray", "/data/xray", None)


def test_a_path_flag_replaces_the_files_typed_form(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(build_config({"data": {"path": "old data"}})))
    args = build_parser().parse_args(["train", "--config", str(saved), "--data", "new data"])
    cfg = config_from_args(args)
    assert (cfg.data.path, cfg.data.path_as_typed) == (str(tmp_path / "new data"), "new data")


def test_a_config_file_with_a_byte_order_mark_reads_as_without(tmp_path):
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + yaml.safe_dump({"train": {"epochs": 5}}).encode())
    assert load_config(path).train.epochs == 5  # a BOM once made the first section unknown ('\ufefftrain')


def test_a_config_file_gives_only_the_settings_it_writes(tmp_path):
    """A file naming only train settings leaves the model unchosen (the default tries its candidates, as with no
    file) and the class weights its own; a default value it writes out counts as given, as typing it would."""
    from imgclf.config.stages import given_train_settings, recipe_overrides
    from imgclf.workflows.candidates import is_default_request, weighs_balanced

    partial = tmp_path / "partial.yaml"
    partial.write_text(yaml.safe_dump({"train": {"epochs": 2, "lr": 0.001}}))
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(partial)]))
    assert is_default_request(cfg) and weighs_balanced(cfg)
    assert cfg.train.model_fields_set == {"epochs", "lr"} and "lr" in given_train_settings(cfg)
    pretrained = tmp_path / "pretrained.yaml"
    pretrained.write_text(yaml.safe_dump({"model": {"name": "resnet18", "pretrained": True}, "train": {"lr": 0.001}}))
    cfg = config_from_args(build_parser().parse_args(["train", "--config", str(pretrained)]))
    assert not is_default_request(cfg) and recipe_overrides(cfg) == {"lr": {"finetune": 1e-4}}
    recorded = tmp_path / "config.yaml"  # a run's own record names every setting: its model is chosen
    recorded.write_text(config_to_yaml(build_config({"train": {"epochs": 2}, "versions": {"imgclf": "0.1"}})))
    assert not is_default_request(config_from_args(build_parser().parse_args(["train", "--config", str(recorded)])))


def test_every_monitor_the_config_takes_is_a_column_validation_writes():
    scores = dict.fromkeys(("log_loss", "accuracy", "balanced_accuracy", "precision_macro", "recall_macro",
                            "f1_macro", "roc_auc_ovr"), 0.5)
    assert set(MONITORS) == set(validation_row(scores))


def test_a_key_given_twice_in_a_yaml_config_or_grid_file_is_refused_not_the_last_one_kept(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.5\n")  # PyYAML kept 0.5, silently
    with pytest.raises(ConfigError, match=r"the key 'lr' is given twice in one mapping \(line 4\); keep one"):
        load_config(config)
    grid = tmp_path / "grid.yaml"
    grid.write_text("lr: [0.1, 0.01]\nlr: [0.5]\n")
    with pytest.raises(ConfigError, match="the key 'lr' is given twice"):
        parse_params([], str(grid))
    config.write_text("train:\n  <<: {lr: 0.1, epochs: 3}\n  lr: 0.2\n")  # YAML's merge, then an override: fine
    assert (load_config(config).train.lr, load_config(config).train.epochs) == (0.2, 3)
