"""Run independent jobs (folds, trials) sequentially, in local processes, or as Ray tasks.

Every job is ``fn(*args)`` with a picklable top-level ``fn``; each job seeds itself from its own
arguments, so the backend never changes a result.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from imgclf.errors import ConfigError
from imgclf.logs import get_logger

log = get_logger("backends")

BACKENDS = ("sequential", "processes", "ray")


def run_jobs(fn: Callable, jobs: Sequence[tuple], backend: str = "sequential", n_jobs: int = 1,
             ray_address: str | None = None) -> list[Any]:
    """Results of ``fn(*job)`` for every job, in the order given."""
    if backend == "sequential" or (backend == "processes" and n_jobs <= 1):
        return [fn(*job) for job in jobs]
    if backend == "processes":
        threads = max(1, (os.cpu_count() or 1) // n_jobs)
        with ProcessPoolExecutor(n_jobs, mp_context=get_context("spawn"), initializer=_limit_threads,
                                 initargs=(threads,)) as pool:
            futures = [pool.submit(_captured, fn, *job) for job in jobs]
            return _relayed([f.result() for f in futures])
    if backend == "ray":
        return _relayed(_run_on_ray(fn, jobs, n_jobs, ray_address))
    raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")


class _Kept(logging.Handler):
    """A worker's imgclf warnings, kept to be said by the driver (a worker's own stderr may reach nobody)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))


def _captured(fn: Callable, *args) -> tuple[Any, list[tuple[int, str]]]:
    """``fn(*args)`` in a worker, with the warnings it logged (Ray drops a worker's log; a process's stderr
    would print them raw, interleaved with its siblings')."""
    kept = _Kept()
    logger = logging.getLogger("imgclf")
    logger.addHandler(kept)
    try:
        return fn(*args), kept.records
    finally:
        logger.removeHandler(kept)


def _relayed(outcomes: list[tuple[Any, list[tuple[int, str]]]]) -> list[Any]:
    """The jobs' results; their warnings said here, in job order (one said by every job is said once)."""
    for _, records in outcomes:
        for level, message in records:
            log.log(level, "%s", message)
    return [result for result, _ in outcomes]


def _limit_threads(threads: int) -> None:
    """Each worker process gets its share of the cores, so jobs do not oversubscribe them."""
    import torch

    torch.set_num_threads(threads)


def _run_on_ray(fn: Callable, jobs: Sequence[tuple], n_jobs: int, address: str | None) -> list[Any]:
    try:
        import ray
    except ImportError:
        raise ConfigError("backend 'ray' needs Ray: pip install 'imgclf[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 **({} if address else {"num_cpus": os.cpu_count()}))
    try:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, n_jobs))
        remote = ray.remote(num_cpus=cpus)(_ray_job)
        return ray.get([remote.remote(fn, cpus, *job) for job in jobs])
    finally:
        if started_here:
            ray.shutdown()


def _ray_job(fn: Callable, threads: int, *args):
    _limit_threads(threads)
    return _captured(fn, *args)
