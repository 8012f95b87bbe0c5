"""BatchNorm folded into the convolution before it (the linear probe's Lite0): the same outputs, or no folding."""

import logging

import pytest
import timm
import torch
from torch import nn

from imgclf.config import ModelConfig
from imgclf.models.fold import folded
from imgclf.models.networks import build_model, resolve_preprocess
from imgclf.workflows.baselines import PROBE_MODEL


def with_trained_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their 0/1 defaults, as a trained network has."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                for tensor, low, high in ((module.running_mean, -0.5, 0.5), (module.running_var, 0.3, 2.0),
                                          (module.weight, 0.5, 1.5), (module.bias, -0.3, 0.3)):
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)
    return model.eval()


def test_the_probes_network_folds_every_batchnorm_and_gives_the_same_features():
    model = with_trained_statistics(timm.create_model(PROBE_MODEL, pretrained=False, num_classes=0))
    fast = folded(model, 3)
    assert fast is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 49  # the original is left as it was
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = model(images), fast(images)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def test_the_probe_as_imgclf_builds_it_embeds_the_same_folded():
    """The probe's own path: build_model (timm's backbone cut to its features), then Classifier.embed."""
    config = ModelConfig(name=PROBE_MODEL, pretrained=False)
    preprocess = resolve_preprocess(config, 80, 3, "bilinear")
    model = with_trained_statistics(build_model(config, 2, preprocess))
    model.train()
    fast = folded(model, 3)
    assert fast is not model and model.training, "the caller's model keeps its mode"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    images = torch.randn(4, 3, 80, 80, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = model.eval().embed(images), fast.embed(images)
    assert expected.shape == (4, 1280)
    assert torch.allclose(got, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


class NormalisesItsInput(nn.Module):
    """Registers a convolution, then a BatchNorm of the same width, but normalises the input, not its output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(self.bn(x))


def test_a_pair_that_registration_order_misreads_is_not_folded_and_says_so(caplog):
    model = with_trained_statistics(NormalisesItsInput())
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert folded(model, 4) is model
    assert "are not folded: folding changed its outputs; it runs unfolded" in caplog.text
    assert isinstance(model.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("after_conv", [nn.ReLU(), nn.BatchNorm2d(4, track_running_stats=False)])
def test_nothing_to_fold_leaves_the_model_itself(after_conv):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), after_conv)  # batch statistics even in eval: nothing fixed to fold
    assert folded(model, 3) is model


def test_a_network_the_check_cannot_run_is_not_folded_and_the_warning_says_why(caplog):
    """Fixed to 32 px inputs: the 64 px check fails to run, so nothing is trusted and the original stays."""
    model = with_trained_statistics(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                                                  nn.Linear(4 * 30 * 30, 2)))
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        assert folded(model, 3) is model
    assert "are not folded: the check on 64 px random images could not run (" in caplog.text
    assert "changed its outputs" not in caplog.text and len(caplog.records) == 1
