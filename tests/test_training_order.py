"""The simple CNN trains each ReLU -> max-pool pair as max-pool -> ReLU: faster, and exactly the same numbers."""

import copy

import pytest
import torch
from torch import nn

from imgclf.config import ModelConfig
from imgclf.models.layers import training_order
from imgclf.models.networks import build_model, resolve_preprocess

NOTEBOOK_CONV = ["conv 8 3 valid relu", "pool max 2", "conv 16 3 valid relu", "pool max 2"]


def notebook_cnn(size=32):
    torch.manual_seed(0)
    cfg = ModelConfig(name="simple_cnn", conv_layers=NOTEBOOK_CONV, head_layers=["flatten", "dense 16 relu"])
    return build_model(cfg, 3, resolve_preprocess(cfg, size, 3))


def order_of_calls(model, x):
    ran = []
    hooks = [m.register_forward_hook(lambda module, *_: ran.append(type(module).__name__))
             for m in model.backbone.features]
    model(x)
    for hook in hooks:
        hook.remove()
    return ran


def images_with_ties(n=4, size=32):
    """Random images with flat 4 x 4 blocks: equal values in pooling windows, positive and negative."""
    torch.manual_seed(1)
    x = torch.randn(n, 3, size, size)
    x[:, :, ::8, ::8] = 0
    flat = torch.randn(n, 3, size // 4, size // 4).repeat_interleave(4, 2).repeat_interleave(4, 3)
    return torch.where(torch.rand(n, 1, size, size) < 0.5, flat, x)


def test_training_pools_before_the_relu_and_evaluation_runs_the_keras_order():
    model, x = notebook_cnn(), torch.randn(2, 3, 32, 32)
    assert order_of_calls(model.train(), x) == ["Conv2d", "MaxPool2d", "ReLU", "Conv2d", "MaxPool2d", "ReLU"]
    assert order_of_calls(model.eval(), x) == ["Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d"]


def test_only_a_relu_right_before_a_max_pool_moves():
    relu, pool, avg, elu, drop = nn.ReLU(), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.ELU(), nn.Dropout()
    assert training_order([relu, pool]) == [pool, relu]
    assert training_order([relu, avg, elu, pool, relu, drop, pool]) == [relu, avg, elu, pool, relu, drop, pool]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_moved_relu_gives_the_same_outputs_and_gradients_exactly(dtype):
    model = notebook_cnn().train()
    keras = copy.deepcopy(model)
    keras.backbone.forward = lambda x: keras.backbone.features(x)  # the layers as written, in training too
    x = images_with_ties()
    target = torch.tensor([0, 1, 2, 0])
    outputs = []
    for net in (model, keras):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            logits = net(x)
        nn.functional.cross_entropy(logits.float(), target).backward()
        outputs.append(logits)
    assert order_of_calls(keras, x)[1] == "ReLU"  # the reference does run the written order
    assert torch.equal(outputs[0], outputs[1])
    for (name, ours), theirs in zip(model.named_parameters(), keras.parameters(), strict=True):
        assert torch.equal(ours.grad, theirs.grad), name
