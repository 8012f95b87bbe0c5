"""The end-of-epoch training state is written in a background thread: what it saves is the state at the
epoch's end, not whatever training has changed since, and a failed write stops the run in one line."""

import errno
import json
import os
import threading

import pytest
import torch

from clitools import assert_clean_error
from clitools import run_main as run_cli
from imgclf.training import optim, resume

from imagefactory import make_class_folders

FLAGS = ["--image-size", "16", "--conv-filters", "8", "--epochs", "3", "--batch-size", "8",
         "--val-fraction", "0.25", "--test-fraction", "0", "--no-baseline"]


def a_model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    model(torch.zeros(1, 3, 8, 8))
    model = model.to(memory_format=torch.channels_last)  # copied out contiguous, as safetensors needs
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    return model, optimizer


def info(epoch):
    return {"epoch": epoch, "stage_index": 0, "stage_epoch": epoch, "stage_done": False, "history": [{"epoch": epoch}],
            "stopper": {"best": None, "best_epoch": None, "bad": 0}}


def test_the_write_saves_the_epochs_state_even_when_training_changes_it_before_the_write(tmp_path, monkeypatch):
    model, optimizer = a_model_and_optimizer()
    expected_weights = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moment = optimizer.state_dict()["state"][0]["exp_avg"].clone()
    assert not expected_moment.is_contiguous()
    changed, real_save_file = threading.Event(), resume.save_file

    def after_training_moved_on(tensors, path):
        assert changed.wait(10), "the test never changed the state"
        real_save_file(tensors, path)

    monkeypatch.setattr(resume, "save_file", after_training_moved_on)
    writer = resume.StateWriter()
    history = [{"epoch": 1}]
    writer.save(tmp_path, model, torch.Generator(), {"optimizer": optimizer.state_dict()},
                {**info(1), "history": history}, tmp_path / "best.safetensors")
    with torch.no_grad():  # the next epoch trains on: weights, moments and history change in place
        for p in model.parameters():
            p.add_(1.0)
    optimizer.state_dict()["state"][0]["exp_avg"].add_(1.0)
    history.append({"epoch": 2})
    changed.set()
    writer.wait()
    loaded, saved_info = resume.load_state(tmp_path, model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected_weights[key]), key
    moment = loaded["optimizer"]["state"][0]["exp_avg"]
    assert torch.equal(moment, expected_moment)
    assert moment.stride() == expected_moment.stride()  # channels-last: fused Adam pairs elements by memory order
    assert saved_info["history"] == [{"epoch": 1}]


def test_one_write_at_a_time_and_only_the_newest_epoch_stays(tmp_path):
    model, optimizer = a_model_and_optimizer()
    writer = resume.StateWriter()
    for epoch in (1, 2, 3):
        writer.save(tmp_path, model, torch.Generator(), {"optimizer": optimizer.state_dict()}, info(epoch),
                    tmp_path / "best.safetensors")
    writer.wait()
    assert sorted(p.name for p in (tmp_path / "resume").iterdir()) == ["epoch_00003"]
    assert json.loads((tmp_path / "resume" / "epoch_00003" / "state.json").read_text())["epoch"] == 3


def test_a_failed_write_is_raised_on_the_training_thread_and_commits_nothing(tmp_path, monkeypatch):
    model, optimizer = a_model_and_optimizer()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(resume.torch, "save", full_disk)
    writer = resume.StateWriter()
    writer.save(tmp_path, model, torch.Generator(), {"optimizer": optimizer.state_dict()}, info(1),
                tmp_path / "best.safetensors")
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # raised once: the next save starts clean
    assert not list((tmp_path / "resume").glob("epoch_*"))


def test_a_full_disk_while_saving_the_training_state_is_one_line_and_the_run_is_not_resumable(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / "data", per_class=6)
    real_save, saves = resume.torch.save, []

    def disk_fills_at_the_second_epoch(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(resume.torch, "save", disk_fills_at_the_second_epoch)
    result = run_cli("train", str(data), *FLAGS, "--out", str(tmp_path / "run"))
    assert_clean_error(result, "state.pt", "No space left on device")
    assert len(saves) == 2, "a state was saved after a write had failed"
    assert [p.name for p in (tmp_path / "run" / "resume").glob("epoch_*")] == ["epoch_00001"]


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
