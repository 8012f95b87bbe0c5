"""A run's life: resume keeps its saved split, a failed run never blocks the next, a config works from anywhere,
and no command overwrites a user's file or hides a full or read-only disk behind a traceback."""

import csv
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

import imgclf
from clitools import assert_clean_error
from clitools import run_main as run_cli
from imgclf.cli import main
from imgclf.errors import ConfigError

from conftest import tiny_config
from imagefactory import make_class_folders, write_image

# the bad-input corpus: every case ends within a bound, so a hang fails instead of blocking CI
pytestmark = pytest.mark.timeout(300)

TINY = ["--image-size", "16", "--conv-filters", "8,16", "--augment", "none", "--epochs", "3", "--batch-size", "8",
        "--val-fraction", "0.2", "--test-fraction", "0.2", "--no-report", "--bootstrap", "0"]


def interrupted_run(data: Path, out: Path, monkeypatch, after_epochs: int = 2) -> Path:
    """Train until ``after_epochs`` epochs are saved, then 'die' (KeyboardInterrupt), as test_resume.py does."""
    import imgclf.workflows.train as report  # the training loop's write_history

    real_write, calls = report.write_history, []

    def dying(history, path):
        real_write(history, path)
        calls.append(1)
        if len(calls) == after_epochs:
            raise KeyboardInterrupt

    monkeypatch.setattr(report, "write_history", dying)
    with pytest.raises(KeyboardInterrupt):
        imgclf.train(tiny_config(data, out, train={"epochs": 4}))
    monkeypatch.setattr(report, "write_history", real_write)
    return out


def main_in_process(argv: list[str]) -> int:
    """``main(argv)`` with the imgclf log handler writing to this test's captured stderr, not an earlier one's."""
    import logging
    import sys

    for handler in logging.getLogger("imgclf").handlers:
        if type(handler) is logging.StreamHandler:  # imgclf's own, not pytest's capture handlers
            handler.stream = sys.stderr  # setStream would flush the closed one
    return main(argv)


def split_rows(run: Path, name: str = "split.csv") -> list[dict]:
    with open(run / name, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# --- item 3: --resume never re-splits -------------------------------------------------------------------------


def test_resume_uses_the_saved_split_after_images_were_added_and_removed(tmp_path, monkeypatch):
    data = make_class_folders(tmp_path / "data", per_class=10)
    run = interrupted_run(data, tmp_path / "run", monkeypatch)
    assert (run / "INCOMPLETE").is_file()
    saved = (run / "split.csv").read_bytes()
    rng = np.random.default_rng(5)
    for n in range(2):
        write_image(data / "left bar" / f"new {n}.png", 0, 20, "L", rng)
    gone = data / split_rows(run)[0]["path"]
    kept_bytes = gone.read_bytes()
    gone.unlink()

    result = run_cli("train", "--resume", run, timeout=300)
    assert_clean_error(result, "1 image(s) listed in", "split.csv", "are gone", gone.relative_to(data).as_posix())
    assert (run / "split.csv").read_bytes() == saved

    gone.write_bytes(kept_bytes)
    result = run_cli("train", "--resume", run, timeout=300)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "left out of the resumed run" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 2 image(s)") and "new 0.png" in warnings[0]
    assert (run / "split.csv").read_bytes() == saved, "resume rewrote the split"
    test_paths = [r["path"] for r in split_rows(run) if r["split"] == "test"]
    assert sorted(r["path"] for r in split_rows(run, "predictions_test.csv")) == sorted(test_paths)
    assert not (run / "INCOMPLETE").exists()


def test_a_damaged_saved_split_is_a_run_directory_error(tmp_path, monkeypatch):
    from imgclf.errors import RunDirError

    run = interrupted_run(make_class_folders(tmp_path / "data", per_class=10), tmp_path / "run", monkeypatch)
    rows = split_rows(run)
    rows[0]["path"] = "../../etc/passwd"
    with open(run / "split.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(RunDirError, match="not inside the dataset folder"):
        imgclf.workflows.train.resume_training(run)


# --- item 6: a failed run never blocks the next one --------------------------------------------------------------


@pytest.mark.parametrize("args, fragments", [
    (["--conv-filters", "8,8,8,8,8"], ["image_size 16", "5 conv blocks", "--image-size 32"]),
    (["--conv-filters", "0,8"], ["conv_filters", "positive"]),
    (["--dense-layers=-4"], ["dense_layers", "positive"]),
    (["--device", "tpu"], ["unknown device 'tpu'", "cpu"]),
    (["--model", "convnext_atto", "--conv-filters", "8"], ["image_size 16", "convnext_atto", "--image-size"]),
])
def test_invalid_model_settings_are_refused_before_the_run_directory_exists(tmp_path, args, fragments):
    data = make_class_folders(tmp_path / "data", per_class=4)
    result = run_cli("train", data, *TINY, *args, "--out", tmp_path / "run", timeout=240)
    assert_clean_error(result, *fragments)
    assert not (tmp_path / "run").exists()


def test_a_missing_cuda_index_is_refused(monkeypatch):
    """No GPU here: a one-GPU machine is simulated, so cuda:3 names a device it does not have."""
    import torch

    from imgclf.runtime import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match=r"'cuda:3'.*1 CUDA GPU"):
        resolve_device("cuda:3")


def test_a_failed_run_is_marked_and_its_out_reused(tmp_path, monkeypatch, caplog):
    data = make_class_folders(tmp_path / "data", per_class=6)
    run = interrupted_run(data, tmp_path / "run", monkeypatch, after_epochs=1)
    assert (run / "INCOMPLETE").is_file() and (run / "history.csv").is_file()
    (run / "notes.txt").write_text("mine")
    imgclf.logs.get_logger().addHandler(caplog.handler)
    try:
        finished = imgclf.train(tiny_config(data, run, train={"epochs": 2}))
    finally:
        imgclf.logs.get_logger().removeHandler(caplog.handler)
    assert any("holds an unfinished run" in r.getMessage() and "notes.txt" in r.getMessage() for r in caplog.records)
    assert not (run / "INCOMPLETE").exists() and (run / "notes.txt").read_text() == "mine"
    assert len(split_rows(run, "history.csv")) == 2 and finished.metrics["test"]["n"] > 0
    with pytest.raises(ConfigError, match="holds a finished run"):
        imgclf.train(tiny_config(data, run, train={"epochs": 2}))


def test_a_users_own_folder_is_still_refused(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("precious")
    result = run_cli("train", data, *TINY, "--out", tmp_path / "mine", timeout=240)
    assert_clean_error(result, "mine", "is not empty", "choose another --out")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["thesis.docx"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_out_is_one_line_naming_path_and_errno(tmp_path, monkeypatch, capsys, code):
    """Root ignores chmod, so a read-only or forbidden --out is simulated: creating folders under it fails."""
    data = make_class_folders(tmp_path / "data", per_class=4)
    locked = tmp_path / "locked"
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if str(self).startswith(str(locked)):
            raise OSError(code, os.strerror(code), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert main_in_process(["train", str(data), *TINY, "--out", str(locked / "run")]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("imgclf: error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert str(locked / "run") in lines[0] and f"{os.strerror(code)} ({errno.errorcode[code]})" in lines[0]


def test_a_full_disk_keeps_the_old_file_whole(tmp_path, monkeypatch, capsys, trained_run):
    """A full disk is simulated: fsync of the new file raises ENOSPC, as a real write does."""
    old = tmp_path / "predictions.csv"
    old.write_text("kept\n")
    image = trained_run.index().abspath(0)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    assert main_in_process(["predict", str(trained_run.path), str(image), "--out", str(old), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"imgclf: error: {old}: No space left on device (ENOSPC)" in err
    assert old.read_text() == "kept\n" and [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]


def test_other_os_errors_are_not_hidden(monkeypatch):
    import imgclf.cli.runtools as cli  # where main finds the command functions, when the command runs

    def broken(args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(cli, "cmd_report", broken)
    with pytest.raises(OSError, match="Input/output"):
        main(["report", "anywhere"])


def test_no_command_overwrites_a_users_file_unless_told(tmp_path, trained_run):
    image = trained_run.index().abspath(0)
    mine = tmp_path / "predictions.csv"
    mine.write_text("".join(f"row {i}\n" for i in range(6)))
    result = run_cli("predict", trained_run.path, image, cwd=tmp_path, timeout=120)
    assert_clean_error(result, "predictions.csv already exists", "--overwrite")
    assert len(mine.read_text().splitlines()) == 6
    result = run_cli("predict", trained_run.path, image, "--overwrite", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(mine.read_text().splitlines()) == 2  # header + the one image

    (tmp_path / "report.json").write_text("{}")
    (tmp_path / "feats.npz").write_text("x")
    (tmp_path / "pngs").mkdir()
    (tmp_path / "pngs" / "mine.png").write_text("x")
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "mine.txt").write_text("x")
    for args, fragment in ((["audit", tmp_path / "pngs", "--json", "report.json"], "report.json already exists"),
                           (["features", trained_run.path, "--out", "feats.npz"], "feats.npz already exists"),
                           (["explain", trained_run.path, image, "--out", "pngs"], "already holds files (mine.png)"),
                           (["demo", "--out", "demo"], "already holds files (mine.txt)")):
        assert_clean_error(run_cli(*args, cwd=tmp_path, timeout=120), fragment, "--overwrite")
    assert (tmp_path / "report.json").read_text() == "{}" and (tmp_path / "feats.npz").read_text() == "x"
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["mine.txt"]


# --- item 8: a config is a recipe that works from anywhere -------------------------------------------------------


def test_a_run_config_trains_again_from_another_directory(tmp_path, monkeypatch):
    a, b = tmp_path / "A", tmp_path / "B"
    make_class_folders(a / "data", per_class=6)
    b.mkdir()
    monkeypatch.chdir(a)
    first = imgclf.train(tiny_config("data", "run", train={"epochs": 2}))
    saved = yaml.safe_load((a / "run" / "config.yaml").read_text())
    assert saved["data"]["path"] == str(a / "data") and saved["data"]["path_as_typed"] == "data"
    result = run_cli("train", "--config", first.path.resolve() / "config.yaml", "--out", "again", cwd=b, timeout=300)
    assert result.returncode == 0, result.stderr
    again = yaml.safe_load((b / "again" / "config.yaml").read_text())
    assert again["data"] == saved["data"]
    assert split_rows(b / "again") == split_rows(a / "run")
