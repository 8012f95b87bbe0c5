"""Compute settings: precision choice, memory format, and accuracy parity of bf16 with fp32."""

import pytest
import torch

import imgclf
from imgclf.errors import ConfigError
from imgclf.runtime import Compute, cpu_supports_bf16, resolve_precision
from imgclf.workflows.demo import demo_config, write_digits


def test_auto_precision_follows_the_hardware():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if cpu_supports_bf16() else "fp32")
    assert resolve_precision("fp32", cpu) == "fp32"
    with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", cpu)


def test_channels_last_batches_and_models():
    compute = Compute.resolve("cpu", "fp32", None)
    assert compute.channels_last
    model = compute.prepare(torch.nn.Conv2d(3, 4, 3))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    assert compute.batch(torch.randn(2, 3, 8, 8)).is_contiguous(memory_format=torch.channels_last)
    assert compute.batch(torch.randn(2, 5)).shape == (2, 5)  # cached features stay as they are
    plain = Compute.resolve("cpu", "fp32", False).batch(torch.randn(2, 3, 8, 8))
    assert plain.is_contiguous() and not plain.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.slow
def test_bf16_and_fp32_reach_the_same_demo_accuracy(tmp_path):
    """Stated tolerance: test accuracies within 0.03 of each other on the digits demo."""
    if not cpu_supports_bf16():
        pytest.skip("this CPU has no native bf16")
    write_digits(tmp_path / "digits")
    accuracy = {}
    for precision in ("fp32", "bf16"):
        config = demo_config(tmp_path, epochs=15, overrides={"train": {"precision": precision}})
        config = config.model_copy(update={"out": str(tmp_path / precision)})
        accuracy[precision] = imgclf.train(config).metrics["test"]["accuracy"]
    assert accuracy["fp32"] >= 0.9 and abs(accuracy["bf16"] - accuracy["fp32"]) <= 0.03, accuracy
