"""The command line, end to end, in subprocesses like a user runs it."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from clitools import assert_clean_error, imgclf, reproducible_metrics, run_main
from imgclf.cli import main

from imagefactory import make_class_folders, make_csv, make_split_folders

TINY = ["--image-size", "16", "--conv-filters", "8,16", "--dropout", "0", "--augment", "none", "--epochs", "10",
        "--batch-size", "8", "--lr", "0.01", "--val-fraction", "0.2", "--test-fraction", "0.2"]


def cli(capsys, *args):
    """In-process run of the CLI: (exit code, stdout); the training tests need no fresh interpreter."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("layout", ["split_folders", "class_folders", "csv"])
def test_train_evaluate_predict_on_every_layout(tmp_path, capsys, layout):
    if layout == "split_folders":
        data = make_split_folders(tmp_path / "d", {"train": 12, "valid": 3, "test": 4})
    elif layout == "class_folders":
        data = make_class_folders(tmp_path / "d", 14)
    else:
        data = make_csv(tmp_path / "d", 14, with_split=True)
    run = tmp_path / "run"
    code, out = cli(capsys, "train", data, *TINY, "--out", run, "--channels", "1")
    assert code == 0 and f"run: {run}" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.75, metrics["test"]

    code, out = cli(capsys, "evaluate", run, "--split", "test")
    assert code == 0 and f"accuracy={metrics['test']['accuracy']:.4f}" in out

    code, out = cli(capsys, "predict", run, data, "--out", tmp_path / "p.csv")
    assert code == 0 and "predicted" in out
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    expected = 57 if layout == "split_folders" else 42
    assert len(rows) == expected and all(float(r["confidence"]) > 0 for r in rows)


def test_config_file_reproduces_a_run_and_flags_override_it(tmp_path, capsys):
    data = make_class_folders(tmp_path / "d", 14)
    assert cli(capsys, "train", data, *TINY, "--epochs", "3", "--out", tmp_path / "a")[0] == 0
    assert cli(capsys, "train", "--config", tmp_path / "a" / "config.yaml", "--out", tmp_path / "b")[0] == 0
    a, b = (reproducible_metrics(tmp_path / name / "metrics.json") for name in "ab")
    assert a == b
    assert cli(capsys, "train", "--config", tmp_path / "a" / "config.yaml", "--epochs", "2",
               "--out", tmp_path / "c")[0] == 0
    assert yaml.safe_load((tmp_path / "c" / "config.yaml").read_text())["train"]["epochs"] == 2


def test_a_test_class_missing_from_train_stops_before_training(tmp_path):
    data = make_split_folders(tmp_path / "d", {"train": 4}, classes=["covid", "normal", "pneumonia"])
    make_class_folders(data / "test", 2, classes=["covid", "normal", "pneumonia", "viral"])
    result = imgclf("train", data, *TINY, "--out", tmp_path / "run")
    assert_clean_error(result, "test split", "'viral'", "train lacks")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("args", "fragments"), [
    (["--lr", "-1"], ["train.lr"]),
    (["--model", "resnet81"], ["unknown model", "resnet18"]),
    (["--epochs", "2", "--patience", "5"], ["patience"]),
    (["--val-fraction", "1.5"], ["val_fraction"]),
    (["--model", "resnet18", "--pretrained", "--weights", "w.pt"], ["--pretrained and --weights", "keep one"]),
    (["--binary-head", "sigmoid", "--positive-class", "top bar"], ["--binary-head sigmoid", "--positive-class top bar",
                                                                  "binary task", "3 classes"]),
])
def test_bad_settings_are_one_line_errors(tmp_path, args, fragments):
    data = make_class_folders(tmp_path / "d", 3)
    assert_clean_error(imgclf("train", data, *args, "--out", tmp_path / "r"), *fragments)


def test_missing_inputs_are_one_line_errors(tmp_path):
    assert_clean_error(imgclf("train", tmp_path / "nope", "--out", tmp_path / "r"), "does not exist")
    assert_clean_error(imgclf("evaluate", tmp_path), "not a run directory")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [unclosed\n")
    assert_clean_error(imgclf("train", "--config", bad), "not valid YAML")


@pytest.mark.slow
def test_demo_reaches_its_accuracy_target(tmp_path):
    """`imgclf demo` with no arguments: real digits, held-out test accuracy >= 0.90 (its time: benchmarks/demo.py)."""
    result = imgclf("demo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = list((tmp_path / "imgclf-demo" / "runs").iterdir())
    test = json.loads((runs[0] / "metrics.json").read_text())["test"]
    assert test["accuracy"] >= 0.90 and test["n"] > 200
    assert sum(1 for _ in (tmp_path / "imgclf-demo" / "digits").rglob("*.png")) == 1797
    page = (runs[0] / "report.html").read_text()
    assert 'id="gallery"' in page and "Grad-CAM" in page and "Wilson" in page


def test_version_and_help_read_like_a_person_wrote_them(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("imgclf ")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help wraps at the terminal width
    assert "--dropout P" in text and "(default: 0.2)" in text and "example: imgclf train" in text
    assert "CFG__" not in text


def test_an_abbreviated_or_misspelt_flag_is_refused_with_the_nearest_and_the_commands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "data", "--epoch", "3"])  # argparse would have taken this as --epochs
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "usage: imgclf train" in err and "did you mean --epochs?" in err


LIGHT_CHECK = """
import json, os, sys
from imgclf.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    try:
        codes.append(main(argv))
    except SystemExit as stop:  # --help
        codes.append(stop.code)
heavy = sorted(m for m in ("torch", "timm", "torchvision", "sklearn", "matplotlib", "onnx") if m in sys.modules)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_refused_arguments_and_audit_answer_without_loading_torch(tmp_path):
    """They answer from the parser and the commands' own checks (cli/checks.py); the command's module, and
    torch with it, loads only once they pass. The answers are the usual one-line errors. audit needs no
    torch at all."""
    data = make_class_folders(tmp_path / "d", 4)
    (tmp_path / "mine.csv").write_text("kept\n")
    (tmp_path / "shown").mkdir()
    (tmp_path / "shown" / "mine.png").write_bytes(b"x")
    refused = [["train", data, "--epochs", "0"], ["train", "--resume", tmp_path, "--epochs", "3"],
               ["train", data, "--model", "simple_cnn", "--budget", "10"], ["grid", data, "--lr", "-1"],
               ["predict", tmp_path, data, "--out", tmp_path / "mine.csv"],
               ["explain", tmp_path, data, "--out", tmp_path / "shown"],
               ["audit", data, "--json", tmp_path / "mine.csv"], ["cache", "--max-gb", "3"],
               ["train", data, "--model", "simple_cnn", "--sync-bn", "--device", "cpu", "--nproc", "2"],
               ["predict", tmp_path, data, "--batch-size", "0"], ["predict", tmp_path, data, "--batch-size", "1e30"],
               ["cv", data, "--jobs", "0"], ["cv", data, "--jobs", "2"],
               ["grid", data, "--ray-address", "auto"], ["serve", tmp_path, "--port", "70000"],
               ["cv", data, "--folds", "0"],
               ["features", "resnet18", data, "--out", "f.npz", "--image-size", "9999"]]
    audit = ["audit", str(data), "--no-near", "--json", str(tmp_path / "audit.json")]  # needs no torch at all
    cache = ["cache", "--dir", str(tmp_path / "no cache yet")]  # neither does cache
    argvs = [["--help"], ["train", "--help"], *([str(word) for word in argv] for argv in refused), audit, cache]
    result = imgclf_python(LIGHT_CHECK, json.dumps(argvs))
    assert result["codes"] == [0, 0] + [2] * len(refused) + [0, 0]
    assert result["heavy"] == []
    assert (tmp_path / "mine.csv").read_text() == "kept\n"
    counts = json.loads((tmp_path / "audit.json").read_text())["counts"]
    assert counts == {"pool": {folder.name: 4 for folder in data.iterdir()}}
    # under torchrun: a global batch the 3 processes cannot split, refused by rank 0 before torch loads
    under_torchrun = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0"}
    split = imgclf_python(LIGHT_CHECK, json.dumps([["train", str(data), "--model", "simple_cnn", "--batch-size", "4",
                                                    "--out", str(tmp_path / "run")]]), env=under_torchrun)
    assert split == {"codes": [2], "heavy": []} and not (tmp_path / "run").exists()


def imgclf_python(code: str, *args: str, env: dict | None = None) -> dict:
    """Run ``code`` in a fresh interpreter (nothing imported yet) and read the JSON line it prints last."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_demos_take_the_epochs_asked_for(tmp_path):
    from imgclf.workflows.demo import demo_config

    assert demo_config(tmp_path).train.epochs == 30 and demo_config(tmp_path, transfer=True).train.epochs == 4
    assert demo_config(tmp_path, epochs=20, transfer=True).train.epochs == 20  # once cut to 4 without a word
    assert demo_config(tmp_path, epochs=5).train.epochs == 5


def test_the_demo_writes_its_digits_whole_and_trains_on_nothing_else(tmp_path):
    from imgclf.workflows.demo import PARTIAL_PREFIX, write_digits

    out = tmp_path / "demo"
    (out / (PARTIAL_PREFIX + "digits") / "3").mkdir(parents=True)  # a killed demo's half-written folder
    digits = write_digits(out / "digits")
    pngs = sorted(digits.rglob("*.png"))
    assert len(pngs) == 1797 and not (out / (PARTIAL_PREFIX + "digits")).exists()
    stamp = pngs[3].stat().st_mtime_ns
    assert write_digits(out / "digits") == digits and pngs[3].stat().st_mtime_ns == stamp  # reused as it is
    (digits / "cat").mkdir()
    (digits / "cat" / "mine.png").write_bytes(b"the user's")
    result = run_main("demo", "--out", out, "--epochs", "1")
    assert_clean_error(result, "holds files the demo did not write (cat/mine.png)", "choose another --out")
    assert (digits / "cat" / "mine.png").read_bytes() == b"the user's" and not (out / "runs").exists()
    shutil.rmtree(digits / "cat")
    pngs[3].unlink()
    assert_clean_error(run_main("demo", "--out", out, "--epochs", "1"), "lacks 1 of the demo's images")


def test_dist_flags_on_one_process_are_said_to_have_no_effect(trained_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy)
    result = run_main("evaluate", copy, "--split", "val", "--dist-timeout", "5")
    assert result.returncode == 0, result.stderr
    assert "--dist-timeout 5: no effect, evaluate runs in one process here; they apply when several join" \
        in result.stderr
    plain = run_main("evaluate", copy, "--split", "val")
    assert plain.returncode == 0 and "no effect" not in plain.stderr
    for value in ("-5", "0", "1e-9", "nan", "inf", "1e9"):  # refused, not "of no effect"
        refused = run_main("evaluate", copy, "--dist-timeout", value)
        assert refused.returncode == 2 and "argument --dist-timeout:" in refused.stderr
        assert "give 1 to 604800 seconds" in refused.stderr and "no effect" not in refused.stderr
