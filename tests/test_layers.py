"""The layer-list grammar, and the five notebook networks of issue 16 rebuilt layer for layer.

Every expected parameter count below is computed by hand from the Keras layer list, with Keras's
rules: Conv2D = k*k*in*out (+ out with a bias), Dense = in*out + out, BatchNormalization = 4*C of
which 2*C (the moving mean and variance) are non-trainable. The pretrained backbones are counted
from their published architectures the same way (VGG16's conv blocks, DenseNet169's dense blocks,
EfficientNet-B0's MBConv blocks); no number is read off the model under test.
"""

import logging

import pytest
import torch

import imgclf
from clitools import assert_clean_error
from clitools import imgclf as imgclf_cli
from imgclf.cli import main
from imgclf.config import build_config
from imgclf.config.layers import contract_conv, contract_head, expand_conv, expand_head
from imgclf.errors import ConfigError
from imgclf.models.freeze import apply_freeze
from imgclf.models.networks import build_model, check_input_size, resolve_preprocess
from imgclf.models.summary import Counts, keras_counts, keras_layers

from conftest import tiny_config
from imagefactory import make_class_folders


def conv2d(k, cin, cout, bias=True):
    return k * k * cin * cout + (cout if bias else 0)


def dense(nin, nout):
    return nin * nout + nout


def bn(c):
    return 4 * c


@pytest.fixture(autouse=True)
def _own_log_handlers(monkeypatch):
    """main() gives the imgclf logger a handler on this test's captured stderr; it leaves with the test."""
    logger = logging.getLogger("imgclf")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)


def build(model, classes, size, channels=3, freeze="none"):
    config = build_config({"model": model, "data": {"image_size": size, "channels": channels}})
    pre = resolve_preprocess(config.model, size, channels)
    check_input_size(config.model, pre)
    net = build_model(config.model, classes, pre)
    apply_freeze(net, freeze)
    return net


def trainable_all(total):
    return Counts(total, 0)


# --- the grammar ------------------------------------------------------------------------------------------------


def test_items_are_recorded_in_one_spelling_with_keras_defaults_filled_in():
    cfg = build_config({"model": {"conv_layers": ["conv 32 3x3", "Conv 8 5 same relu nobias", "pool", "pool avg 3",
                                                  "bn", "relu", "dropout .25"],
                                  "head_layers": ["flatten", "dense 64", "bn torch", "dense 16 relu"]}}).model
    assert cfg.conv_layers == ["conv 32 3 valid none", "conv 8 5 same relu nobias", "pool max 2", "pool avg 3",
                               "bn keras", "relu", "dropout 0.25"]
    assert cfg.head_layers == ["flatten", "dense 64 none", "bn torch", "dense 16 relu"]


def test_a_head_without_a_vector_item_takes_it_from_pool():
    assert build_config({"model": {"head_layers": ["bn", "dense 8 relu"]}}).model.head_layers[0] == "gap"
    cfg = build_config({"model": {"pool": "flatten", "head_layers": ["dense 8 relu"]}}).model
    assert cfg.head_layers == ["flatten", "dense 8 relu"]
    assert build_config({"model": {"head_layers": []}}).model.head_layers == ["gap"]  # GAP straight to the classifier


@pytest.mark.parametrize("model, fragments", [
    ({"head_layers": ["bn", "dense 256 rleu"]}, ["head_layers[1]", "dense 256 rleu", "unknown activation 'rleu'"]),
    ({"head_layers": ["dense 3 softmax"]}, ["head_layers[0]", "final classifier is added by imgclf"]),
    ({"head_layers": ["dense 8", "flatten"]}, ["head_layers[1]", "first item"]),
    ({"head_layers": ["conv 8 3"]}, ["head_layers[0]", "conv belongs in model.conv_layers"]),
    ({"conv_layers": ["conv 8 3", "dense 8"]}, ["conv_layers[1]", "dense belongs in model.head_layers"]),
    ({"conv_layers": ["conv 8"]}, ["conv_layers[0]", "conv FILTERS KERNEL"]),
    ({"conv_layers": ["conv 8 3 diagonal"]}, ["conv_layers[0]", "'diagonal' is not a padding"]),
    ({"conv_layers": ["conv 8 3x5"]}, ["only square kernels"]),
    ({"conv_layers": ["dropout 1.5"]}, ["conv_layers[0]", "0 <= P < 1"]),
    ({"conv_layers": ["pool max 2"]}, ["no conv item"]),
    ({"conv_layers": ["maxpool 2"]}, ["unknown layer 'maxpool'"]),
])
def test_bad_grammar_is_one_line_naming_the_item(model, fragments):
    with pytest.raises(ConfigError) as err:
        build_config({"model": model})
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_keras_padding_valid_same_and_even_kernels():
    cases = {"conv 4 3 valid": 14, "conv 4 3 same": 16, "conv 4 4 same": 16, "conv 4 5 2": 16, "conv 4 2": 15}
    for item, side in cases.items():
        net = build({"conv_layers": [item]}, 2, 16)
        assert tuple(net.backbone(torch.zeros(1, 3, 16, 16)).shape) == (1, 4, side, side), item


# --- the shorthand flags: the lists they stand for --------------------------------------------------------------


def test_the_shorthand_expands_to_the_network_the_flags_always_built():
    """Module by module (and so state-dict key by key), the simple CNN and head of imgclf 0.1."""
    net = build({"conv_filters": [8, 16], "conv_dropout": 0.1, "dense_layers": [32], "head_batchnorm": True,
                 "dropout": 0.3}, 3, 16)
    block = ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d", "Dropout"]
    assert [type(m).__name__ for m in net.backbone.features] == block * 2
    assert [type(m).__name__ for m in net.head.hidden] == ["BatchNorm1d", "Dropout", "Linear", "ReLU", "Dropout"]
    assert net.backbone.features[0].bias is None and net.backbone.features[0].padding == (1, 1)
    assert net.backbone.features[1].eps == 1e-5 and net.backbone.features[1].momentum == 0.1  # PyTorch's
    assert [k for k in net.state_dict() if k.endswith("weight")] == [
        "backbone.features.0.weight", "backbone.features.1.weight", "backbone.features.5.weight",
        "backbone.features.6.weight", "head.hidden.0.weight", "head.hidden.2.weight", "head.fc.weight"]
    plain = build({"conv_filters": [8], "conv_batchnorm": False, "kernel_size": 4}, 2, 16).backbone.features
    assert [type(m).__name__ for m in plain] == ["Conv2d", "ReLU", "MaxPool2d"] and plain[0].padding == (2, 2)


def test_expansions_are_recognised_again():
    conv = {"conv_filters": [8, 16], "kernel_size": 5, "conv_dropout": 0.2, "conv_batchnorm": False}
    head = {"pool": "max", "dense_layers": [64, 8], "dropout": 0.5, "head_batchnorm": True}
    assert contract_conv(expand_conv(**conv)) == conv and contract_head(expand_head(**head)) == head
    assert contract_head(["flatten", "bn keras", "dense 8 relu"]) is None
    assert contract_conv(["conv 8 3 valid relu", "pool max 2"]) is None


def test_a_shorthand_flag_on_a_saved_config_rebuilds_a_flag_made_list_and_refuses_a_hand_written_one():
    saved = build_config({"model": {"dense_layers": [64], "dropout": 0.3}}).model_dump()
    saved["model"]["dropout"] = 0.5  # e.g. --config run/config.yaml --dropout 0.5, or a grid axis
    assert build_config(saved).model.head_layers == ["gap", "dropout 0.5", "dense 64 relu", "dropout 0.5"]
    saved["model"]["conv_filters"] = [4]
    assert build_config(saved).model.conv_layers == expand_conv([4], 3, 0.0, True)
    hand = build_config({"model": {"head_layers": ["flatten", "bn", "dense 8 relu"]}}).model_dump()
    assert hand["model"]["dense_layers"] is None  # the list is the record; the shorthand was not given
    assert build_config(hand).model.head_layers == ["flatten", "bn keras", "dense 8 relu"]
    hand["model"]["dropout"] = 0.5
    with pytest.raises(ConfigError, match="head_layers is a hand-written list and dropout=0.5 would change it"):
        build_config(hand)


def test_cli_layer_flags_reach_the_recorded_config(tmp_path, capsys):
    assert main(["model-info", "simple_cnn", "--image-size", "16", "--conv-layers", "conv 4 3 same relu, pool max 2",
                 "--head-layers", "flatten, dropout 0.5, dense 8 relu", "--classes", "3"]) == 0
    out = capsys.readouterr().out
    assert "backbone.features.0 (Conv2d)" in out and "(None, 4, 16, 16)" in out
    assert "head.hidden.1 (Linear)" in out and f"{dense(4 * 8 * 8, 8):,}" in out
    assert main(["model-info", "simple_cnn", "--head-layers", "dense 8 softmax"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imgclf: error:") and "final classifier" in err and len(err.splitlines()) == 1


# --- the five notebook networks ---------------------------------------------------------------------------------


def vgg16_base():
    blocks, total, cin = [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]], 0, 3
    for block in blocks:
        for cout in block:
            total, cin = total + conv2d(3, cin, cout), cout
    return total


def densenet169_base():
    total, c = conv2d(7, 3, 64, bias=False) + bn(64), 64
    for i, layers in enumerate([6, 12, 32, 32]):
        for _ in range(layers):
            total, c = total + bn(c) + conv2d(1, c, 128, bias=False) + bn(128) + conv2d(3, 128, 32, bias=False), c + 32
        if i < 3:
            total, c = total + bn(c) + conv2d(1, c, c // 2, bias=False), c // 2
    return total + bn(c), c


def densenet169_conv5_trainable():
    """Keras layers named conv5_*: block 4's 32 layers; BatchNorm's gamma and beta train, the final 'bn' not."""
    return sum(2 * c + conv2d(1, c, 128, bias=False) + 2 * 128 + conv2d(3, 128, 32, bias=False)
               for c in range(640, 640 + 32 * 32, 32))


def efficientnet_b0_base():
    """Keras EfficientNetB0(include_top=False) without its input Normalization layer (7 numbers)."""
    total = conv2d(3, 3, 32, bias=False) + bn(32)
    for k, repeats, fin, fout, expand in [(3, 1, 32, 16, 1), (3, 2, 16, 24, 6), (5, 2, 24, 40, 6), (3, 3, 40, 80, 6),
                                          (5, 3, 80, 112, 6), (5, 4, 112, 192, 6), (3, 1, 192, 320, 6)]:
        for i in range(repeats):
            cin = fin if i == 0 else fout
            mid, squeeze = cin * expand, max(1, int(cin * 0.25))
            total += (conv2d(1, cin, mid, bias=False) + bn(mid)) if expand != 1 else 0
            total += k * k * mid + bn(mid) + conv2d(1, mid, squeeze) + conv2d(1, squeeze, mid)
            total += conv2d(1, mid, fout, bias=False) + bn(fout)
    return total + conv2d(1, 320, 1280, bias=False) + bn(1280)


def test_covid_binary_cnn_at_256x256x1():
    """4 x [Conv 64 3x3 valid relu, Dropout .25, MaxPool 2], Flatten, Dense 64 relu, Dropout .35, Dense 1."""
    net = build({"conv_layers": ["conv 64 3 valid relu", "dropout 0.25", "pool max 2"] * 4,
                 "head_layers": ["flatten", "dense 64 relu", "dropout 0.35"], "binary_head": "sigmoid"}, 2, 256, 1)
    assert keras_layers(net, (1, 256, 256)) == ["Conv2D(relu)", "Dropout", "MaxPooling2D"] * 4 + [
        "Flatten", "Dense(relu)", "Dropout", "Dense"]
    side = 256
    for _ in range(4):
        side = (side - 2) // 2  # valid 3x3, then max-pool 2
    assert side == 14
    total = conv2d(3, 1, 64) + 3 * conv2d(3, 64, 64) + dense(side * side * 64, 64) + dense(64, 1)
    assert total == 914_369 and keras_counts(net) == trainable_all(total)


def test_blood_cell_cnn_and_hybrid_feature_extractor_at_150px():
    sizes = [32, 64, 64, 128, 128]
    net = build({"conv_layers": [x for f in sizes for x in (f"conv {f} 3 valid relu", "pool max 2")],
                 "head_layers": ["flatten", "dropout 0.4", "dense 512 relu", "dense 128 relu"]}, 4, 150)
    assert keras_layers(net, (3, 150, 150)) == ["Conv2D(relu)", "MaxPooling2D"] * 5 + [
        "Flatten", "Dropout", "Dense(relu)", "Dense(relu)", "Dense"]
    convs = sum(conv2d(3, cin, cout) for cin, cout in zip([3, *sizes], sizes, strict=False))
    total = convs + dense(2 * 2 * 128, 512) + dense(512, 128) + dense(128, 4)  # 150 -> 74 -> 36 -> 17 -> 7 -> 2
    assert keras_counts(net) == trainable_all(total)

    hybrid = build({"conv_layers": ["conv 5 5 valid relu", "pool max 2", "conv 10 5 valid relu", "pool max 2",
                                    "conv 10 2 valid relu", "pool max 2"],
                    "head_layers": ["flatten", "dense 100 relu"]}, 4, 150)
    total = conv2d(5, 3, 5) + conv2d(5, 5, 10) + conv2d(2, 10, 10) + dense(16 * 16 * 10, 100) + dense(100, 4)
    assert keras_counts(hybrid) == trainable_all(total)  # 150 -> 73 -> 34 -> 16
    assert hybrid.eval().embed(torch.zeros(2, 3, 150, 150)).shape == (2, 100)  # the SVM's features


def test_bears_simple_cnn_at_150px():
    net = build({"conv_layers": [x for f in (32, 64, 128) for x in (f"conv {f} 3 valid relu", "pool max 2")],
                 "head_layers": ["flatten", "dense 512 relu"]}, 5, 150)
    total = conv2d(3, 3, 32) + conv2d(3, 32, 64) + conv2d(3, 64, 128) + dense(17 * 17 * 128, 512) + dense(512, 5)
    assert keras_counts(net) == trainable_all(total)


@pytest.mark.slow
def test_bears_frozen_vgg16_under_flatten_dense_512_then_block5_unfrozen():
    """VGG16(include_top=False) is 14,714,688 parameters; timm's fc6/fc7 (119.5M) are not there."""
    net = build({"name": "vgg16", "head_layers": ["flatten", "dense 512 relu"]}, 5, 150, freeze="backbone")
    assert vgg16_base() == 14_714_688
    assert keras_layers(net, (3, 150, 150))[:-3] == ["Conv2D(relu)"] * 2 + ["MaxPooling2D"] + ["Conv2D(relu)"] * 2 + [
        "MaxPooling2D"] + (["Conv2D(relu)"] * 3 + ["MaxPooling2D"]) * 3
    head = dense(4 * 4 * 512, 512) + dense(512, 5)  # 150 px -> 4 x 4 x 512 after five pools
    assert keras_counts(net) == Counts(head, vgg16_base())
    apply_freeze(net, r"regex:^features\.(24|26|28)\.")  # Keras block5_conv1..3
    block5 = 3 * conv2d(3, 512, 512)
    assert keras_counts(net) == Counts(head + block5, vgg16_base() - block5)


@pytest.mark.slow
def test_covid_densenet169_with_only_conv5_trainable_and_the_final_batchnorm_frozen():
    base, channels = densenet169_base()
    assert (base, channels) == (12_642_880, 1664)
    net = build({"name": "densenet169", "head_layers": ["flatten", "bn", "dense 256 relu", "dropout 0.4", "bn",
                                                        "dense 128 relu", "dropout 0.4"]},
                3, 256, freeze="regex:denseblock4")
    assert keras_layers(net, (3, 256, 256))[-8:] == ["Flatten", "BatchNormalization", "Dense(relu)", "Dropout",
                                      "BatchNormalization", "Dense(relu)", "Dropout", "Dense"]
    flat = 8 * 8 * channels  # 256 px / 32
    head = bn(flat) + dense(flat, 256) + bn(256) + dense(256, 128) + dense(128, 3)
    head_trainable = head - 2 * flat - 2 * 256
    trainable = densenet169_conv5_trainable() + head_trainable
    assert keras_counts(net) == Counts(trainable, base + head - trainable)


def test_glaucoma_efficientnet_b0_with_global_max_pool_and_a_frozen_base():
    """Keras's count is 7 more: its EfficientNet starts with a Normalization layer (mean, variance, count);
    imgclf normalises the image before the network (model.json's preprocess)."""
    net = build({"name": "efficientnet_b0", "head_layers": ["gmp", "bn", "dropout 0.2"]}, 2, 32, freeze="backbone")
    assert efficientnet_b0_base() + 7 == 4_049_571
    assert keras_layers(net, (3, 32, 32))[-4:] == ["GlobalMaxPooling2D", "BatchNormalization", "Dropout", "Dense"]
    head = bn(1280) + dense(1280, 2)
    assert keras_counts(net) == Counts(2 * 1280 + dense(1280, 2), efficientnet_b0_base() + 2 * 1280)
    assert keras_counts(net).total == efficientnet_b0_base() + head


def test_a_run_with_layer_lists_records_them_and_loads(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6)
    layers = {"conv_layers": ["conv 4 3 valid relu", "dropout 0.1", "pool max 2"], "conv_filters": None,
              "head_layers": ["flatten", "bn", "dense 8 relu"], "dropout": None, "normalize": "none"}
    run = imgclf.train(tiny_config(data, tmp_path / "run", model=layers, train={"epochs": 1}))
    again = imgclf.load_run(run.path)
    assert again.config.model.conv_layers == ["conv 4 3 valid relu", "dropout 0.1", "pool max 2"]
    assert again.preprocess.std == (1 / 255,) * 3  # normalize none: 0..255 floats
    assert again.model(torch.zeros(1, 3, 16, 16)).shape == (1, len(again.classes))


def test_the_command_line_refuses_bad_layers_in_one_line_before_any_run_exists(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4)
    result = imgclf_cli("train", data, "--image-size", "16", "--head-layers", "flatten, dense 8 rleu",
                        "--out", tmp_path / "run", timeout=240)
    assert_clean_error(result, "model.head_layers[1]", "'dense 8 rleu'", "unknown activation")
    (tmp_path / "hand.yaml").write_text("model: {head_layers: [flatten, bn, dense 8 relu]}\n")
    result = imgclf_cli("train", data, "--config", tmp_path / "hand.yaml", "--dense-layers", "16",
                        "--out", tmp_path / "run", timeout=240)
    assert_clean_error(result, "head_layers is a hand-written list", "dense_layers=[16]", "--head-layers")
    assert not (tmp_path / "run").exists()
