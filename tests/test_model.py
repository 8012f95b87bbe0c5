import logging
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

from imgclf.cli import main
from imgclf.config import ModelConfig, build_config
from imgclf.config.layers import expand_conv
from imgclf.errors import ConfigError
from imgclf.models.checkpoint import check_fits, fill_skeleton, save_weights
from imgclf.models.freeze import apply_freeze
from imgclf.models.networks import SimpleCNN, build_model, check_input_size, output_units, resolve_preprocess


def build(channels=3, size=32, classes=3, **fields):
    cfg = ModelConfig(**fields)
    return build_model(cfg, classes, resolve_preprocess(cfg, size, channels))


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.fixture(autouse=True)
def _own_log_handlers(monkeypatch):
    """main() gives the imgclf logger a handler on this test's captured stderr; it leaves with the test."""
    logger = logging.getLogger("imgclf")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)


def test_simple_cnn_expresses_the_keras_networks_users_write():
    model = build(conv_filters=[64, 64, 64, 64], conv_dropout=0.25, conv_batchnorm=False, pool="flatten",
                  dense_layers=[512], dropout=0.5, channels=1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 64, 64] and convs[0].in_channels == 1
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    dense = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
    assert [d.out_features for d in dense] == [512, 3] and dense[0].in_features == 64 * 2 * 2  # flatten 32/16
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)


@pytest.mark.parametrize("pool", ["avg", "max", "flatten"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2_100"])
def test_timm_backbones_with_every_head_option(name, pool):
    model = build(name=name, pool=pool, dense_layers=[32], head_batchnorm=True, channels=1)
    model.eval()
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert model.embed(torch.randn(2, 1, 32, 32)).shape == (2, 32)


def test_binary_single_logit_head():
    cfg = ModelConfig(binary_head="sigmoid")
    assert output_units(cfg, 2) == 1 and output_units(cfg, 3) == 3
    model = build(binary_head="sigmoid", classes=2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1)


def test_preprocessing_follows_the_models_data_config():
    timm_pre = resolve_preprocess(ModelConfig(name="resnet18"), None, 3)
    assert timm_pre.size == 224 and timm_pre.mean == (0.485, 0.456, 0.406)
    assert resolve_preprocess(ModelConfig(name="resnet18"), None, 1).mean == (pytest.approx(0.449),)
    assert resolve_preprocess(ModelConfig(), None, 3).size == 64


def test_unknown_model_suggests_close_names():
    with pytest.raises(ConfigError, match="did you mean.*resnet18"):
        build(name="resnet81")


def test_simple_cnn_is_a_feature_map_backbone():
    assert SimpleCNN(3, expand_conv([8, 16], 3, 0.0, True))(torch.randn(1, 3, 16, 16)).shape == (1, 16, 4, 4)


# --- issue 16 item 1: backbones cut where Keras cuts them -------------------------------------------------------


@pytest.mark.parametrize("name, cut", [("mobilenetv3_small_050", "conv_head"), ("convnext_atto", "head")])
def test_timm_backbones_end_at_their_last_feature_map_unless_pre_logits(name, cut):
    """Keras include_top=False ends at the last map: MobileNetV3's 1x1 conv after pooling and ConvNeXt's head
    norm belong to the top, as VGG's fc6/fc7 do (test_layers.py counts VGG16)."""
    model = build(name=name, size=32).eval()
    assert model.backbone(torch.zeros(1, 3, 32, 32)).ndim == 4
    assert isinstance(model.backbone.get_submodule(cut), nn.Identity)
    reference = timm.create_model(name, num_classes=0)
    kept = sum(p.numel() for p in model.backbone.parameters())
    assert kept == sum(p.numel() for p in reference.parameters()) - sum(
        p.numel() for p in reference.get_submodule(cut).parameters())
    with_top = build(name=name, size=32, pre_logits=True)
    assert sum(p.numel() for p in with_top.backbone.parameters()) == sum(p.numel() for p in reference.parameters())
    assert with_top.eval().backbone(torch.zeros(1, 3, 32, 32)).ndim == 2  # timm's pooled pre-logits vector


def test_a_vision_transformer_is_pooled_by_its_own_rule():
    model = build(name="vit_tiny_patch16_224", size=224, head_layers=["gap", "dense 16 relu"]).eval()
    assert model.backbone.global_pool == "token"  # the class token, not an average of the tokens
    assert model.embed(torch.zeros(1, 3, 224, 224)).shape == (1, 16)


def test_an_older_runs_config_rebuilds_the_architecture_it_trained():
    """A config.yaml from before pre_logits lists every older field: timm's pre-logits stay, the timm model's
    unused conv defaults are dropped, and the state-dict keys are the ones that run saved."""
    older = {"name": "mobilenetv3_small_050", "head": "linear", "conv_filters": [32, 64, 128], "kernel_size": 3,
             "conv_dropout": 0.0, "conv_batchnorm": True, "pool": "max", "dense_layers": [16], "dropout": 0.1,
             "head_batchnorm": True, "binary_head": "softmax", "pretrained": False, "weights": None,
             "weights_map": "auto"}
    cfg = build_config({"model": older}).model
    assert cfg.pre_logits and cfg.conv_layers is None and cfg.conv_filters is None
    assert cfg.head_layers == ["gmp", "bn torch", "dropout 0.1", "dense 16 relu", "dropout 0.1"]
    saved = {f"backbone.{k}": v for k, v in timm.create_model(older["name"], num_classes=0, global_pool="max")
             .state_dict().items()}
    saved |= {"head.hidden.0.weight": torch.zeros(1024), "head.hidden.2.weight": torch.zeros(16, 1024),
              "head.fc.weight": torch.zeros(3, 16)}
    model = build_model(cfg, 3, resolve_preprocess(cfg, 32, 3))
    assert shapes({k: v for k, v in model.state_dict().items() if k in saved}) == shapes(saved)
    assert {k for k in model.state_dict() if k.startswith("backbone.")} == {k for k in saved if "backbone" in k}
    new = build_config({"model": {k: v for k, v in older.items() if k != "weights_map"}}).model
    assert not new.pre_logits  # a config a person wrote is new: Keras's cut


# --- issue 16 item 3: input normalisation -------------------------------------------------------------------------


def test_normalisation_is_selectable_and_follows_the_model_by_default():
    def mean_std(channels=3, **fields):
        pre = resolve_preprocess(ModelConfig(**fields), 32, channels)
        return pre.mean, pre.std

    assert mean_std() == ((0.0,) * 3, (1.0,) * 3)  # simple_cnn: rescale, as Keras notebooks do
    assert mean_std(name="resnet18") == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert mean_std(name="vit_tiny_patch16_224") == ((0.5,) * 3, (0.5,) * 3)  # its own, not ImageNet's
    assert mean_std(name="vit_tiny_patch16_224", normalize="imagenet")[0] == (0.485, 0.456, 0.406)
    assert mean_std(name="resnet18", normalize="rescale") == ((0.0,) * 3, (1.0,) * 3)
    assert mean_std(normalize="none") == ((0.0,) * 3, (1 / 255,) * 3)  # 0..255 floats after the [0, 1] scaling
    assert mean_std(normalize="imagenet", channels=1)[0] == (pytest.approx(0.449),)


# --- settings the model has no use for, and sizes it cannot take --------------------------------------------------


def test_settings_the_model_ignores_are_named_in_a_warning(caplog):
    caplog.set_level(logging.WARNING, logger="imgclf")
    cfg = build_config({"model": {"name": "resnet18", "conv_filters": [8]}}).model
    check_input_size(cfg, resolve_preprocess(cfg, 32, 3))
    assert "model.conv_filters describe simple_cnn's layers; resnet18 is a timm backbone" in caplog.text
    leftover = build_config({"model": {"name": "resnet18", "conv_layers": expand_conv([32, 64, 128], 3, 0.0, True)}})
    assert leftover.model.conv_layers is None  # the default list of a simple_cnn config, not the user's choice
    caplog.clear()
    check_input_size(ModelConfig(pre_logits=True), resolve_preprocess(ModelConfig(), 32, 3))
    assert "pre_logits applies to timm models" in caplog.text
    with pytest.raises(ConfigError, match="simple_cnn has none: give rescale"):  # it rescaled without a word
        check_input_size(ModelConfig(normalize="model"), resolve_preprocess(ModelConfig(), 32, 3))


def test_a_too_small_image_names_the_smallest_that_fits():
    cfg = ModelConfig(conv_layers=["conv 8 5 valid relu", "pool max 2"] * 3)
    with pytest.raises(ConfigError, match=r"image_size 24 .* 3 conv blocks .* --image-size 36 or more"):
        check_input_size(cfg, resolve_preprocess(cfg, 24, 3))
    check_input_size(cfg, resolve_preprocess(cfg, 36, 3))
    assert build_model(cfg, 2, resolve_preprocess(cfg, 36, 3))(torch.zeros(1, 3, 36, 36)).shape == (1, 2)


# --- issue 16 item 4: model-info as a Keras summary ---------------------------------------------------------------


@pytest.mark.parametrize("classes", ["0", "10001"])
def test_model_info_classes_out_of_range_is_one_line(capsys, classes):
    assert main(["model-info", "simple_cnn", "--classes", classes]) == 2  # 1e6 would allocate the layer first
    err = capsys.readouterr().err
    assert f"--classes {classes}: give 1 to 10,000" in err and "Traceback" not in err


def test_model_info_of_a_config_file_counts_each_stage(tmp_path, capsys):
    config = {"model": {"name": "resnet18", "head_layers": ["gap", "dense 8 relu"]}, "data": {"image_size": 32},
              "stages": [{"name": "head", "freeze": "backbone"}, {"name": "all", "freeze": "none"}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["model-info", str(tmp_path / "c.yaml"), "--classes", "4"]) == 0
    out = capsys.readouterr().out
    head = 512 * 8 + 8 + 8 * 4 + 4
    assert "head.hidden.0 (Linear)" in out and "(None, 512, 1, 1)" in out and "(None, 4)" in out
    assert f"Trainable params: {head:,}" in out  # the table is the first stage: backbone frozen
    assert f"head         freeze=backbone: {head:,} trainable" in out and "all          freeze=none" in out
    assert "layer4.1.conv2" in out and "last:1" in out


def test_model_info_refuses_what_cannot_change_the_model_and_a_model_or_config_given_twice(tmp_path, capsys):
    def error(*args):
        assert main(["model-info", *map(str, args)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        return err

    assert "--model resnet18: give the model once" in error("simple_cnn", "--model", "resnet18", "--image-size", "32")
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({"data": {"image_size": 32}}))
    (tmp_path / "b.yaml").write_text(yaml.safe_dump({"data": {"image_size": 48}}))
    assert "give the config once" in error(tmp_path / "a.yaml", "--config", tmp_path / "b.yaml")
    line = error("simple_cnn", "--image-size", "32", "--epochs", "7", "--device", "cpu", "--tta", "flip")
    assert "which --tta, --device, --epochs would not change; drop them" in line
    assert main(["model-info", "simple_cnn", "--image-size", "32", "--channels", "1", "--freeze", "last:1",
                 "--dropout", "0.3"]) == 0  # the model, its input and its freezing: each shown
    assert "input 1x32x32" in capsys.readouterr().out


def test_model_info_of_a_run_directory(trained_run, capsys):
    assert main(["model-info", str(trained_run.path)]) == 0
    out = capsys.readouterr().out
    assert "backbone.features.0 (Conv2d)" in out and f"(None, {len(trained_run.classes)})" in out
    assert main(["model-info", str(trained_run.path), "--dropout", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "shown as it was trained; drop dropout" in err and len(err.splitlines()) == 1
    assert main(["model-info", str(trained_run.path), "--classes", "7"]) == 2  # it knows its own: not ignored
    assert "drop classes" in capsys.readouterr().err


def test_model_info_of_a_run_made_by_version_0_1(capsys):
    """The committed 0.1 run (tests/fixtures/run_v0_1) loads with its weights and is summarised."""
    fixture = Path(__file__).parent / "fixtures" / "run_v0_1"
    assert main(["model-info", str(fixture)]) == 0
    out = capsys.readouterr().out
    assert "head gap, dropout 0 -> 2 output(s)" in out and "backbone.features.4 (Conv2d)" in out
    assert f"Total params: {3 * 3 * 3 * 4 + 4 * 4 + 3 * 3 * 4 * 8 + 4 * 8 + 8 * 2 + 2:,}" in out


class _Odd(nn.Module):
    def __init__(self, extra: str):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.norm = nn.BatchNorm1d(2)  # buffers the file fills
        if extra == "non-persistent buffer":
            self.register_buffer("scale", torch.ones(2), persistent=False)
        elif extra == "plain tensor":
            self.scale = torch.ones(2)
        elif extra == "tensors in a list":
            self.scales = [torch.ones(2)]
        elif extra == "shared parameter":
            self.tied = nn.Linear(4, 2)
            self.tied.weight = self.linear.weight


def _trained_and_loaded(cfg: ModelConfig, size: int, path: Path) -> tuple[nn.Module, nn.Module]:
    """A freshly built model, saved to ``path``, and the same weights loaded through a meta-device skeleton."""
    preprocess = resolve_preprocess(cfg, size, 3)
    trained = build_model(cfg, 3, preprocess).eval()
    save_weights(trained, path, {})
    with torch.device("meta"):
        skeleton = build_model(cfg, 3, preprocess)
    check_fits(skeleton, path)
    return trained, fill_skeleton(skeleton, path).eval()


def test_a_saved_model_loads_into_a_skeleton_without_initialising_it(tmp_path):
    cfg = ModelConfig(name="simple_cnn", conv_filters=[8, 16], dense_layers=[12], pool="flatten")
    trained, loaded = _trained_and_loaded(cfg, 24, tmp_path / "w.safetensors")
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    for name, tensor in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    images = torch.rand(2, 3, 24, 24)
    assert torch.equal(loaded(images), trained(images))


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "efficientnet_b0", "mobilenetv2_100"])
def test_timm_backbones_load_through_the_skeleton_bit_for_bit(tmp_path, name):
    trained, loaded = _trained_and_loaded(ModelConfig(name=name, pretrained=False), 64, tmp_path / "w.safetensors")
    images = torch.rand(2, 3, 64, 64)
    assert torch.equal(loaded(images), trained(images))


@pytest.mark.parametrize("extra", ["non-persistent buffer", "plain tensor", "tensors in a list", "shared parameter"])
def test_a_model_with_tensors_its_file_cannot_fill_is_built_the_ordinary_way(tmp_path, extra):
    save_weights(_Odd("nothing"), tmp_path / "w.safetensors", {})
    with torch.device("meta"):
        plain, skeleton = _Odd("nothing"), _Odd(extra)
    assert fill_skeleton(plain, tmp_path / "w.safetensors") is not None  # BatchNorm's buffers come from the file
    assert fill_skeleton(skeleton, tmp_path / "w.safetensors") is None


def test_freezing_all_but_more_layers_than_the_backbone_has_says_so(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("imgclf"), "propagate", True)  # an in-process CLI call turns it off
    caplog.set_level(logging.WARNING, logger="imgclf")
    model = build(conv_filters=[8, 16])  # two convolutions
    apply_freeze(model, "last:99")
    assert "freeze last:99: the backbone has 2 layers with weights, so all of them train" in caplog.text
    assert all(p.requires_grad for p in model.parameters())
    caplog.clear()
    apply_freeze(model, "last:1")
    apply_freeze(model, "last:99", say=False)  # a finished run's counts read back (imgclf compare)
    assert "freeze" not in caplog.text
