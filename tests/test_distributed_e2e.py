"""Issue 18, phase 2: whole runs under torchrun (CPU, gloo), as a user starts them.

Each multi-process test starts real ranks through torch's launcher (``python -m torch.distributed.run``
or ``imgclf train --nproc``) in fresh interpreters, under a subprocess timeout, so a hang fails the
test. Rank 1's writes are watched by a Python audit hook; its logs by torchrun's per-rank log files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from clitools import assert_clean_error, imgclf, reproducible_metrics
from imgclf.cli.commands import without_nproc
from imgclf.data.index import build_index
from imgclf.data.pipeline import prepare, train_loader
from imgclf.models.networks import Preprocess
from imgclf.models.objective import Objective
from imgclf.runtime import Compute
from imgclf.training.ddp import train_sampler
from imgclf.training.distributed import DistContext
from imgclf.training.fit import _epoch_row, fit
from imgclf.training.resume import capture_rng, for_rank

from conftest import tiny_config
from imagefactory import make_class_folders, make_split_folders

TINY = ["--image-size", "16", "--model", "simple_cnn", "--conv-filters", "8,16", "--dropout", "0.0", "--lr", "0.01",
        "--no-report", "--bootstrap", "50", "--val-fraction", "0.25", "--test-fraction", "0.25"]
TIMING = ("train_seconds", "seconds")

# Rank != 0 must write nothing in the run or the cache: every write-like call is recorded by an audit
# hook (os.replace, mkdir, open for writing...), and each rank's final weights are hashed.
AUDIT = r'''
import atexit, hashlib, json, os, sys

ROOTS = [os.path.realpath(p) for p in os.environ["AUDIT_ROOTS"].split(os.pathsep)]
WRITE_EVENTS = {"os.rename", "os.replace", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate",
                "os.symlink", "os.link", "os.chmod", "os.utime"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
seen = []


def inside(path):
    if isinstance(path, int) or path is None:
        return False
    path = os.path.realpath(os.path.abspath(os.fsdecode(path)))
    return any(path == root or path.startswith(root + os.sep) for root in ROOTS)


def hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(c in (mode or "") for c in "wax+") or bool((flags or 0) & WRITE_FLAGS)
        if writing and inside(path):
            seen.append([event, os.fsdecode(path)])
    elif event == "os.mkdir" and inside(args[0]) and os.path.isdir(args[0]):
        pass  # mkdir(exist_ok=True) of a folder that is there writes nothing
    elif event in WRITE_EVENTS and args and inside(args[0]):
        seen.append([event, os.fsdecode(args[0])])


sys.addaudithook(hook)

from imgclf.cli import main
from imgclf.training import stages
from imgclf.training.distributed import replicas_agree, unwrap

digests = []
plain_run = stages.StageRunner.run


def run_and_compare(self, *args, **kwargs):
    history = plain_run(self, *args, **kwargs)
    state = unwrap(self.model).state_dict()
    digest = hashlib.sha256(b"".join(state[k].detach().contiguous().view(-1).view(__import__("torch").uint8)
                                     .numpy().tobytes() for k in sorted(state))).hexdigest()
    digests.append({"agree": replicas_agree(self.ctx, self.model), "sha256": digest})
    return history


stages.StageRunner.run = run_and_compare


def dump():
    with open(os.path.join(os.environ["AUDIT_OUT"], f"rank{os.environ['RANK']}.json"), "w") as fh:
        json.dump({"writes": seen, "digests": digests}, fh)


atexit.register(dump)
sys.exit(main(sys.argv[1:]))
'''


def _env(cache: Path, **extra: str) -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore", "IMGCLF_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
            **extra}


def _torchrun(nproc: int, *args, env: dict, cwd: Path, launcher: tuple[str, ...] = (), timeout: float = 240,
              module: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
               *launcher, *(["-m", "imgclf"] if module else []), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def _history(run: Path) -> list[dict]:
    with open(run / "history.csv", encoding="utf-8") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def _rank_log(log_dir: Path, rank: int, stream: str) -> str:
    found = list(log_dir.rglob(f"attempt_*/{rank}/{stream}.log"))
    assert len(found) == 1, sorted(str(p) for p in log_dir.rglob("*"))
    return found[0].read_text(encoding="utf-8", errors="replace")


# ---------------------------------------------------------------- whole runs on 2 ranks


@pytest.mark.slow
def test_torchrun_trains_a_run_rank_0_alone_writes_and_it_evaluates_and_predicts_like_any_other(tmp_path):
    """2 ranks on an empty cache, a cached-feature head stage then a fine-tune, class-balanced sampling."""
    data, cache, audit, logs = (tmp_path / name for name in ("data", "cache", "audit", "logs"))
    make_class_folders(data, per_class=10)
    audit.mkdir()
    (tmp_path / "audit.py").write_text(AUDIT, encoding="utf-8")
    run = tmp_path / "run"
    env = _env(cache, AUDIT_ROOTS=os.pathsep.join(map(str, (run, cache))), AUDIT_OUT=str(audit))
    result = _torchrun(2, tmp_path / "audit.py", "train", data, *TINY, "--batch-size", "8", "--sampler", "weighted",
                       "--stage", "name=head,freeze=backbone,epochs=2", "--stage", "name=all,freeze=none,epochs=2",
                       "--max-seconds", "900", "--out", run, env=env, cwd=tmp_path, module=False,
                       launcher=("--log-dir", str(logs), "--redirects", "3"))
    assert result.returncode == 0, _rank_log(logs, 0, "stderr")[-3000:] + result.stderr[-2000:]

    ranks = [json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["writes"], "the audit hook saw no write at all: it is not watching"
    assert ranks[1]["writes"] == [], "rank 1 wrote into the run or the cache"
    assert ranks[0]["digests"] == ranks[1]["digests"] and ranks[0]["digests"][0]["agree"]
    probe = list(cache.glob("*.probe.npy"))  # rank 0's linear-probe baseline keeps its features beside the images
    assert len(probe) == 1 and len(list(cache.glob("*.npy"))) == 2 and not list(cache.glob(".*tmp*"))

    rank0, rank1 = _rank_log(logs, 0, "stderr"), _rank_log(logs, 1, "stderr")
    assert "2 processes (gloo)" in rank0 and "stage head" in rank0 and "stage all" in rank0
    assert "batch size 8 (4 per process)" in rank0
    assert "--max-seconds ends training between epochs only (an epoch is never given up part-way)" in rank0
    for line in ("data: train", "stage head", "head 1/2", "run written", "decoding", "imgclf: error"):
        assert line not in rank1, f"rank 1 logged {line!r}"
    assert _rank_log(logs, 1, "stdout").strip() == ""
    assert f"run: {run}" in _rank_log(logs, 0, "stdout")

    history = _history(run)
    assert [row["stage"] for row in history] == ["head", "head", "all", "all"]
    assert not (run / "INCOMPLETE").exists() and (run / "resume" / "epoch_00004" / "ranks.pt").is_file()
    weights = load_file(run / "model.safetensors")
    assert weights and not any(key.startswith(("module.", "_orig_mod.")) for key in weights)
    assert hashlib.sha256(b"".join(weights[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                                   for k in sorted(weights))).hexdigest() == ranks[0]["digests"][0]["sha256"]
    assert "sync_bn: false" in (run / "config.yaml").read_text()

    trained = (run / "predictions_test.csv").read_text()
    evaluated = imgclf("evaluate", run, "--split", "test", env={"IMGCLF_CACHE_DIR": str(cache)})
    assert evaluated.returncode == 0, evaluated.stderr
    assert (run / "predictions_test.csv").read_text() == trained  # one process predicts what the ranks did
    predicted = imgclf("predict", run, data, "--out", tmp_path / "p.csv", env={"IMGCLF_CACHE_DIR": str(cache)})
    assert predicted.returncode == 0, predicted.stderr
    assert "predicted 30 images" in predicted.stdout


def _eleven_test_images(root: Path) -> Path:
    make_split_folders(root, {"train": 4, "val": 3, "test": 4})
    first = sorted((root / "test").rglob("*.*"))[0]
    first.unlink()  # 11 test images: 3 batches of 4 (the last one short) at world sizes 1, 2 and 3
    return root


@pytest.mark.slow
def test_the_same_weights_give_the_same_predictions_and_metrics_at_world_sizes_1_2_3(tmp_path):
    """11 test images, batch 4: one process (today's evaluate), then torchrun with 2 and 3 ranks."""
    data, cache = _eleven_test_images(tmp_path / "data"), tmp_path / "cache"
    run = tmp_path / "run"
    env = {"IMGCLF_CACHE_DIR": str(cache)}
    trained = imgclf("train", data, *TINY, "--batch-size", "4", "--epochs", "2", "--out", run, env=env)
    assert trained.returncode == 0, trained.stderr
    outputs = {}
    for world in (1, 2, 3):
        if world == 1:
            result = imgclf("evaluate", run, "--split", "test", env=env)
        else:
            result = _torchrun(world, "evaluate", run, "--split", "test", env=_env(cache), cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("test: n=11 ") == 1  # rank 0 alone prints
        metrics = json.loads((run / "metrics.json").read_text())["test"]
        outputs[world] = ((run / "predictions_test.csv").read_text(), metrics)
    assert outputs[1][1]["n"] == 11
    assert outputs[2] == outputs[1] and outputs[3] == outputs[1]


def _children(parent: int) -> list[int]:
    """Processes whose parent is ``parent`` (the launcher's workers), from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdecimal():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
                found.append(int(entry.name))
    return found


def _rank_pid(parent: int, rank: int) -> int | None:
    for pid in _children(parent):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return pid
    return None


def _kill_rank_after_epoch(command: list[str], env: dict, cwd: Path, run: Path, epoch: int,
                           rank: int) -> subprocess.CompletedProcess:
    """Start ``command`` (a launcher); once ``epoch`` is saved, SIGKILL ``rank``; wait for the launcher."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not any(int(p.name.split("_")[1]) >= epoch for p in (run / "resume").glob("epoch_*")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run never saved an epoch"
            time.sleep(0.01)
        pid = _rank_pid(proc.pid, rank)
        assert pid is not None, "no worker of that rank"
        os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_resume_ends_where_an_uninterrupted_run_ends(tmp_path):
    """Augmentation on (each rank's own random stream), 2 processes, 12 epochs; rank 1 killed after epoch 2."""
    data, cache = make_class_folders(tmp_path / "data", per_class=8), tmp_path / "cache"
    train = [sys.executable, "-m", "imgclf", "train", str(data), *TINY, "--batch-size", "6", "--epochs", "12",
             "--augment", "light", "--no-early-stopping", "--no-restore-best", "--nproc", "2", "--out"]
    env = _env(cache)
    reference = subprocess.run([*train, str(tmp_path / "ref")], capture_output=True, text=True, cwd=tmp_path,
                               env=env, timeout=240)
    assert reference.returncode == 0, reference.stderr[-3000:]

    run = tmp_path / "killed"
    killed = _kill_rank_after_epoch([*train, str(run)], env, tmp_path, run, epoch=2, rank=1)
    assert killed.returncode == 2, killed.stderr[-3000:]
    assert_clean_error(killed, "rank 1 of 2", "was killed by SIGKILL", "imgclf train --resume RUN")
    assert (run / "INCOMPLETE").exists(), "the run ended before the kill; nothing was tested"
    saved = max(int(p.name.split("_")[1]) for p in (run / "resume").glob("epoch_*"))
    assert 2 <= saved < 12

    resumed = imgclf("train", "--resume", run, "--nproc", "2", env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} after epoch {saved}" in resumed.stderr
    assert _history(run) == _history(tmp_path / "ref")
    assert reproducible_metrics(run / "metrics.json") == reproducible_metrics(tmp_path / "ref" / "metrics.json")
    for name in ("predictions_val.csv", "predictions_test.csv"):
        assert (run / name).read_text() == (tmp_path / "ref" / name).read_text(), name


# ---------------------------------------------------------------- errors in one line, before any run dir


def _as_rank(rank: int, world: int, port: int | None = None) -> dict:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free = sock.getsockname()[1]
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free)}


def test_a_rank_whose_peers_never_join_ends_within_the_dist_timeout_with_one_line(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4)
    result = imgclf("train", data, *TINY, "--batch-size", "4", "--dist-timeout", "3", "--out", tmp_path / "run",
                    env=_as_rank(0, 2), timeout=120)
    assert_clean_error(result, "rank 0 of 2 could not join the others", "within 3 s", "--dist-timeout")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_batch_the_world_size_cannot_split_is_refused_before_joining_or_any_run_dir(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4)
    result = imgclf("train", data, *TINY, "--batch-size", "4", "--out", tmp_path / "run", env=_as_rank(0, 3))
    assert_clean_error(result, "--batch-size 4 is the global batch", "3 processes", "3 or 6")
    assert not (tmp_path / "run").exists()
    quiet = imgclf("train", data, *TINY, "--batch-size", "4", "--out", tmp_path / "run", env=_as_rank(1, 3))
    assert quiet.returncode == 2 and "imgclf: error" not in quiet.stderr  # rank 0 says it, once
    launcher = imgclf("train", data, *TINY, "--batch-size", "5", "--nproc", "2", "--out", tmp_path / "run")
    assert_clean_error(launcher, "--batch-size 5 is the global batch", "2 processes")  # before torchrun starts
    on_cpu = imgclf("train", data, *TINY, "--batch-size", "4", "--sync-bn", "--device", "cpu",
                    "--out", tmp_path / "run", env=_as_rank(0, 2))
    assert_clean_error(on_cpu, "--sync-bn needs CUDA")


@pytest.mark.slow
def test_commands_that_run_on_one_process_refuse_torchrun_in_one_line(tmp_path):
    result = imgclf("predict", tmp_path, tmp_path, env=_as_rank(0, 2))
    assert_clean_error(result, "predict runs on one process", "train and evaluate")
    assert imgclf("predict", tmp_path, tmp_path, env=_as_rank(1, 2)).stderr.count("imgclf: error") == 0
    nested = imgclf("train", tmp_path, "--nproc", "2", env=_as_rank(0, 2))
    assert_clean_error(nested, "under torchrun drop --nproc")
    assert_clean_error(imgclf("train", tmp_path, "--nproc", "0"), "--nproc 0 must be 1 or more")


# ---------------------------------------------------------------- pieces, in this process


def test_nproc_is_taken_out_of_the_command_each_rank_runs():
    assert without_nproc(["-v", "train", "d", "--nproc", "2", "--epochs", "3"]) == ["-v", "train", "d", "--epochs", "3"]
    assert without_nproc(["train", "--nproc=4", "d"]) == ["train", "d"]


def test_the_epoch_row_of_two_ranks_counts_every_image_of_both():
    one = _epoch_row([(6.0, 3, 4, np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))], 2)
    two = _epoch_row([(2.0, 2, 2, np.array([0, 1]), np.array([0, 1])),
                      (4.0, 1, 2, np.array([1, 0]), np.array([0, 0]))], 2)
    assert one == two and one["train_loss"] == 1.5 and one["train_accuracy"] == 0.75


def test_a_rank_resumes_its_own_random_streams_and_a_new_world_size_is_said(tmp_path, caplog):
    states = []
    for seed in (1, 2):
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        states.append(capture_rng(generator))
    folder = tmp_path / "resume" / "epoch_00003"
    folder.mkdir(parents=True)
    torch.save([{**t, **p} for t, p in states], folder / "ranks.pt")
    saved = ({"torch_rng": states[0][0]["torch_rng"], "data_rng": states[0][0]["data_rng"], "optimizer": {}},
             {"epoch": 3, "world_size": 2, **states[0][1]})
    mine = for_rank(tmp_path, saved, 1, 2, torch.Generator())
    assert torch.equal(mine[0]["torch_rng"], states[1][0]["torch_rng"]) and mine[1]["numpy_rng"] == \
        states[1][1]["numpy_rng"]
    assert for_rank(tmp_path, saved, 0, 2, torch.Generator()) is saved
    assert not caplog.records
    fresh = torch.Generator().manual_seed(9)
    third = for_rank(tmp_path, saved, 2, 3, fresh)
    assert torch.equal(third[0]["data_rng"], fresh.get_state())
    assert "trained on 2 process(es) and resumes on 3" in caplog.text


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Identity(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_fp16_training_scales_its_loss_and_the_scale_is_checkpointed_for_resume(tmp_path):
    """The GPU's fp16 path (GradScaler) run on the CPU: cfg as the run's, fp16 autocast, the scaler in the state."""
    torch.manual_seed(0)
    model = _Tiny()
    data = [(torch.randn(4), i % 2, i) for i in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    cfg = tiny_config(tmp_path, tmp_path / "r", train={"epochs": 2, "schedule": "none"}).train
    states = []
    before = model.head.weight.detach().clone()
    fit(model, Objective(2), loader, cfg, Compute(torch.device("cpu"), "fp16"), None, lambda e: None,
        lambda h: None, checkpoint=states.append)
    assert not torch.equal(model.head.weight, before)
    assert [s["scaler"]["scale"] for s in states] == [65536.0, 65536.0]  # no overflow: the scale holds
    plain = []
    fit(_Tiny(), Objective(2), loader, cfg, Compute(torch.device("cpu"), "fp32"), None, lambda e: None,
        lambda h: None, checkpoint=plain.append)
    assert "scaler" not in plain[0]  # fp32 and bf16 need no scaler: their state is as before


def test_a_rank_s_training_loader_drops_a_lone_last_image_of_its_own_share(tmp_path, caplog):
    """One process drops a 1-image last batch of the split; a rank, of its own share (BatchNorm cannot train on 1);
    only where a BatchNorm trains, and said. Without one (or to cache a frozen backbone's features) every image."""
    config = tiny_config(make_class_folders(tmp_path / "d", per_class=6), tmp_path / "o")
    pre = Preprocess(16, 3, (0.5,) * 3, (0.25,) * 3)
    prepared = prepare(build_index(config.data, 0), pre, config.data)
    targets = prepared.index.subset("train").targets
    sampler = train_sampler(DistContext(0, 2, 0), targets, False, 0, torch.Generator())
    batch = next(b for b in range(2, len(sampler)) if len(sampler) % b == 1 and len(targets) % b != 1)
    loader = train_loader(prepared, config.augment, pre, batch, torch.Generator(), torch.device("cpu"), sampler,
                          trains_batchnorm=True)
    assert loader.loader.drop_last and len(loader) == len(sampler) // batch
    assert f"in batches of {batch} leave one alone in the last batch" in caplog.text
    alone = train_loader(prepared, config.augment, pre, batch, torch.Generator(), torch.device("cpu"),
                         trains_batchnorm=True)
    assert not alone.loader.drop_last
    caplog.clear()
    every = train_loader(prepared, config.augment, pre, batch, torch.Generator(), torch.device("cpu"), sampler)
    assert not every.loader.drop_last and sum(len(b[1]) for b in every) == len(sampler)
    assert "leave one alone" not in caplog.text
