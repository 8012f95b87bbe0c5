"""Run the command line in a fresh interpreter, as a user does, or in this one (no 5-10 s of imports), and
check its errors are one clean line."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import subprocess
import sys

from imgclf.cli import main
from imgclf.data import cachedir


def imgclf(*args, cwd=None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m imgclf ARGS``; a hang fails the test through ``timeout`` instead of blocking CI."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run([sys.executable, "-m", "imgclf", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def run_main(*args, cwd=None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """``main(ARGS)`` in this interpreter, with its own stdout, stderr (imgclf's log included), working folder
    and environment, all restored afterwards; the result reads like ``imgclf``'s. An exception main() does not
    turn into a one-line error propagates, failing the test as a traceback would. ``timeout`` is pytest's
    (pyproject.toml) here."""
    logger = logging.getLogger("imgclf")
    saved = (logger.handlers, logger.propagate, logger.level, dict(os.environ), os.getcwd(), set(cachedir._held))
    out, err = io.StringIO(), io.StringIO()
    try:
        logger.handlers = []  # main() gives it a handler on the stderr below
        os.environ.update(env or {})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as stop:  # argparse's usage errors
                code = stop.code
    finally:
        logger.handlers, logger.propagate, logger.level = saved[:3]
        os.environ.clear()
        os.environ.update(saved[3])
        os.chdir(saved[4])
        for npy in set(cachedir._held) - saved[5]:  # the cache entries it marked in use: a process would end here
            release_in_use_mark(npy)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


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


def release_in_use_mark(npy) -> None:
    """What the end of a process does to a cache entry it marked in use: close the descriptor holding the mark."""
    os.close(cachedir._held.pop(npy))
