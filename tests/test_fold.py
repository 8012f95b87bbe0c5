"""BatchNorm folded into the convolution before it (the linear probe's Lite0): the same outputs, or no folding."""

import logging

import pytest
import timm
import torch
from torch import nn

from imgclf.models.fold import folded
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
    assert "changed its outputs; it runs unfolded" in caplog.text
    assert isinstance(model.bn, nn.BatchNorm2d)


@pytest.mark.parametrize("after_conv", [nn.ReLU(), nn.BatchNorm2d(4, track_running_stats=False)])
def test_nothing_to_fold_leaves_the_model_itself(after_conv):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), after_conv)  # batch statistics even in eval: nothing fixed to fold
    assert folded(model, 3) is model
