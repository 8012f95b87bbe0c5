"""The red team's cases against ``imgclf report``: every file it reads from a run directory (history.csv,
metrics.json, plots/*.png, predictions_<split>.csv) is a stranger's. Each case ends in a page written without
the tampered part (and a note saying so) or in one line naming the file, never a traceback, and the page only
ever holds the run's own images."""

import base64
import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.cli import main
from imgclf.reporting import explain
from imgclf.reporting.html import write_report

from conftest import tiny_config
from imagefactory import make_class_folders

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("report_attacks")
    data = make_class_folders(base / "data", per_class=8, sizes=(16,))
    return imgclf.train(tiny_config(data, base / "run", train={"epochs": 1}, evaluate={"report": True})).path


@pytest.fixture
def run(trained, tmp_path):
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def report_page(run) -> str:
    assert main(["report", str(run)]) == 0
    return (run / "report.html").read_text(encoding="utf-8")


def error_line(capsys, run) -> str:
    assert main(["report", str(run)]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("imgclf: error:")]
    assert len(lines) == 1 and len(lines[0]) < 600
    return lines[0]


# 1. history.csv

@pytest.mark.parametrize("content", ["epoch,train_loss,val_loss\n1,0.5,0.6\n",
                                     "\ufeffepoch,train_loss,seconds\n1,0.5,2\n"], ids=["no seconds", "utf-8 BOM"])
def test_a_history_without_seconds_or_with_a_bom_is_still_reported(run, content):
    (run / "history.csv").write_text(content, encoding="utf-8")
    page = report_page(run)
    training = page.split('id="training"')[1].split("</section>")[0]
    assert "<td>1-1</td>" in training
    assert ("<td>n/a</td>" if "seconds" not in content else "<td>2</td>") in training


@pytest.mark.parametrize("content", [
    "train_loss,val_loss\n0.5,0.6\n",  # no epoch
    "epoch,seconds\n1,abc\n",  # not a number
    "epoch,seconds\n1,nan\n",  # not a finite number
    "epoch," + ",".join(f"m{i}" for i in range(70)) + "\n1" + ",1" * 70 + "\n",  # more columns than imgclf writes
    "epoch,seconds\n" + "1,1\n" * (3 << 20),  # 12 MB, over the 8 MB cap
    b"epoch,seconds\n1,\xff\xfe\n",  # not UTF-8
], ids=["no epoch", "text", "nan", "columns", "size", "bytes"])
def test_a_damaged_history_is_one_line_naming_it(run, capsys, content):
    (run / "history.csv").write_bytes(content if isinstance(content, bytes) else content.encode())
    line = error_line(capsys, run)
    assert "history.csv" in line and "delete it" in line


# 2. metrics.json

def edit_metrics(run, change) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    change(metrics)
    (run / "metrics.json").write_text(json.dumps(metrics))


@pytest.mark.parametrize("change", [
    lambda m: m["test"]["intervals"].update(accuracy="x"),
    lambda m: m["test"]["intervals"].update(accuracy=[1]),
    lambda m: m["test"]["intervals"].update(accuracy=[0.1, float("inf")]),
    lambda m: m["test"].update(intervals=5),
    lambda m: m["val"].update(per_class="zzz"),
    lambda m: m["val"].update(per_class={"a": {"precision": "x"}}),
    lambda m: m["val"].update(per_class={"a": {"precision": 1.0, "recall": 1.0, "f1-score": 1.0, "support": 1e309}}),
    lambda m: m["val"].update(sensitivity="x"),
], ids=["interval text", "interval of one", "infinite interval", "intervals a number", "per_class text",
        "per_class without recall", "infinite support", "sensitivity text"])
def test_a_tampered_metrics_json_is_one_line_naming_it(run, capsys, change):
    edit_metrics(run, change)
    line = error_line(capsys, run)
    assert "metrics.json" in line and "evaluate again" in line


def test_a_split_with_only_its_image_count_reports_the_rest_as_missing(run):
    edit_metrics(run, lambda m: m.update(test={"n": 3}))
    summary = report_page(run).split('id="summary"')[1].split("</section>")[0]
    assert "test: accuracy n/a" in summary and "on 3 images" in summary


# 3. plots/*.png

def test_an_oversized_plot_is_left_out_with_a_note_not_embedded(run):
    with open(run / "plots" / "curves.png", "r+b") as fh:
        fh.truncate(40 << 20)  # sparse: 40 MB on paper, nothing on disk
    page = report_page(run)
    assert len(page) < 5 << 20
    assert "curves.png left out" in page and "larger than" in page


def test_a_plot_that_is_not_a_png_or_links_elsewhere_is_left_out(run, tmp_path):
    secret = tmp_path / "secret.png"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(secret)
    (run / "plots" / "roc_test.png").write_text("not a picture")
    (run / "plots" / "pr_test.png").unlink()
    (run / "plots" / "pr_test.png").symlink_to(secret)
    page = report_page(run)
    assert base64.b64encode(secret.read_bytes()).decode() not in page
    assert "roc_test.png left out" in page and "not a PNG" in page and "pr_test.png left out" in page


def test_a_fifo_in_place_of_a_plot_is_not_waited_on(run):
    os.remove(run / "plots" / "curves.png")
    os.mkfifo(run / "plots" / "curves.png")
    assert "curves.png left out" in report_page(run)


# 4. predictions_<split>.csv paths

def test_the_gallery_opens_only_the_runs_own_split_images(run, tmp_path, monkeypatch):
    secret = tmp_path / "secret.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(secret)
    file = run / "predictions_test.csv"
    with open(file, newline="") as fh:
        rows = list(csv.reader(fh))
    foreign = [str(secret), "../../secret.png", "/etc/passwd"]
    for row, path in zip(rows[1:], foreign, strict=False):
        row[0] = path
    with open(file, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    opened: list[str] = []
    real_load = explain.load_image
    monkeypatch.setattr(explain, "load_image",
                        lambda path, *args, **kw: opened.append(str(path)) or real_load(path, *args, **kw))
    page = write_report(run).read_text(encoding="utf-8")
    gallery = page.split('id="gallery"')[1]
    assert opened and not any("secret" in path or "passwd" in path for path in opened), opened
    assert "Grad-CAM of /" not in gallery and "Grad-CAM of ../" not in gallery
    assert "not images of the run" in gallery and "split.csv" in gallery
    assert gallery.count("data:image/png;base64,") >= 1  # the run's own images still get theirs
