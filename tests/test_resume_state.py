"""The end-of-epoch training state: a full disk while saving it stops the run in one line and leaves the epoch
before; optimizer moments resume in their weight's memory layout, which torch's fused Adam depends on."""

import errno

import pytest
import torch

from clitools import assert_clean_error
from clitools import run_main as run_cli
from imgclf.models import checkpoint
from imgclf.training import optim, resume

from imagefactory import make_class_folders

FLAGS = ["--image-size", "16", "--conv-filters", "8", "--epochs", "3", "--batch-size", "8",
         "--val-fraction", "0.25", "--test-fraction", "0", "--no-baseline"]


def test_a_full_disk_while_saving_the_training_state_is_one_line_and_the_epoch_before_stays(tmp_path, monkeypatch):
    """torch.save and safetensors' own writer raised RuntimeError ("unexpected pos") and SafetensorError on a full
    disk (tracebacks); the files are now written by Python, whose OSError the command line says in one line."""
    data = make_class_folders(tmp_path / "data", per_class=6)
    real_write, saves = resume.write_torch, []

    def disk_fills_at_the_second_epoch(path, value):
        saves.append(path)
        if len(saves) == 2:
            path.symlink_to("/dev/full")  # every write there fails with ENOSPC, as on a full disk
        real_write(path, value)

    monkeypatch.setattr(resume, "write_torch", disk_fills_at_the_second_epoch)
    result = run_cli("train", str(data), *FLAGS, "--out", str(tmp_path / "run"))
    assert_clean_error(result, "state.pt", "No space left on device")
    assert len(saves) == 2, "the run went on after its state could not be saved"
    assert [p.name for p in (tmp_path / "run" / "resume").glob("epoch_*")] == ["epoch_00001"]


@pytest.mark.parametrize("writer", [checkpoint.write_safetensors, checkpoint.write_torch])
def test_weights_and_state_on_a_full_disk_are_an_oserror_naming_the_file(tmp_path, writer):
    target = tmp_path / "weights.bin"
    target.symlink_to("/dev/full")
    value = {"w": torch.zeros(100_000)}
    with pytest.raises(OSError) as err:
        writer(target, value)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)


@pytest.mark.parametrize("saved_layout", [torch.contiguous_format, torch.channels_last])
def test_resumed_moments_take_their_weights_layout_so_fused_adam_steps_as_it_would_have(saved_layout):
    """A run resumed where the weights are laid out otherwise (another device or precision) steps the same."""

    def weight_and_adam():
        torch.manual_seed(0)
        weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last))
        return weight, torch.optim.Adam([weight], lr=0.1, fused=True)

    def one_step(weight, optimizer, seed):
        weight.grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed)).to(
            memory_format=torch.channels_last)
        optimizer.step()

    weight, optimizer = weight_and_adam()
    one_step(weight, optimizer, 1)
    saved = optimizer.state_dict()
    saved["state"][0] = {k: v.clone(memory_format=saved_layout if v.dim() == 4 else torch.preserve_format)
                         for k, v in saved["state"][0].items()}  # copies, as a file gives
    resumed_weight, resumed = weight_and_adam()
    with torch.no_grad():
        resumed_weight.copy_(weight)
    optim.load_optimizer_state(resumed, saved)
    one_step(weight, optimizer, 2)
    one_step(resumed_weight, resumed, 2)
    assert torch.equal(resumed_weight, weight)
