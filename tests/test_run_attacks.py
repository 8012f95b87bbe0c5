"""The red team's cases against a run directory: each is refused in one line, quickly, without the
memory a tampered field asks for. The manifest is removed or resealed first, as an attacker would,
so every refusal comes from validation itself."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import yaml

import imgclf
from clitools import assert_clean_error
from clitools import imgclf as imgclf_cli
from imgclf.cli import main
from imgclf.runs import manifest
from imgclf.runs.heads import make_head, save_head
from imgclf.serving import bundle

from conftest import tiny_config
from imagefactory import make_class_folders

# every case ends within a bound, so a hang fails instead of blocking CI
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("attacks")
    data = make_class_folders(base / "data", per_class=8)
    net = imgclf.train(tiny_config(data, base / "net", train={"epochs": 1}))
    head = imgclf.train(tiny_config(data, base / "logreg", model={"head": "logreg"}))
    return {"net": net.path, "logreg": head.path, "data": data}


def copy_of(runs, kind, tmp_path):
    shutil.copytree(runs[kind], tmp_path / kind)
    return tmp_path / kind


def error_line(capsys, *args) -> str:
    assert main([str(a) for a in args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("imgclf: error:")]
    assert len(lines) == 1 and len(lines[0]) < 600
    return lines[0]


def edit_config(run, change):
    config = yaml.safe_load((run / "config.yaml").read_text())
    change(config)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    manifest.seal(run)


def test_a_fifo_in_place_of_a_run_file_is_refused_not_waited_on(runs, tmp_path):
    run = copy_of(runs, "net", tmp_path)
    os.mkfifo(run / "threshold.json")  # a file of any kind added next to the sealed ones is named, not read
    result = imgclf_cli("evaluate", run, "--split", "val", timeout=240)
    assert_clean_error(result, "threshold.json", "was added after the run was sealed")
    (run / "manifest.json").unlink()  # unsealed: the reader meets the FIFO and refuses it
    assert_clean_error(imgclf_cli("evaluate", run, "--split", "val", timeout=240), "threshold.json",
                       "not a regular file")


@pytest.mark.parametrize("name", ["split.csv", "export/model.onnx", "resume/epoch_00001/state.pt"])
def test_a_fifo_that_seal_or_a_reader_meets_is_refused_not_waited_on(runs, tmp_path, name, monkeypatch):
    """seal vouched for a run whose split.csv was a FIFO (it skipped it), and evaluate then waited on it for
    ever; predict --engine onnx and train --resume waited on theirs. Each is now one line."""
    run = copy_of(runs, "net", tmp_path)
    (run / "manifest.json").unlink()
    (run / name).parent.mkdir(parents=True, exist_ok=True)
    (run / name).unlink(missing_ok=True)
    os.mkfifo(run / name)
    if name == "split.csv":
        assert_clean_error(imgclf_cli("seal", run, timeout=120), "split.csv", "not a regular file")
        assert_clean_error(imgclf_cli("evaluate", run, "--split", "val", timeout=240), "not a regular file")
    elif name.startswith("export"):
        monkeypatch.setattr(bundle, "read_export", lambda _: None)  # as a valid export.json: the FIFO comes next
        with pytest.raises(imgclf.errors.RunDirError, match="model.onnx is not a regular file"):
            bundle.verified_onnx_bytes(imgclf.load_run(run))
    else:
        from imgclf.training.resume import load_state

        with pytest.raises(imgclf.errors.RunDirError, match="state.pt is not a regular file"):
            load_state(run, imgclf.load_run(runs["net"]).model)


def test_dev_zero_as_a_run_file_is_refused_without_reading_it(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    (run / "manifest.json").unlink()
    (run / "model.json").unlink()
    (run / "model.json").symlink_to("/dev/zero")
    assert "not a regular file" in error_line(capsys, "evaluate", run, "--split", "val")


@pytest.mark.parametrize("widths", [[4, 10**9], [4] * 65])
def test_a_huge_width_in_the_config_is_refused_before_any_model_is_built(runs, tmp_path, capsys, widths):
    run = copy_of(runs, "net", tmp_path)
    edit_config(run, lambda c: c["model"].update(conv_filters=widths))
    assert "conv_filters" in error_line(capsys, "evaluate", run, "--split", "val")


def test_a_config_wider_than_its_weights_is_refused_from_shapes_alone(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    edit_config(run, lambda c: c["model"].update(conv_filters=[8, 60000]))  # within bounds: 60000 filters
    line = error_line(capsys, "evaluate", run, "--split", "val")
    assert "does not fit the model in its config" in line and "60000" in line


def test_an_oversized_or_deeply_nested_config_is_refused(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    with open(run / "config.yaml", "a") as fh:
        fh.write("#" * (2 << 20) + "\n")
    manifest.seal(run)
    assert "larger than" in error_line(capsys, "evaluate", run, "--split", "val")
    laughs = "model:\n  pool: " + "[" * 30 + "x" + "]" * 30 + "\n"
    (run / "config.yaml").write_text(laughs)
    manifest.seal(run)
    assert "pool" in error_line(capsys, "evaluate", run, "--split", "val")


@pytest.mark.parametrize("content", ['{"kind": ["network"]}', "[" * 100000 + "]" * 100000])
def test_a_strange_run_json_is_one_line(runs, tmp_path, capsys, content):
    run = copy_of(runs, "net", tmp_path)
    (run / "run.json").write_text(content)
    manifest.seal(run)
    assert "run.json" in error_line(capsys, "evaluate", run, "--split", "val")


def test_a_logistic_head_whose_weights_do_not_fit_the_backbone_is_refused(runs, tmp_path, capsys):
    run = copy_of(runs, "logreg", tmp_path)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 5)), np.arange(30) % 3  # 5 features: the backbone gives more
    save_head(make_head("logreg", 1.0, 0, False, y).fit(x, y), run / "head.skops")
    manifest.seal(run)
    line = error_line(capsys, "evaluate", run, "--split", "val")
    assert "head.skops" in line and "features" in line


def test_a_billion_laughs_config_answers_with_a_short_line(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    rows = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    rows += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    text = "model:\n  pool: *a8\n" + "\n".join(rows) + "\n"
    (run / "config.yaml").write_text(text)
    manifest.seal(run)
    assert len(error_line(capsys, "evaluate", run, "--split", "val")) < 600


def test_manifest_names_outside_the_sealed_list_are_refused(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    data = json.loads((run / "manifest.json").read_text())
    data["sha256"]["../../etc/passwd"] = "0" * 64
    (run / "manifest.json").write_text(json.dumps(data))
    assert "manifest.json" in error_line(capsys, "evaluate", run, "--split", "val")


def test_a_batch_size_beyond_the_training_split_predicts_no_more_images_at_once(runs, tmp_path, monkeypatch):
    """config.yaml's batch size sets predict's batches; training never held more images than its split, and
    neither does predicting a folder with a run whose batch size says 10^12."""
    run = copy_of(runs, "net", tmp_path)
    edit_config(run, lambda c: c["train"].update(batch_size=10**12))
    train_images = sum(json.loads((run / "dataset.json").read_text())["counts"]["train"].values())
    batches = []
    real = imgclf.runs.predict.make_loader
    monkeypatch.setattr(imgclf.runs.predict, "make_loader",
                        lambda dataset, batch_size, **kw: batches.append(batch_size) or real(dataset, batch_size, **kw))
    tampered, original = imgclf.load_run(run), imgclf.load_run(runs["net"])
    preds = tampered.predict([runs["data"]])
    assert batches == [train_images] and tampered.batch_size == train_images
    assert len(preds.paths) == 24 > train_images
    assert np.allclose(preds.probs, original.predict([runs["data"]]).probs, atol=1e-5)


def test_a_negative_image_count_in_dataset_json_is_refused(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    info = json.loads((run / "dataset.json").read_text())
    info["counts"]["train"] = {name: -10**9 for name in info["counts"]["train"]}
    (run / "dataset.json").write_text(json.dumps(info))
    manifest.seal(run)
    assert "dataset.json" in error_line(capsys, "predict", run, runs["data"], "--out", tmp_path / "p.csv")


def test_a_run_folder_that_is_a_symbolic_link_elsewhere_is_never_written_through(runs, tmp_path, capsys):
    """report and evaluate draw into RUN/plots: a link there to another folder is refused, and nothing lands in
    the folder it points at (the attack used /etc). train's resume/, export's export/ go through the same check."""
    run, victim = copy_of(runs, "net", tmp_path), tmp_path / "victim"
    victim.mkdir()
    shutil.rmtree(run / "plots")
    (run / "plots").symlink_to(victim)
    assert "plots is a symbolic link or a file" in error_line(capsys, "evaluate", run, "--split", "val")
    assert list(victim.iterdir()) == []
    shutil.rmtree(run / "resume", ignore_errors=True)
    (run / "resume").symlink_to(victim)
    with pytest.raises(imgclf.errors.RunDirError, match="resume is a symbolic link"):
        imgclf.atomic.inner_folder(run, "resume")


def test_weights_that_are_not_numbers_are_named_as_the_cause(runs, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = copy_of(runs, "net", tmp_path)
    state = load_file(run / "model.safetensors")
    last = sorted(state)[-1]
    state[last] = torch.full_like(state[last], float("nan"))
    save_file(state, run / "model.safetensors", metadata={"format": "pt"})
    manifest.seal(run)
    line = error_line(capsys, "predict", run, runs["data"], "--out", tmp_path / "p.csv")
    assert "not a number for 24 image(s): its weights hold NaN or infinite values" in line


def test_a_saved_best_file_that_is_a_device_is_not_copied_until_the_disk_fills(runs, tmp_path):
    from imgclf.training.resume import restore_best_file

    run = copy_of(runs, "net", tmp_path)
    best = run / "resume" / "epoch_00001" / "best.safetensors"
    best.unlink(missing_ok=True)
    best.symlink_to("/dev/zero")
    with pytest.raises(imgclf.errors.RunDirError, match="best.safetensors is not a regular file"):
        restore_best_file(run, run / "model.safetensors", imgclf.load_run(runs["net"]).model, lambda _: None)


def test_a_split_csv_swollen_past_the_images_dataset_json_counts_is_refused_as_it_is_read(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    lines = (run / "split.csv").read_text().splitlines()
    with open(run / "split.csv", "a") as fh:  # the rows repeated: a file that grows without bound reads the same
        fh.write("\n".join(lines[1:] * 50) + "\n")
    manifest.seal(run)
    line = error_line(capsys, "evaluate", run, "--split", "val")
    assert "split.csv lists more images than the" in line and "dataset.json counts" in line


def test_a_dataset_json_without_counts_still_reads_its_split(runs, tmp_path):
    run = copy_of(runs, "net", tmp_path)
    dataset = json.loads((run / "dataset.json").read_text())
    del dataset["counts"]  # an older or hand-made record: nothing to bound the rows by, not "0 images"
    (run / "dataset.json").write_text(json.dumps(dataset))
    manifest.seal(run)
    assert len(imgclf.load_run(run).index()) == len((run / "split.csv").read_text().splitlines()) - 1
