import pytest
import torch
from torch import nn

from imgclf.config import ModelConfig
from imgclf.errors import ConfigError
from imgclf.models.networks import SimpleCNN, build_model, output_units, resolve_preprocess


def build(channels=3, size=32, classes=3, **fields):
    cfg = ModelConfig(**fields)
    return build_model(cfg, classes, resolve_preprocess(cfg, size, channels))


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
    assert SimpleCNN(3, [8, 16])(torch.randn(1, 3, 16, 16)).shape == (1, 16, 4, 4)
