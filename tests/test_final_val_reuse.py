"""The final evaluation reuses the validation that training already computed on the saved weights, and only then.

A CPU run validates every epoch in fp32 on the run's own module and batches: exactly what the final
evaluation computes. When the saved weights are the ones such a validation saw, predicting val again
would repeat it; the file it writes must still be byte for byte what a later ``evaluate`` writes.
"""

import shutil

import pytest
import torch

import imgclf
import imgclf.training.stages
import imgclf.workflows.train
from imgclf.cli import main
from imgclf.runs.network import NetworkRun

from conftest import tiny_config
from imagefactory import make_class_folders


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_class_folders(tmp_path_factory.mktemp("reuse") / "data", per_class=12)


@pytest.fixture
def predicted(monkeypatch) -> list[str]:
    """The splits the run predicted afresh through NetworkRun.probabilities."""
    splits, real = [], NetworkRun.probabilities

    def spy(self, split, *args, **kwargs):
        splits.append(split)
        return real(self, split, *args, **kwargs)

    monkeypatch.setattr(NetworkRun, "probabilities", spy)
    return splits


@pytest.mark.parametrize("train", [{"restore_best": True}, {"restore_best": False},
                                   {"restore_best": True, "early_stopping": True, "patience": 1}])
def test_val_is_not_predicted_again_and_equals_a_later_evaluate(data, tmp_path, predicted, train):
    run = imgclf.train(tiny_config(data, tmp_path / "run", train={"epochs": 4, **train}))
    assert predicted == ["test"]
    written = (run.path / "predictions_val.csv").read_bytes()
    copy = tmp_path / "copy"
    shutil.copytree(run.path, copy)
    assert main(["evaluate", str(copy), "--split", "val"]) == 0
    assert (copy / "predictions_val.csv").read_bytes() == written


@pytest.mark.parametrize("sections", [
    {"evaluate": {"tta": "flip"}},  # the final evaluation averages views; validation did not
    {"stages": [{"name": "a", "epochs": 2}, {"name": "b", "epochs": 2, "batch_size": 6}],
     "train": {"restore_best": False}},  # the last validation used other batches
    {"stages": [{"name": "a", "epochs": 2}, {"name": "head", "epochs": 2, "freeze": "backbone"}],
     "train": {"restore_best": False}},  # the last validation ran the head over cached features
])
def test_val_is_predicted_again_when_training_validated_otherwise(data, tmp_path, predicted, sections):
    imgclf.train(tiny_config(data, tmp_path / "run", **sections))
    assert predicted[0] == "val"


def test_val_is_predicted_again_when_the_average_replaced_the_best(data, tmp_path, predicted, monkeypatch):
    real = imgclf.workflows.train.average_if_better
    averaged = []

    def average_wins(model, bests, runner, meta, path):  # whatever validation says: the average replaced the best
        real(model, bests, runner, meta, path)
        averaged.append(bests.epochs)
        return True

    monkeypatch.setattr(imgclf.workflows.train, "average_if_better", average_wins)
    imgclf.train(tiny_config(data, tmp_path / "run", train={"average_best": 3, "epochs": 4, "monitor": "val_loss"}))
    assert averaged and predicted[0] == "val"


class _Compiled(torch.nn.Module):
    """Stands in for torch.compile's wrapper (compiling on the CPU takes a minute): another module over the same one."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model

    def forward(self, images):
        return self._orig_mod(images)


def test_val_is_predicted_again_when_training_ran_a_compiled_model(data, tmp_path, predicted, monkeypatch):
    wrapped = []

    def compile_stand_in(model):
        wrapped.append(model)
        return _Compiled(model)

    monkeypatch.setattr(imgclf.training.stages.torch, "compile", compile_stand_in)
    imgclf.train(tiny_config(data, tmp_path / "run", train={"epochs": 2, "compile": True}))
    assert wrapped and predicted[0] == "val"
