"""Run independent jobs (folds, trials) sequentially, in local processes, or as Ray tasks.

Every job is ``fn(*args)`` with a picklable top-level ``fn``; each job seeds itself from its own
arguments, so the backend never changes a result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

from imgclf.errors import ConfigError

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
            futures = [pool.submit(fn, *job) for job in jobs]
            return [f.result() for f in futures]
    if backend == "ray":
        return _run_on_ray(fn, jobs, n_jobs, ray_address)
    raise ConfigError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")


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
    return fn(*args)
