"""One writer per folder, one plan per experiment, and write errors that name the file the user knows (an audit
of kills, full disks and reruns): a second train on a live run's --out emptied its files as a killed run's; a cv
re-run with another --folds pooled folds of two splits; a grid re-run over other values replaced its leaderboard;
a refused write named a random temporary file."""

import errno
import json
import subprocess
import sys
import tempfile

import pytest

from imgclf import atomic
from imgclf.errors import ConfigError
from imgclf.workflows.cv import cross_validate
from imgclf.workflows.folds import plan_folds
from imgclf.workflows.grid import grid_digest, grid_search
from imgclf.workflows.lifecycle import new_run_dir
from imgclf.workflows.summary import EXPERIMENT_FILE, open_experiment

from conftest import tiny_config
from imagefactory import make_class_folders

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom imgclf.workflows import runlock\n"
        "runlock.claim(Path(sys.argv[1]))\nprint('held', flush=True)\ntime.sleep(120)\n")


@pytest.mark.timeout(120)
def test_a_live_runs_folder_is_refused_and_a_killed_ones_is_reused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "INCOMPLETE").write_text("running")
    (out / "history.csv").write_text("epoch\n1\n")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="being written by another imgclf command.*give this run another --out"):
            new_run_dir(str(out))
        assert (out / "history.csv").is_file()  # the live run's files stay
    finally:
        holder.kill()
        holder.wait()
    assert new_run_dir(str(out)) == out and not (out / "history.csv").exists()  # a killed run's folder is reused
    assert new_run_dir(str(out)) == out  # this process holds it: a retry in one session is not refused


def test_an_experiment_continues_only_its_own_plan(tmp_path):
    out = tmp_path / "exp"
    open_experiment(out, "cv", "a" * 64, "folds")
    open_experiment(out, "cv", "a" * 64, "folds")  # the same plan: continued
    with pytest.raises(ConfigError, match="holds a cv over other folds"):
        open_experiment(out, "cv", "b" * 64, "folds")
    (out / EXPERIMENT_FILE).write_text(json.dumps({"kind": "cv"}))  # written before plans were kept
    open_experiment(out, "cv", "b" * 64, "folds")
    assert json.loads((out / EXPERIMENT_FILE).read_text())["plan"] == "b" * 64


def test_cv_with_other_folds_is_refused_before_its_split_files_are_rewritten(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6)
    config = tiny_config(data, tmp_path / "cv")
    three, four = plan_folds(config, 3).digest(), plan_folds(config, 4).digest()
    assert three != four and three == plan_folds(config, 3).digest()
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / EXPERIMENT_FILE).write_text(json.dumps({"kind": "cv", "plan": three}))
    with pytest.raises(ConfigError, match="holds a cv over other folds.*--folds"):
        cross_validate(config, folds=4)
    assert not (tmp_path / "cv" / "splits").exists()


def test_a_grid_over_other_values_is_refused_before_a_trial_runs(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=6)
    config = tiny_config(data, tmp_path / "grid")
    (tmp_path / "grid").mkdir()
    earlier = grid_digest({"train.lr": [0.1, 0.01, 0.001]})
    (tmp_path / "grid" / EXPERIMENT_FILE).write_text(json.dumps({"kind": "grid", "plan": earlier}))
    assert grid_digest({"train.lr": [0.1, 0.01, 0.001]}) == earlier != grid_digest({"train.lr": [0.1, 0.01]})
    with pytest.raises(ConfigError, match="holds a grid over other settings"):
        grid_search(config, {"train.lr": [0.1, 0.01]})
    assert not (tmp_path / "grid" / "trials").exists()


def test_a_refused_write_names_the_target_not_its_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "report.html"
    with pytest.raises(OSError) as err, atomic.atomic_path(target):
        raise OSError(errno.ENOSPC, "No space left on device")  # a write's error names no file
    assert err.value.filename == str(target) and not list(tmp_path.iterdir())

    def refused(prefix, suffix, dir):
        raise PermissionError(errno.EACCES, "Permission denied", f"{dir}/{prefix}x1y2z3{suffix}")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    with pytest.raises(PermissionError) as err, atomic.atomic_path(target):
        pass
    assert err.value.filename == str(target)


def test_a_folder_that_cannot_be_locked_is_said_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    import fcntl

    from imgclf.workflows import runlock

    def unsupported(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with caplog.at_level("WARNING", logger="imgclf"):
        runlock.claim(tmp_path)
    assert "cannot be locked (No locks available)" in caplog.text and str(tmp_path) in caplog.text
