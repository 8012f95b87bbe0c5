"""A run directory is a file from a stranger: it never runs code, every file is validated, and the
manifest catches any change to what decides the model's answers.

Each tampered case is a copy of a trained run with one file changed; the CLI must answer with one
line naming the file (and the field), never a traceback, and never use the tampered value.
"""

import json
import os
import re
import shutil
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file as load_np
from safetensors.numpy import save_file as save_np

import imgclf
from clitools import assert_clean_error
from clitools import imgclf as imgclf_cli
from imgclf.cli import main
from imgclf.errors import RunDirError
from imgclf.runs import ensemble as ensemble_runs
from imgclf.runs import manifest
from imgclf.runs.base import check_and_seal, load_run
from imgclf.runs.heads import make_head, save_head
from imgclf.runs.safehead import load_head
from imgclf.training.resume import load_state, restore_rng

from conftest import tiny_config
from imagefactory import make_class_folders

# the bad-input corpus: every case ends within a bound, so a hang fails instead of blocking CI
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A network run and a scikit-learn-head run on one small dataset."""
    base = tmp_path_factory.mktemp("integrity")
    data = make_class_folders(base / "data", per_class=10)
    net = imgclf.train(tiny_config(data, base / "net", train={"epochs": 2}))
    head = imgclf.train(tiny_config(data, base / "logreg", model={"head": "logreg"}))
    return {"net": net.path, "logreg": head.path, "data": data}


def copy_of(runs, kind, tmp_path):
    target = tmp_path / kind
    shutil.copytree(runs[kind], target)
    return target


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def cli_error(capsys, *args) -> str:
    """In-process CLI: exit 2 and exactly one error line (no traceback reaches the user)."""
    assert main([str(a) for a in args]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("imgclf: error:")]
    assert len(lines) == 1
    return lines[0]


def malicious_head(path, marker):
    """A skops file whose root is a call of numpy's ``runstring`` on attacker code: the reported exploit.

    The callable's module starts with ``numpy.``, so a prefix rule trusted it and loading ran the code.
    """
    from skops.io import dump

    code = f"open({str(marker)!r}, 'w').write('ran')"
    dump((code, {}), path)
    with zipfile.ZipFile(path) as archive:
        args = json.loads(archive.read("schema.json"))
    root = {"__class__": "runstring", "__module__": "numpy.testing._private.utils",
            "__loader__": "ConstructorFromReduceNode", "__id__": 1,
            "content": {k: v for k, v in args.items() if k not in ("protocol", "_skops_version")},
            "protocol": args["protocol"], "_skops_version": args["_skops_version"]}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("schema.json", json.dumps(root))


def test_the_crafted_head_would_run_code_under_a_prefix_rule(tmp_path):
    """The exploit is real: skops itself runs it when its type is trusted, as the old prefix rule did."""
    from skops.io import get_untrusted_types, load

    marker = tmp_path / "ran"
    malicious_head(tmp_path / "head.skops", marker)
    types = get_untrusted_types(file=tmp_path / "head.skops")
    assert types == ["numpy.testing._private.utils.runstring"]
    load(tmp_path / "head.skops", trusted=types)
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_crafted_head_is_refused_and_nothing_runs(runs, tmp_path, command):
    run = copy_of(runs, "logreg", tmp_path)
    marker = tmp_path / "ran"
    malicious_head(run / "head.skops", marker)
    manifest.seal(run)  # as an attacker would: the refusal must come from the loader, not the manifest
    args = [run, runs["data"], "--out", tmp_path / "p.csv"] if command == "predict" else [run]
    result = imgclf_cli(command, *args, timeout=120)
    assert_clean_error(result, "head.skops", "numpy.testing._private.utils.runstring", "refusing")
    assert not marker.exists()


@pytest.mark.parametrize("kind,value", [("svm", 1.0), ("logreg", 1.0), ("knn", 3), ("rf", 20)])
def test_every_head_kind_round_trips_through_the_safe_loader(tmp_path, kind, value):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), np.arange(40) % 3
    head = make_head(kind, value, 0, False, y).fit(x, y)
    save_head(head, tmp_path / "head.skops")
    np.testing.assert_array_equal(load_head(tmp_path / "head.skops", kind).predict_proba(x), head.predict_proba(x))
    with pytest.raises(RunDirError, match="never writes for a"):  # a file of another kind is refused
        load_head(tmp_path / "head.skops", "logreg" if kind != "logreg" else "svm")


def test_a_tree_or_svm_with_inconsistent_arrays_is_refused(tmp_path):
    """Trusted types can still hold arrays that scikit-learn would index out of bounds at inference."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 4)), np.arange(40) % 2
    forest = make_head("rf", 10, 0, False, y).fit(x, y)
    tree = forest.steps[1][1].estimators_[0].tree_
    state = tree.__getstate__()
    state["nodes"]["left_child"][0] = 10**6
    tree.__setstate__(state)
    save_head(forest, tmp_path / "rf.skops")
    with pytest.raises(RunDirError, match="tree child indices out of range"):
        load_head(tmp_path / "rf.skops", "rf")
    svm = make_head("svm", 1.0, 0, False, y).fit(x, y)
    svm.steps[1][1].calibrated_classifiers_[0].estimator._n_support[0] += 3
    save_head(svm, tmp_path / "svm.skops")
    with pytest.raises(RunDirError, match="support-vector counts"):
        load_head(tmp_path / "svm.skops", "svm")


def test_a_finished_run_is_sealed_and_opens_cleanly(runs):
    recorded = json.loads((runs["net"] / "manifest.json").read_text())["sha256"]
    assert {"config.yaml", "classes.json", "model.safetensors", "model.json", "split.csv"} <= set(recorded)
    assert "head.skops" in json.loads((runs["logreg"] / "manifest.json").read_text())["sha256"]
    assert load_run(runs["net"]).meta.preprocess.size == 16


TAMPER = {  # name -> (file, change, fragments of the one-line error)
    "size 3000": ("model.json", lambda d: d["preprocess"].update(size=3000), ["model.json", "preprocess"]),
    "size 5000": ("model.json", lambda d: d["preprocess"].update(size=5000), ["model.json", "preprocess.size"]),
    "std 0": ("model.json", lambda d: d["preprocess"].update(std=[0.0, 1.0, 1.0]), ["model.json", "std"]),
    "string size": ("model.json", lambda d: d["preprocess"].update(size="16"), ["preprocess.size"]),
    "list not object": ("model.json", lambda d: (d.clear(), d.update(x=[1])), ["model.json"]),
    "output units": ("model.json", lambda d: d.update(output_units=7), ["model.json", "output_units"]),
    "one class": ("classes.json", lambda d: d.__delitem__(slice(1, None)), ["classes.json", "2 to"]),
    "swapped classes": ("classes.json", lambda d: d.reverse(), ["classes.json"]),
    "line break in a class": ("classes.json", lambda d: d.__setitem__(0, "cat\nINJECT: fake"),
                              ["classes.json", "control character"]),
    "class of 100 kB": ("classes.json", lambda d: d.__setitem__(0, "x" * 100_000),
                        ["classes.json", "100,000 characters"]),
    "empty root": ("dataset.json", lambda d: d.update(root=""), ["dataset.json", "root"]),
    "long root": ("dataset.json", lambda d: d.update(root="/x" * 50_000), ["dataset.json", "root"]),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_a_tampered_run_file_is_one_line_naming_it_even_after_resealing(runs, tmp_path, capsys, case):
    name, change, fragments = TAMPER[case]
    run = copy_of(runs, "net", tmp_path)
    if name == "model.json" and case == "list not object":
        (run / name).write_text("[1, 2]")
    else:
        edit_json(run / name, change)
    assert name in cli_error(capsys, "evaluate", run, "--split", "val")  # the manifest sees the edit
    manifest.seal(run)  # a careless re-seal: the schema and cross-checks must still refuse the file
    line = cli_error(capsys, "evaluate", run, "--split", "val")
    assert all(f in line for f in fragments), line


@pytest.mark.parametrize("field,value", [("accuracy", float("nan")), ("log_loss", float("inf")), ("n", 10**400),
                                         ("f1_macro", 1.5)])
def test_a_metrics_value_no_run_can_have_is_refused_naming_it(runs, tmp_path, capsys, field, value):
    """metrics.json is rewritten by evaluate, so it is not sealed: its schema alone keeps planted values out of
    the report (a NaN accuracy and a 400-digit image count were shown as given)."""
    run = copy_of(runs, "net", tmp_path)
    edit_json(run / "metrics.json", lambda d: d["val"].update({field: value}))
    line = cli_error(capsys, "report", run)
    assert "metrics.json" in line and field in line, line


@pytest.mark.parametrize("name,pattern,planted,said", [
    ("model.json", r'"epoch": \d+', '"epoch": ' + "9" * 5000, "model.json is damaged"),  # past the 4,300-digit limit
    ("config.yaml", r"epochs: \d+", "epochs: " + "9" * 5000, "holds a value YAML cannot read"),
    ("config.yaml", r"seed: \d+", "seed: 2026-13-45", "holds a value YAML cannot read"),  # a date YAML cannot make
])
def test_a_value_the_parser_cannot_make_is_one_line(runs, tmp_path, capsys, name, pattern, planted, said):
    """These raised ValueError from inside json/yaml, which no reader caught: a traceback."""
    run = copy_of(runs, "net", tmp_path)
    (run / "manifest.json").unlink()  # unsealed, so the reader itself meets the value
    text, count = re.subn(pattern, planted, (run / name).read_text(), count=1)
    assert count == 1
    (run / name).write_text(text)
    line = cli_error(capsys, "model-info", run)
    assert name in line and said in line, line


def test_a_string_threshold_is_refused(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    classes = json.loads((run / "classes.json").read_text())
    (run / "threshold.json").write_text(json.dumps({"rule": "max_f1", "threshold": "0.5",
                                                    "positive_class": classes[1], "chosen_on": "val"}))
    manifest.seal(run)
    assert "threshold.json: threshold" in cli_error(capsys, "report", run)


def test_one_flipped_byte_in_the_weights_is_caught(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    weights = load_np(run / "model.safetensors")
    key = next(iter(weights))
    weights[key] = weights[key].copy()
    weights[key].reshape(-1)[0] += 1.0
    save_np(weights, run / "model.safetensors")
    line = cli_error(capsys, "predict", run, runs["data"], "--out", tmp_path / "p.csv")
    assert "model.safetensors changed since the run was sealed" in line and "imgclf seal" in line


def test_a_deliberate_edit_is_resealed_by_the_seal_command(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    edit_json(run / "dataset.json", lambda d: d.update(root=str(runs["data"])))
    cli_error(capsys, "evaluate", run, "--split", "val")
    assert main(["seal", str(run)]) == 0
    assert "sealed" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--split", "val"]) == 0


def test_seal_refuses_a_broken_edit(runs, tmp_path):
    run = copy_of(runs, "net", tmp_path)
    meta = (run / "model.json").read_bytes()
    edit_json(run / "model.json", lambda d: d["preprocess"].update(std=[0.0, 1.0, 1.0]))
    with pytest.raises(RunDirError, match="std") as refused:
        check_and_seal(run)
    assert "imgclf seal" not in str(refused.value)  # it advised running seal, the command refusing it
    assert str(refused.value).endswith("edit it to agree with the run's other files, restore it, or re-train; seal "
                                       "records only a run whose files agree")
    (run / "model.json").write_bytes(meta)
    weights = run / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:1000])  # truncated: seal loads the weights, as predict would
    with pytest.raises(RunDirError, match="model.safetensors is damaged or truncated"):
        check_and_seal(run)
    weights.write_bytes(intact)
    state = load_np(str(weights))
    name = next(k for k, v in state.items() if np.issubdtype(v.dtype, np.floating))
    state[name][..., 0] = np.nan
    with safe_open(str(weights), "np") as stored:
        metadata = stored.metadata()
    save_np(state, str(weights), metadata=metadata)
    with pytest.raises(RunDirError, match=f"model.safetensors: {name} holds NaN or infinite values"):
        check_and_seal(run)
    (run / "INCOMPLETE").write_text("killed")
    with pytest.raises(RunDirError, match="has not finished"):
        check_and_seal(run)


def test_a_run_without_a_manifest_still_opens_with_a_warning(runs, tmp_path, caplog):
    run = copy_of(runs, "net", tmp_path)
    (run / "manifest.json").unlink()
    assert load_run(run).meta.preprocess.size == 16
    assert "imgclf seal" in caplog.text


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plant", ["fifo", "folder"])
def test_a_manifest_replaced_by_a_fifo_or_folder_is_refused_not_taken_for_missing(runs, tmp_path, capsys, plant):
    run = copy_of(runs, "net", tmp_path)
    (run / "manifest.json").unlink()
    os.mkfifo(run / "manifest.json") if plant == "fifo" else (run / "manifest.json").mkdir()
    error = cli_error(capsys, "report", run)  # it turned the check off: "has no manifest.json", and opened unchecked
    assert "manifest.json" in error and "not a regular file" in error
    (run / "manifest.json").rmdir() if plant == "folder" else (run / "manifest.json").unlink()
    os.mkfifo(run / "head.skops")  # a file added next to the sealed ones, of any kind, is named
    (run / "manifest.json").write_bytes((runs["net"] / "manifest.json").read_bytes())
    assert "head.skops was added after the run was sealed" in cli_error(capsys, "report", run)


def test_an_ensemble_that_lists_itself_is_an_error_not_a_recursion(runs, tmp_path, capsys):
    out = tmp_path / "ens"
    assert main(["ensemble", str(runs["net"]), str(copy_of(runs, "net", tmp_path)), "--out", str(out)]) == 0
    capsys.readouterr()
    edit_json(out / "ensemble.json", lambda d: d.update(members=[str(runs["net"]), str(out.resolve())]))
    manifest.seal(out)
    assert "own member" in cli_error(capsys, "evaluate", out)
    edit_json(out / "ensemble.json", lambda d: d.update(method="weighted", weights=[0.9, 0.9]))
    manifest.seal(out)
    assert "ensemble.json: weights" in cli_error(capsys, "evaluate", out)


def test_an_ensemble_lists_each_run_once_and_at_most_max_members_models_in_all(runs, tmp_path, capsys,
                                                                               monkeypatch):
    assert "you gave" in (line := cli_error(capsys, "ensemble", runs["net"], runs["net"], "--out", tmp_path / "e"))
    assert f"{runs['net']} twice" in line and not (tmp_path / "e").exists()  # refused before writing
    twin = copy_of(runs, "net", tmp_path)  # another directory: a run of its own
    pair = tmp_path / "pair"
    assert main(["ensemble", str(runs["net"]), str(twin), "--out", str(pair)]) == 0
    capsys.readouterr()
    edit_json(pair / "ensemble.json", lambda d: d.update(members=[str(twin), str(twin)]))
    manifest.seal(pair)
    assert f"ensemble.json lists {twin} twice" in cli_error(capsys, "evaluate", pair)
    edit_json(pair / "ensemble.json", lambda d: d.update(members=[str(runs["net"]), str(twin)]))
    manifest.seal(pair)
    # Nested ensembles multiply what predicting loads: the models are counted through them
    monkeypatch.setattr(ensemble_runs, "MAX_MEMBERS", 3)
    outer = tmp_path / "outer"
    line = cli_error(capsys, "ensemble", pair, shutil.copytree(runs["net"], tmp_path / "third"),
                     shutil.copytree(runs["net"], tmp_path / "fourth"), "--out", outer)
    assert "the ensemble holds more than 3 trained runs in all" in line and not outer.exists()
    monkeypatch.setattr(ensemble_runs, "MAX_MEMBERS", 4)
    assert main(["ensemble", str(pair), str(tmp_path / "third"), "--out", str(outer)]) == 0
    monkeypatch.setattr(ensemble_runs, "MAX_MEMBERS", 2)
    assert f"ensemble {outer} holds more than 2 trained runs" in cli_error(capsys, "evaluate", outer)


def test_a_tampered_confusion_matrix_is_one_error_line_when_the_report_draws_it(runs, tmp_path, capsys):
    run = copy_of(runs, "net", tmp_path)
    n = len(json.loads((run / "classes.json").read_text()))
    (run / "plots" / "confusion_val.png").unlink()  # the report draws the figure again from metrics.json
    for matrix, fragment in (([[1] * n] * (n - 1) + [[1]], "val.confusion_matrix: not square"),
                             ([[1] * (n + 1)] * (n + 1), f"is {n + 1} x {n + 1}, the run has {n} classes"),
                             ([[1] * n] * (n - 1) + [[1] * (n - 1) + [-3]], "val.confusion_matrix")):
        edit_json(run / "metrics.json", lambda d, m=matrix: d["val"].update(confusion_matrix=m))
        manifest.seal(run)
        assert fragment in cli_error(capsys, "report", run)


def test_damaged_resume_state_is_a_one_line_error(runs, tmp_path):
    run = copy_of(runs, "net", tmp_path)
    state = sorted((run / "resume").glob("epoch_*"))[-1] / "state.json"
    edit_json(state, lambda d: d.update(python_rng=[3, [1, 2], None]))
    model = load_run(runs["net"]).model
    tensors, info = load_state(run, model)
    with pytest.raises(RunDirError, match="random-number states"):  # a wrong-length state, refused when restored
        restore_rng(torch.Generator(), tensors, info)
    edit_json(state, lambda d: d.update(stage_index="zero"))
    with pytest.raises(RunDirError, match="state.json: stage_index"):
        load_state(run, model)
    state.write_text(" " * (16 << 20) + "{}")  # over the cap: refused before json parses it
    with pytest.raises(RunDirError, match="state.json is larger than"):
        load_state(run, model)
    state.unlink()
    os.mkfifo(state)  # would block a plain read forever
    with pytest.raises(RunDirError, match="state.json is not a regular file"):
        load_state(run, model)


def test_metrics_json_of_thousands_of_classes_reads_back_under_a_cap_that_grows_with_them(tmp_path, monkeypatch):
    """Two splits' K x K confusion matrices, written indented: ~1,800 classes passed the fixed 64 MB cap."""
    from imgclf import atomic
    from imgclf.runs import files as runfiles

    k = 30
    atomic.write_json(tmp_path / "metrics.json", {split: {"n": 900, "confusion_matrix": [[1234] * k] * k}
                                                  for split in ("val", "test")})
    size = (tmp_path / "metrics.json").stat().st_size
    monkeypatch.setattr(runfiles, "MAX_JSON_BYTES", size - 2 * 14 * k * k)  # scaled down: K^2 cells over it
    with pytest.raises(RunDirError, match="metrics.json is larger than"):
        runfiles.read_metrics(tmp_path / "metrics.json")
    assert len(runfiles.read_metrics(tmp_path / "metrics.json", n_classes=k)["test"]["confusion_matrix"]) == k
