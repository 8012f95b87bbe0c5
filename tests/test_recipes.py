"""The notebook recipes of examples/notebooks/ (issue 16): the network each builds, and each run end to end.

For each recipe, its config files are read by the real loader and built with pretrained weights off,
and the built network's Keras layer sequence and parameter counts (total and trainable, per stage)
are checked against the Keras original, counted by hand from the notebook's layer list with Keras's
rules: Conv2D = k*k*in*out + out, Dense = in*out + out, BatchNormalization = 4*C of which 2*C (the
moving mean and variance) are non-trainable. The backbones' counts come from test_layers, which
counts them from their published architectures. Then each recipe.sh runs on tiny synthetic images;
only image size, epochs and the glaucoma grids are shrunk (flags, and a copy of the configs with
fewer epochs), never the networks or the settings.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from imgclf.cli import main
from imgclf.config import load_config
from imgclf.config.stages import resolve_stages
from imgclf.models.freeze import apply_freeze
from imgclf.models.networks import build_model, check_input_size, resolve_preprocess
from imgclf.models.summary import Counts, keras_counts, keras_layers
from imgclf.workflows.grid import parse_params, trial_configs
from test_layers import (
    bn,
    conv2d,
    dense,
    densenet169_base,
    densenet169_conv5_trainable,
    efficientnet_b0_base,
    vgg16_base,
)

from imagefactory import make_class_folders, make_split_folders

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "notebooks"
VGG16_BASE, DENSENET169_BASE, EFFICIENTNET_B0_BASE = 14_714_688, 12_642_880, 4_049_571 - 7  # Keras's, see below
VGG16_BLOCK5 = 3 * 2_359_808  # block5_conv1..3: 3 * (3*3*512*512 + 512)


@pytest.fixture(autouse=True)
def _own_log_handlers(monkeypatch):
    """main() gives the imgclf logger a handler on this test's captured stderr; it leaves with the test."""
    logger = logging.getLogger("imgclf")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)


def config_of(recipe: str, name: str):
    return load_config(RECIPES / recipe / name)


def build(config, classes: int, size: int | None = None):
    """The recipe's network, pretrained off (nothing is downloaded), at its own input size unless ``size``."""
    model = config.model.model_copy(update={"pretrained": False})
    pre = resolve_preprocess(model, size or config.data.image_size, config.data.channels, config.data.interpolation)
    check_input_size(model, pre)
    return build_model(model, classes, pre), (pre.channels, pre.size, pre.size)


def stage_counts(config, net) -> dict[str, Counts]:
    """Keras's counts under each stage's freeze policy, in order."""
    counts = {}
    for name, train in resolve_stages(config):
        apply_freeze(net, train.freeze, train.freeze_bn)
        counts[name] = keras_counts(net)
    return counts


def settings(config, expected: dict) -> None:
    """``{'train.lr': 1e-4, 'stages.0.freeze': ...}``: the issue's settings, as the loader read them."""
    for key, value in expected.items():
        node = config
        for part in key.split("."):
            node = node[int(part)] if part.isdigit() else getattr(node, part)
        assert node == value, f"{key} is {node!r}, the notebook's is {value!r}"


def all_trainable(total: int, batchnorm_channels: int = 0) -> Counts:
    """Everything trains; only BatchNorm's moving mean and variance are non-trainable."""
    return Counts(total - 2 * batchnorm_channels, 2 * batchnorm_channels)


# --- the notebook's comments -----------------------------------------------------------------------------------

LAYER_ITEM = re.compile(r"^\s+- (conv|pool|dense|dropout|bn|flatten|gap|gmp)\b")


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_layer_of_a_config_names_its_notebook_step(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("#"), "each file starts by saying what it reproduces"
    for number, line in enumerate(lines, 1):
        if LAYER_ITEM.match(line):
            assert "# notebook:" in line, f"{path.name}:{number} names no notebook step: {line.strip()}"


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*/recipe.sh")), ids=lambda p: p.parent.name)
def test_every_command_of_a_recipe_follows_a_notebook_comment(path):
    """Commands come in paragraphs; each paragraph says which notebook step its commands reproduce."""
    lines = path.read_text(encoding="utf-8").splitlines()
    commands = [i for i, line in enumerate(lines) if line.startswith("imgclf ")]
    assert len(commands) >= 2
    for i in commands:
        start = max((j for j in range(i) if not lines[j].strip()), default=0)
        assert any(line.startswith("# notebook:") for line in lines[start:i]), f"{path.parent.name}: {lines[i]}"


# --- COVID X-ray, 3 classes: DenseNet169, conv5 trainable ------------------------------------------------------


@pytest.mark.slow
def test_covid_densenet169_is_the_keras_network():
    config = config_of("covid_densenet169", "densenet169.yaml")
    settings(config, {"data.image_size": 256, "model.normalize": "rescale", "augment.rotation_range": 45,
                      "augment.zoom_range": 0.2, "augment.shear_range": 0.2, "augment.width_shift_range": 0.2,
                      "augment.height_shift_range": 0.2, "augment.horizontal_flip": True,
                      "augment.vertical_flip": True, "augment.fill_mode": "nearest", "train.class_weight": "balanced",
                      "augment.zoom_axes": "independent", "train.optimizer": "adam", "train.lr": 1e-4,
                      "train.eps": 1e-7, "train.weight_decay": 0, "train.schedule": "none",
                      "train.monitor": "val_loss", "train.patience": 10, "train.restore_best": True,
                      "stages.0.freeze": "regex:denseblock4"})
    net, shape = build(config, 3)
    assert keras_layers(net, shape)[-8:] == ["Flatten", "BatchNormalization", "Dense(relu)", "Dropout",
                                             "BatchNormalization", "Dense(relu)", "Dropout", "Dense"]
    assert densenet169_base() == (DENSENET169_BASE, 1664)  # Keras DenseNet169(include_top=False)
    flat = 8 * 8 * 1664  # 256 px / 32 = 8; Flatten of 8 x 8 x 1664 = 106,496
    # BatchNormalization(106496) + Dense(256) on 106496 + BN(256) + Dense(128) on 256 + Dense(3) on 128
    head = bn(flat) + dense(flat, 256) + bn(256) + dense(256, 128) + dense(128, 3)
    assert head == 4 * 106_496 + (106_496 * 256 + 256) + 4 * 256 + (256 * 128 + 128) + (128 * 3 + 3)
    # trainable: conv5 (gamma, beta and weights of its 32 layers; the final 'bn' stays frozen) and the
    # head but for its two BatchNormalizations' moving mean and variance
    trainable = densenet169_conv5_trainable() + head - 2 * flat - 2 * 256
    assert stage_counts(config, net) == {"conv5": Counts(trainable, DENSENET169_BASE + head - trainable)}


# --- COVID vs no-COVID, binary, 256 x 256 x 1 -------------------------------------------------------------------


def binary_cnn_count(blocks: int, units: int) -> int:
    """``blocks`` x [Conv 64 3x3 valid, (Dropout), MaxPool 2] on 256x256x1, Flatten, Dense(units), Dense(1)."""
    side = 256
    for _ in range(blocks):
        side = (side - 2) // 2  # 3x3 'valid' takes 2 pixels, the pool halves: 256 -> 127 -> 62 -> 30 -> 14 ...
    return conv2d(3, 1, 64) + (blocks - 1) * conv2d(3, 64, 64) + dense(side * side * 64, units) + dense(units, 1)


def test_covid_binary_cnn_and_each_variant_is_the_keras_network():
    config = config_of("covid_binary_cnn", "cnn.yaml")
    settings(config, {"data.image_size": 256, "data.channels": 1, "model.binary_head": "sigmoid",
                      "model.normalize": "rescale", "train.optimizer": "adam", "train.eps": 1e-7,
                      "train.weight_decay": 0, "train.min_delta": 0.01, "train.monitor": "val_loss",
                      "train.restore_best": False})
    net, shape = build(config, 2)
    assert keras_layers(net, shape) == ["Conv2D(relu)", "Dropout", "MaxPooling2D"] * 4 + [
        "Flatten", "Dense(relu)", "Dropout", "Dense"]
    # 3*3*1*64+64 + 3 * (3*3*64*64+64) + 14*14*64*64+64 + 64*1+1
    assert binary_cnn_count(4, 64) == 914_369 and keras_counts(net) == all_trainable(914_369)

    variants = yaml.safe_load((RECIPES / "covid_binary_cnn" / "variants.yaml").read_text())["variant"]
    expected = [binary_cnn_count(4, 64)] * 4 + [binary_cnn_count(4, 16), binary_cnn_count(2, 64),
                                                binary_cnn_count(6, 64)]
    layers_of = []
    for variant, count in zip(variants, expected, strict=True):
        values = {**config.model.model_dump(), **{k: v for k, v in variant.items() if k.endswith("_layers")}}
        built, _ = build(config.model_copy(update={"model": type(config.model).model_validate(values)}), 2)
        assert keras_counts(built) == all_trainable(count), variant
        layers_of.append(keras_layers(built, shape))
    assert layers_of[3] == ["Conv2D(relu)", "MaxPooling2D"] * 4 + ["Flatten", "Dense(relu)", "Dense"]  # no dropout
    assert [layers.count("Conv2D(relu)") for layers in layers_of[-3:]] == [4, 2, 6]


# --- Blood cells, 4 classes, 150 px ----------------------------------------------------------------------------


def test_blood_cell_cnn_and_hybrid_are_the_keras_networks():
    cnn = config_of("blood_cells", "cnn.yaml")
    settings(cnn, {"data.image_size": 150, "train.optimizer": "rmsprop", "train.lr": 1e-3, "train.rho": 0.9,
                   "train.eps": 1e-7, "train.momentum": 0.0, "train.weight_decay": 0})
    net, shape = build(cnn, 4)
    assert keras_layers(net, shape) == ["Conv2D(relu)", "MaxPooling2D"] * 5 + [
        "Flatten", "Dropout", "Dense(relu)", "Dense(relu)", "Dense"]
    sizes = [32, 64, 64, 128, 128]
    convs = sum(conv2d(3, cin, cout) for cin, cout in zip([3, *sizes], sizes, strict=False))
    total = convs + dense(2 * 2 * 128, 512) + dense(512, 128) + dense(128, 4)  # 150 -> 74 -> 36 -> 17 -> 7 -> 2
    assert total == 896 + 18_496 + 36_928 + 73_856 + 147_584 + 262_656 + 65_664 + 516
    assert keras_counts(net) == all_trainable(total)

    hybrid = config_of("blood_cells", "hybrid.yaml")
    net, shape = build(hybrid, 4)
    assert keras_layers(net, shape) == ["Conv2D(relu)", "MaxPooling2D"] * 3 + ["Flatten", "Dense(relu)", "Dense"]
    # 5*5*3*5+5 + 5*5*5*10+10 + 2*2*10*10+10 + Dense(100) on 16*16*10 + Dense(4) on 100; 150 -> 73 -> 34 -> 16
    total = conv2d(5, 3, 5) + conv2d(5, 5, 10) + conv2d(2, 10, 10) + dense(16 * 16 * 10, 100) + dense(100, 4)
    assert keras_counts(net) == all_trainable(total)
    assert net.eval().embed(torch.zeros(2, *shape)).shape == (2, 100)  # the SVM's features: Dense(100)'s output


def test_blood_cell_optimizer_pairs_are_the_notebooks():
    grid = yaml.safe_load((RECIPES / "blood_cells" / "optimizers.yaml").read_text())
    assert grid == {"optimizer_lr": [{"optimizer": "rmsprop", "lr": 1e-3},
                                     {"optimizer": "adam", "lr": 1e-4, "schedule": "keras_decay", "decay": 1e-6},
                                     {"optimizer": "sgd", "lr": 1e-4, "schedule": "keras_decay", "decay": 1e-6,
                                      "eps": None}]}
    trials = trial_configs(config_of("blood_cells", "cnn.yaml"), parse_params([], str(RECIPES / "blood_cells" /
                                                                                "optimizers.yaml")), Path("/g"))
    assert [(c.train.optimizer, c.train.eps) for _, _, c in trials] == [("rmsprop", 1e-7), ("adam", 1e-7),
                                                                        ("sgd", None)]  # Keras's epsilons


@pytest.mark.slow
def test_blood_cell_vgg16_frozen_then_block5():
    config = config_of("blood_cells", "vgg16.yaml")
    settings(config, {"stages.0.freeze": "backbone", "stages.1.lr": 1e-5, "stages.0.restore_best": False,
                      "train.optimizer": "rmsprop", "train.momentum": 0.0})
    net, shape = build(config, 4)
    assert keras_layers(net, shape)[-3:] == ["Flatten", "Dense(relu)", "Dense"]
    assert vgg16_base() == VGG16_BASE and conv2d(3, 512, 512) * 3 == VGG16_BLOCK5
    head = dense(4 * 4 * 512, 256) + dense(256, 4)  # 150 px -> 4 x 4 x 512 after five pools
    assert stage_counts(config, net) == {"frozen": Counts(head, VGG16_BASE),
                                         "block5": Counts(head + VGG16_BLOCK5, VGG16_BASE - VGG16_BLOCK5)}


# --- Glaucoma, binary, 224 px: EfficientNet-B0 chain -----------------------------------------------------------


def test_glaucoma_chain_is_the_keras_network_under_each_models_freezing():
    """Keras's EfficientNetB0(include_top=False) has 4,049,571 parameters: 7 of them are its input
    Normalization layer (mean 3, variance 3, count 1). imgclf normalises before the network, so its
    count is 7 fewer; every other layer matches (efficientnet_b0_base counts them)."""
    assert efficientnet_b0_base() == EFFICIENTNET_B0_BASE
    head = bn(1280) + dense(1280, 2)  # BatchNormalization(1280) + Dense(2) on GlobalMaxPooling2D's 1280
    head_trainable = 2 * 1280 + dense(1280, 2)
    # model 2: Keras's model.layers[-20:] but BatchNormalization: block7a expand_conv 1*1*192*1152,
    # dwconv 3*3*1152 (depthwise, no bias), se_reduce 1152*48+48, se_expand 48*1152+1152,
    # project_conv 1*1*1152*320, top_conv 1*1*320*1280 (no biases where BatchNormalization follows)
    last20 = 192 * 1152 + 9 * 1152 + (1152 * 48 + 48) + (48 * 1152 + 1152) + 1152 * 320 + 320 * 1280
    batchnorm_channels = sum_bn_channels() + 1280  # the base's BatchNormalizations and the head's
    total = EFFICIENTNET_B0_BASE + head
    expected = {"model1": Counts(head_trainable, total - head_trainable),
                "model2": Counts(head_trainable + last20, total - head_trainable - last20),
                "model3": all_trainable(total, batchnorm_channels)}
    chain = config_of("glaucoma_efficientnet", "chain_cv.yaml")
    net, shape = build(chain, 2)
    assert shape == (3, 224, 224)
    assert keras_layers(net, shape)[-4:] == ["GlobalMaxPooling2D", "BatchNormalization", "Dropout", "Dense"]
    assert stage_counts(chain, net) == expected
    for name in ("model1", "model2", "model3"):
        config = config_of("glaucoma_efficientnet", f"{name}.yaml")
        assert config.model == chain.model  # --init-from needs the same network
        if name != "model1":  # recipe.sh starts them --init-from the model before: one stage, the train settings
            config = config.model_copy(update={"train": config.train.model_copy(update={"init_from": "/model"})})
        (_, counts), = stage_counts(config, net).items()
        assert counts == expected[name], name
    settings(config_of("glaucoma_efficientnet", "model3.yaml"), {"train.batch_size": 16, "train.freeze": "none"})


def sum_bn_channels() -> int:
    """BatchNormalization channels of Keras's EfficientNet-B0 base (each has 2*C moving statistics)."""
    channels = 32  # stem_bn
    for repeats, fin, fout, expand in [(1, 32, 16, 1), (2, 16, 24, 6), (2, 24, 40, 6), (3, 40, 80, 6),
                                       (3, 80, 112, 6), (4, 112, 192, 6), (1, 192, 320, 6)]:
        for i in range(repeats):
            mid = (fin if i == 0 else fout) * expand
            channels += (mid if expand != 1 else 0) + mid + fout  # expand_bn, bn, project_bn
    return channels + 1280  # top_bn


KERAS_OPTIMIZERS = {  # (eps, rho, initial_accumulator_value) of Keras's optimizers with their defaults
    "adam": (1e-7, 0.9, None), "sgd": (None, 0.9, None), "adadelta": (1e-7, 0.95, None), "adagrad": (1e-7, 0.9, 0.1)}


@pytest.mark.parametrize("model,grid", [("model1.yaml", "grid_model1.yaml"), ("model2.yaml", "grid_model2.yaml")])
def test_glaucoma_grids_are_the_notebooks_with_kerass_optimizer_constants(model, grid):
    axes = yaml.safe_load((RECIPES / "glaucoma_efficientnet" / grid).read_text())
    assert [point["optimizer"] for point in axes["optimizer"]] == ["adam", "sgd", "adadelta", "adagrad"]
    assert (axes["lr"], axes["epochs"]) == ([1e-4, 1e-3], [10, 50])
    assert axes["batch_size"] == ([16, 32] if model == "model1.yaml" else [16, 32, 64])
    config = config_of("glaucoma_efficientnet", model)
    if model == "model2.yaml":  # recipe.sh runs it --init-from model 1's winner: one stage, the train settings
        config = config.model_copy(update={"train": config.train.model_copy(update={"init_from": "/model"})})
    trials = trial_configs(config, parse_params([], str(RECIPES / "glaucoma_efficientnet" / grid)), Path("/g"))
    assert len(trials) == 4 * 2 * 2 * len(axes["batch_size"])
    for _, _, trial in trials:
        train = trial.train
        assert (train.eps, train.rho, train.initial_accumulator_value) == KERAS_OPTIMIZERS[train.optimizer]
        assert train.momentum == 0.0


# --- Bears, 5 classes, 150 px ----------------------------------------------------------------------------------


def test_bears_simple_cnn_is_the_keras_network():
    net, shape = build(config_of("bears", "cnn.yaml"), 5)
    assert keras_layers(net, shape) == ["Conv2D(relu)", "MaxPooling2D"] * 3 + ["Flatten", "Dense(relu)", "Dense"]
    # 3*3*3*32+32 + 3*3*32*64+64 + 3*3*64*128+128 + Dense(512) on 17*17*128 + Dense(5) on 512
    total = conv2d(3, 3, 32) + conv2d(3, 32, 64) + conv2d(3, 64, 128) + dense(17 * 17 * 128, 512) + dense(512, 5)
    assert total == 896 + 18_496 + 73_856 + 18_940_416 + 2_565 == 19_036_229
    assert keras_counts(net) == all_trainable(total)


@pytest.mark.slow
def test_bears_frozen_vgg16_is_the_keras_network():
    config = config_of("bears", "vgg16.yaml")
    net, shape = build(config, 5)
    assert keras_layers(net, shape)[-3:] == ["Flatten", "Dense(relu)", "Dense"]
    head = dense(4 * 4 * 512, 512) + dense(512, 5)  # 8192*512+512 + 512*5+5
    assert stage_counts(config, net) == {"frozen": Counts(head, VGG16_BASE)}


# --- model-info on every recipe config -------------------------------------------------------------------------

CLASSES = {"covid_densenet169": 3, "covid_binary_cnn": 2, "blood_cells": 4, "glaucoma_efficientnet": 2, "bears": 5}
CONFIGS = [p for p in sorted(RECIPES.glob("*/*.yaml")) if "model" in yaml.safe_load(p.read_text())]


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_model_info_summarises_each_recipe_config(path, capsys):
    classes = CLASSES[path.parent.name]
    assert main(["model-info", str(path), "--no-pretrained", "--classes", str(classes), "--depth", "1"]) == 0
    out = capsys.readouterr().out
    config = load_config(path)
    config = config.model_copy(update={"model": config.model.model_copy(update={"pretrained": False})})
    net, _ = build(config, classes)
    apply_freeze(net, *next((t.freeze, t.freeze_bn) for _, t in resolve_stages(config)))
    counts = keras_counts(net)
    assert f"Total params: {counts.total:,}" in out and f"Trainable params: {counts.trainable:,}" in out


# --- every recipe, end to end on tiny images -------------------------------------------------------------------

FAST = ["--epochs", "1", "--patience", "1", "--no-pretrained", "--no-report", "--precision", "fp32",
        "--workers", "0", "--bootstrap", "0", "--no-baseline"]


def shrunk_copy(recipe: str, tmp_path: Path) -> Path:
    """The recipe's folder with every stage's epochs at 1 and each grid axis at its first values
    (two optimizers, one epoch); networks and every other setting untouched."""
    folder = shutil.copytree(RECIPES / recipe, tmp_path / recipe)
    for path in folder.glob("*.yaml"):
        values = yaml.safe_load(path.read_text())
        if "model" in values:
            for stage in values.get("stages", []):
                stage["epochs"] = 1
        elif recipe == "glaucoma_efficientnet":
            values = {key: axis[:2] if key == "optimizer" else axis[:1] for key, axis in values.items()}
            values["epochs"] = [1]
        path.write_text(yaml.safe_dump(values))
    return folder


def run_recipe(folder: Path, *args) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(["bash", str(folder / "recipe.sh"), *map(str, args)], capture_output=True, text=True,
                            env=env, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


def rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_covid_densenet169_recipe_runs(tmp_path):
    data = make_split_folders(tmp_path / "data", {"train": 6, "val": 3}, classes=["covid", "normal", "viral"])
    run_recipe(shrunk_copy("covid_densenet169", tmp_path), data, tmp_path / "out", "--image-size", "32", *FAST)
    run = tmp_path / "out" / "densenet169"
    history = rows(run / "history.csv")
    assert {"train_accuracy", "train_recall_macro", "val_accuracy", "val_recall_macro"} <= history[0].keys()
    assert history[0]["stage"] == "conv5"
    assert all((run / "plots" / f).is_file() for f in ("curves.png", "confusion_train.png", "confusion_val.png"))
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"train", "val"} <= metrics.keys()
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["model"]["head_layers"] == ["flatten", "bn keras", "dense 256 relu", "dropout 0.4", "bn keras",
                                                "dense 128 relu", "dropout 0.4"]


@pytest.mark.slow
def test_covid_binary_cnn_recipe_runs(tmp_path):
    data = make_split_folders(tmp_path / "data", {"train": 8, "val": 4, "test": 4}, classes=["covid", "normal"])
    unlabeled = make_class_folders(tmp_path / "new", 3, classes=["scans"]) / "scans"
    # 190 px: the smallest input the 6-conv variant takes (190 -> 94 -> 46 -> 22 -> 10 -> 4 -> 1)
    run_recipe(shrunk_copy("covid_binary_cnn", tmp_path), data, unlabeled, tmp_path / "out", "--image-size", "190",
               *FAST)
    out = tmp_path / "out"
    assert "f1_macro" in json.loads((out / "cnn" / "metrics.json").read_text())["test"]
    predicted = rows(out / "unlabeled_predictions.csv")
    assert len(predicted) == 3 and "true_label" not in predicted[0]
    assert len(rows(out / "variants" / "leaderboard.csv")) == 7


@pytest.mark.slow
def test_blood_cells_recipe_runs(tmp_path):
    classes = ["EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL"]
    data = make_split_folders(tmp_path / "data", {"train": 8, "test": 3}, classes=classes)
    # 94 px: the smallest input the 5-block CNN takes (94 -> 46 -> 22 -> 10 -> 4 -> 1)
    log = run_recipe(shrunk_copy("blood_cells", tmp_path), data, tmp_path / "out", "--image-size", "94", *FAST)
    out = tmp_path / "out"
    assert len(rows(out / "cnn_optimizers" / "leaderboard.csv")) == 3
    members = json.loads((out / "cnn_ensemble" / "ensemble.json").read_text())
    assert len(members["members"]) == 3
    assert (out / "cnn_svm" / "head.skops").is_file() and (out / "hybrid_svm" / "head.skops").is_file()
    for svm in ("cnn_svm", "hybrid_svm"):  # SVC(): C=1 on raw features, no search
        recorded = yaml.safe_load((out / svm / "config.yaml").read_text())["train"]
        assert (recorded["head_param"], recorded["head_scale"]) == (1.0, False)
        assert [r["param"] for r in rows(out / svm / "history.csv")] == ["C=1.0"]
    assert [r["stage"] for r in rows(out / "vgg16" / "history.csv")] == ["frozen", "block5"]
    assert "block1_conv1 is features.1 " in log and "block3_conv1 is features.11 " in log
    assert any(p.name.endswith("_features.png") for p in (out / "vgg16_maps").iterdir())
    assert len(rows(out / "compare" / "compare.csv")) == 8


@pytest.mark.slow
def test_glaucoma_chain_recipe_runs(tmp_path):
    folds = tmp_path / "folds"
    for k in range(2):
        make_split_folders(folds / f"Fold{k}", {"train": 6, "valid": 3, "test": 3}, classes=["glaucoma", "normal"],
                           seed=k)
    run_recipe(shrunk_copy("glaucoma_efficientnet", tmp_path), folds, tmp_path / "out", "--image-size", "32", *FAST)
    out = tmp_path / "out"
    for grid in ("model1_grid", "model2_grid"):
        board = rows(out / grid / "leaderboard.csv")
        assert [r["param_optimizer"] for r in sorted(board, key=lambda r: r["trial"])] == ["adam", "sgd"]
        assert all(float(r["seconds"]) > 0 for r in board)
    best2 = json.loads((out / "model2_grid" / "best.json").read_text())["best_trial"]
    model3 = yaml.safe_load((out / "model3" / "config.yaml").read_text())["train"]
    assert model3["init_from"] == str(out / "model2_grid" / "trials" / best2) and model3["batch_size"] == 16
    best1 = json.loads((out / "model1_grid" / "best.json").read_text())["best_trial"]
    trial = yaml.safe_load((out / "model2_grid" / "trials" / best2 / "config.yaml").read_text())["train"]
    assert trial["init_from"] == str(out / "model1_grid" / "trials" / best1)
    summary = {r[next(iter(r))]: r for r in rows(out / "cv" / "summary.csv")}
    assert "seconds" in summary
    assert [r["stage"] for r in rows(out / "cv" / "fold_0" / "history.csv")] == ["model1", "model2", "model3"]
    fold = yaml.safe_load((out / "cv" / "fold_0" / "config.yaml").read_text())["stages"]
    for position, grid in enumerate(("model1_grid", "model2_grid")):  # cv --from-grid: each stage its winner
        best = json.loads((out / grid / "best.json").read_text())
        assert best["rank_by"] == ["val_f1_macro", "val_accuracy"]
        assert {k: fold[position][k] for k in best["params"]} == best["params"]
    assert list(rows(out / "model1_grid" / "leaderboard.csv")[0])[2:4] == ["val_f1_macro", "val_accuracy"]


@pytest.mark.slow
def test_bears_recipe_runs(tmp_path):
    classes = ["black", "brown", "grizzly", "panda", "polar"]
    data = make_split_folders(tmp_path / "data", {"train": 6, "val": 3, "test": 3}, classes=classes)
    run_recipe(shrunk_copy("bears", tmp_path), data, tmp_path / "out", "--image-size", "32", *FAST)
    out = tmp_path / "out"
    compared = rows(out / "compare" / "compare.csv")
    assert len(compared) == 2 and {"test_f1_weighted", "test_precision_weighted"} <= compared[0].keys()
    for name in ("cnn", "vgg16"):
        predicted = rows(out / f"{name}_test_predictions.csv")
        assert len(predicted) == 15 and {r["true_label"] for r in predicted} == set(classes)
        assert (out / name / "plots" / "confusion_test.png").is_file()
