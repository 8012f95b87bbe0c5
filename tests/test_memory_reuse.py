"""A CPU training process reuses the memory of freed large tensors instead of faulting it in afresh."""

import subprocess
import sys

import pytest

import imgclf
from imgclf.runs import network
from imgclf.workflows import lifecycle

from conftest import tiny_config
from imagefactory import make_class_folders

FAULTS_FUNCTION = """
import resource, sys
import torch

def faults_of_a_repeated_tensor():
    # The heap settles into reusing the freed block only after a few rounds: torch asks posix_memalign for a
    # little more than the block it freed, so the heap grows by 64 MB until freed blocks meet (seen: 3 to 9
    # rounds over 30 processes, with ASLR deciding). The last of 24 rounds is the settled one.
    for _ in range(23):
        torch.ones(16 * 2**20)  # 64 MB, freed at once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

"""

FAULTS_OF_A_REPEATED_TENSOR = FAULTS_FUNCTION + """
from imgclf.runtime import Compute

plain = faults_of_a_repeated_tensor()
Compute.resolve("cpu", "fp32", None)
print(plain, faults_of_a_repeated_tensor())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_large_tensor_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_REPEATED_TENSOR], capture_output=True, text=True,
                         check=True).stdout.split()
    plain, reused = int(out[0]), int(out[1])
    # glibc's default: a fresh mmap each time, all faulted in again (16,384 faults with 4 KB pages, 4,096
    # where the kernel maps 16 KB folios); kept memory: none or a few
    assert plain > 0 and reused <= plain // 20


KEPT_THEN_RELEASED = """
import torch
from imgclf.runtime import Compute, release_freed_memory

def anon_mib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon"):
            return int(line.split()[1]) // 1024

Compute.resolve("cpu", "fp32", None)
base = anon_mib()
torch.ones(64 * 2**20)  # 256 MB, freed at once: kept by the process
kept = anon_mib()
release_freed_memory()
print(base, kept, anon_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_memory_kept_for_training_is_handed_back_when_training_ends():
    out = subprocess.run([sys.executable, "-c", KEPT_THEN_RELEASED], capture_output=True, text=True,
                         check=True).stdout.split()
    base, kept, released = (int(v) for v in out)
    assert kept - base > 200  # kept after the tensor was freed
    assert released - base < 50  # handed back


PREDICTING_PROCESS = FAULTS_FUNCTION + """
import imgclf

run = imgclf.load_run(sys.argv[1])
plain = faults_of_a_repeated_tensor()
assert run.compute.device.type == "cpu"
print(plain, faults_of_a_repeated_tensor())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_process_that_only_predicts_reuses_freed_memory_too(trained_run):
    """evaluate, predict and serve: their batches' large tensors (1.6x faster on the notebook CNN)."""
    out = subprocess.run([sys.executable, "-c", PREDICTING_PROCESS, str(trained_run.path)], capture_output=True,
                         text=True, check=True).stdout.split()
    plain, reused = int(out[0]), int(out[1])
    assert plain > 0 and reused <= plain // 20


def test_the_kept_memory_goes_back_after_the_test_predictions_and_before_the_baselines(tmp_path, monkeypatch):
    """The final test pass reuses training's kept memory; the baselines (another network) start from a trimmed
    heap, so that their peak does not stack on training's."""
    events = []
    evaluate, baselines = network.NetworkRun.evaluate, lifecycle.baseline_rows
    monkeypatch.setattr(lifecycle, "release_freed_memory", lambda: events.append("release"))
    monkeypatch.setattr(network.NetworkRun, "evaluate",
                        lambda self, split, **kw: events.append(f"predict {split}") or evaluate(self, split, **kw))
    monkeypatch.setattr(lifecycle, "baseline_rows", lambda *a: events.append("baselines") or baselines(*a))
    imgclf.train(tiny_config(make_class_folders(tmp_path / "data", per_class=6), tmp_path / "run",
                             train={"epochs": 1}))
    assert events == ["predict test", "release", "baselines"]
