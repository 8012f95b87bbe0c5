"""A killed run resumes from its last completed epoch and ends exactly where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import imgclf
from clitools import assert_clean_error, reproducible_metrics
from clitools import run_main as run_cli
from imgclf.cli import main
from imgclf.errors import RunDirError

from conftest import tiny_config
from imagefactory import make_class_folders

FLAGS = ["--image-size", "24", "--conv-filters", "16,32", "--augment", "light", "--epochs", "8",
         "--batch-size", "8", "--lr", "0.01", "--val-fraction", "0.2", "--test-fraction", "0.2"]


def metrics(run_dir):
    return reproducible_metrics(run_dir / "metrics.json")


def test_sigkill_mid_training_then_resume_matches_an_uninterrupted_run(tmp_path, capsys):
    data = make_class_folders(tmp_path / "data", 40, sizes=(24,))
    assert main(["train", str(data), *FLAGS, "--out", str(tmp_path / "whole")]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "imgclf", "train", str(data), *FLAGS, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    history = killed / "history.csv"
    deadline = time.time() + 240
    while time.time() < deadline and (not history.exists() or len(history.read_text().splitlines()) < 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    assert main(["train", "--resume", str(killed)]) == 0
    assert metrics(killed) == metrics(tmp_path / "whole")
    assert (killed / "history.csv").read_text().count("\n") == (tmp_path / "whole" / "history.csv").read_text().count(
        "\n")


@pytest.mark.parametrize("stop_after", [3, 4])
def test_resume_across_stages_and_feature_caching(tmp_path, pool_dataset, monkeypatch, stop_after):
    stages = [{"name": "head", "freeze": "backbone", "epochs": 3}, {"name": "all", "freeze": "none", "epochs": 3}]
    whole = imgclf.train(tiny_config(pool_dataset, tmp_path / "whole", stages=stages, augment={"preset": "light"}))
    import imgclf.workflows.train as report  # the training loop's write_history

    real_write, calls = report.write_history, []

    def interrupted(history, path):  # the process "dies" right after epoch `stop_after` is saved
        real_write(history, path)
        calls.append(1)
        if len(calls) == stop_after:
            raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_history", interrupted)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(tiny_config(pool_dataset, tmp_path / "cut", stages=stages, augment={"preset": "light"}))
    monkeypatch.setattr(report, "write_history", real_write)
    resumed = imgclf.workflows.train.resume_training(tmp_path / "cut")
    assert resumed.metrics == whole.metrics
    assert [r["stage"] for r in __import__("csv").DictReader(open(resumed.path / "history.csv"))] == ["head"] * 3 + [
        "all"] * 3


def test_resume_without_state_or_with_mixed_state_is_a_clear_error(tmp_path, trained_run):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    with pytest.raises(RunDirError, match="has finished: --resume continues a killed or failed run"):
        imgclf.workflows.train.resume_training(run)  # it re-finished it: test scored again, a threshold dropped
    (run / "INCOMPLETE").write_text("")  # as a killed run has it
    folders = sorted((run / "resume").glob("epoch_*"))
    assert len(folders) == 1 and not list((run / "resume").glob(".*.tmp"))  # one committed epoch only
    state = json.loads((folders[0] / "state.json").read_text())
    (folders[0] / "state.json").write_text(json.dumps({**state, "epoch": state["epoch"] - 1}))
    with pytest.raises(RunDirError, match="different epochs"):
        imgclf.workflows.train.resume_training(run)
    (run / "resume" / ".epoch_00099.tmp").mkdir()  # a kill mid-save leaves only an uncommitted folder
    shutil.rmtree(folders[0])
    with pytest.raises(RunDirError, match="never finished an epoch"):
        imgclf.workflows.train.resume_training(run)


def test_settings_given_with_resume_are_refused_in_one_line_not_dropped(tmp_path):
    result = run_cli("train", "--resume", tmp_path / "run", "--epochs", "50", "--lr", "0.1")
    assert_clean_error(result, "continues the run with its saved settings, so --epochs, --lr would not apply")
    result = run_cli("train", "--resume", tmp_path / "run", "--model", "resnet18", "--no-pretrained",
                     "--augment", "light", "--budget", "0")
    assert_clean_error(result, "--model", "--no-pretrained", "--augment", "--budget")  # the flags as typed


def test_a_default_run_stopped_among_its_candidates_says_to_start_it_again(tmp_path):
    out = tmp_path / "run"
    (out / "candidates" / "probe").mkdir(parents=True)  # what a default run killed mid-candidates leaves
    (out / "INCOMPLETE").write_text("x")
    assert_clean_error(run_cli("train", "--resume", out), "stopped while it tried its candidates",
                       f"`imgclf train DATA --out {out}` again")


@pytest.mark.parametrize("plant", ["best weights", "best metadata", "state entry", "state size"])
def test_planted_resume_files_are_refused_by_name_and_the_runs_files_are_kept(tmp_path, trained_run, plant):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run)
    (run / "INCOMPLETE").write_text("")  # as a killed run has it (a finished one is refused first)
    folder = sorted((run / "resume").glob("epoch_*"))[0]
    kept = {name: (run / name).read_bytes() for name in ("model.safetensors", "model.json")}
    if plant == "best weights":  # one tensor more: copied over model.safetensors, it once filled the disk
        save_file({**load_file(folder / "best.safetensors"), "junk": torch.zeros(1000)}, folder / "best.safetensors")
        fragments = ("best.safetensors", "does not fit the model")
    elif plant == "best metadata":
        (folder / "best.json").write_text("[" * 100_000)
        fragments = ("best.json", "nested far deeper")
    elif plant == "state entry":  # accepted silently, its memory with it
        state = torch.load(folder / "state.pt", weights_only=True)
        torch.save({**state, "junk": torch.zeros(10)}, folder / "state.pt")
        fragments = ("damaged", "never writes (junk)")
    else:
        with open(folder / "state.pt", "r+b") as fh:  # sparse: far past what the optimizer's state can take
            fh.truncate(200 << 20)
        fragments = ("damaged", "state.pt is 209,715,200 bytes")
    with pytest.raises(RunDirError) as err:
        imgclf.workflows.train.resume_training(run)
    assert all(f in str(err.value) for f in fragments) and "\n" not in str(err.value), str(err.value)
    assert {name: (run / name).read_bytes() for name in kept} == kept


def test_a_config_edited_after_the_kill_is_refused_not_obeyed(tmp_path, pool_dataset, monkeypatch):
    """It was obeyed: a plan of 4 epochs trained 2, and config.yaml no longer said how the saved epochs trained."""
    import imgclf.workflows.train as training

    real_write = training.write_history

    def killed_after_two(history, path):
        real_write(history, path)
        if len(history) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "write_history", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(tiny_config(pool_dataset, tmp_path / "run", train={"epochs": 3, "early_stopping": False}))
    monkeypatch.setattr(training, "write_history", real_write)
    config = tmp_path / "run" / "config.yaml"
    saved = config.read_text()
    config.write_text(saved.replace("epochs: 3", "epochs: 5"))
    with pytest.raises(RunDirError, match=r"config.yaml changed since epoch \d was saved; the run continues with the "
                                          "settings it trained with"):
        training.resume_training(tmp_path / "run")
    config.write_text(saved)  # put back: it resumes
    assert len(training.resume_training(tmp_path / "run").metrics["test"]["per_class"]) == 3
