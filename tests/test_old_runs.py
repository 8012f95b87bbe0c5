"""Run directories written by earlier versions keep working: load, evaluate, predict and report.

``fixtures/run_v0_1`` was written by imgclf 0.1 (before the package moved into wings) from the
synthetic data that ``make_fixture_data`` recreates; the dataset itself is not committed.
"""

import shutil
from pathlib import Path

import numpy as np

from imgclf.cli import main
from imgclf.evaluation.predictions import Predictions

from imagefactory import make_class_folders

FIXTURE = Path(__file__).parent / "fixtures" / "run_v0_1"


def make_fixture_data(folder):
    return make_class_folders(folder, per_class=6, classes=["left bar", "right bar"], sizes=(20,))


def test_a_run_from_version_0_1_evaluates_predicts_and_reports(tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    data = make_fixture_data(tmp_path / "data")
    saved = Predictions.from_csv(run / "predictions_test.csv")
    assert main(["evaluate", str(run), "--data", str(data)]) == 0
    again = Predictions.from_csv(run / "predictions_test.csv")
    assert again.paths == saved.paths
    # same weights, same images, same answers: 0.1 predicted under bf16 autocast, runs now predict in fp32
    np.testing.assert_allclose(again.probs, saved.probs, atol=2e-3)
    assert (again.probs.argmax(axis=1) == saved.probs.argmax(axis=1)).all()
    assert main(["predict", str(run), str(data), "--out", str(tmp_path / "p.csv")]) == 0
    assert len(Predictions.from_csv(tmp_path / "p.csv").paths) == 12
    assert main(["report", str(run)]) == 0
    assert "Decisions:" in (run / "report.html").read_text()
