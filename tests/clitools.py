"""Run the command line in a fresh interpreter, as a user does, and check its errors are one clean line."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def imgclf(*args, cwd=None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m imgclf ARGS``; a hang fails the test through ``timeout`` instead of blocking CI."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "imgclf", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def assert_clean_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, no traceback, exactly one ``imgclf: error:`` line holding every fragment; returns that line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("imgclf: error:")]
    assert len(error_lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], error_lines[0]
    return error_lines[0]


def reproducible_metrics(path) -> dict:
    """metrics.json without its baselines' timings, the one part of it a rerun does not reproduce."""
    metrics = json.loads(path.read_text())
    metrics["baselines"] = [{k: v for k, v in row.items() if k != "seconds"} for row in metrics.get("baselines", [])]
    return metrics
