"""``imgclf grid``: every combination of the given settings is a run; a leaderboard ranks them
on validation, and only the best configuration is then evaluated, once, on test.

Any config field can vary (``--param optimizer=adam,sgd --param lr=1e-3,1e-4``, flag names,
``section.field`` or a stage's ``stages.N.field``), or give a YAML mapping of field -> list of
values, where a list of mappings couples settings (``gridparams`` holds the vocabulary).
Re-running resumes: finished trials are read back, not retrained.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from sklearn.model_selection import ParameterGrid

from imgclf import atomic
from imgclf.config import Config, build_config
from imgclf.data.pipeline import prepare
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.reporting.evalplots import redraw_after_scoring
from imgclf.reporting.html import write_report
from imgclf.runs.base import Run, open_run
from imgclf.runtime import derive_seed
from imgclf.workflows import runlock
from imgclf.workflows.backends import run_jobs
from imgclf.workflows.baselines import baseline_rows, write_baselines
from imgclf.workflows.gridparams import apply_params, check_reaches_stages, flat_params, parse_params
from imgclf.workflows.settings import check_paths
from imgclf.workflows.summary import HEADLINE, open_experiment, train_job

__all__ = ["grid_search", "parse_params", "trial_configs"]  # parse_params: the CLI's way in
log = get_logger("grid")


def trial_configs(config: Config, grid: dict[str, list], out: Path) -> list[tuple[str, dict, Config]]:
    """(trial id, its parameters, its validated config) per grid point, each with a seed derived from the
    config's and the point's (unless the grid itself sets the seed)."""
    trials = []
    for i, point in enumerate(ParameterGrid(grid)):
        params = flat_params(point)
        values = config.model_dump()
        trial_id = f"trial_{i:03d}"
        try:
            apply_params(values, params)
        except ConfigError as err:
            raise ConfigError(f"{trial_id} {params}: {err}") from None
        key = json.dumps(params, sort_keys=True, default=str)
        # Trials differ in training randomness only: all of them share one split, so one val and test set.
        if values["data"]["split_seed"] is None:
            values["data"]["split_seed"] = config.train.seed
        if not any(name.rsplit(".", 1)[-1] == "seed" for name in params):  # a seed in the grid is used as given
            values["train"]["seed"] = derive_seed(config.train.seed, key)
        values["out"], values["versions"] = str(out / "trials" / trial_id), {}
        try:
            trial = build_config(values)
            check_reaches_stages(trial, params)
        except ConfigError as err:
            raise ConfigError(f"{trial_id} {params}: {err}") from None
        trials.append((trial_id, params, trial))
    _refuse_split_axes(trials)
    return trials


SPLIT_SETTINGS = ("path", "layout", "split_seed", "val_fraction", "test_fraction", "group_column")  # data.*: the split


def _refuse_split_axes(trials: list[tuple[str, dict, Config]]) -> None:
    """One split for every trial, or the leaderboard would rank trials on different validation images."""
    first_id, _, first = trials[0]
    for trial_id, _, trial in trials[1:]:
        for name in SPLIT_SETTINGS:
            if getattr(trial.data, name) != getattr(first.data, name):
                raise ConfigError(f"grid data.{name}: {first_id} has {getattr(first.data, name)!r}, {trial_id} "
                                  f"{getattr(trial.data, name)!r}; all trials share one train/val/test split, so "
                                  f"that they are ranked on the same validation images: give data.{name} once "
                                  "(imgclf cv varies the split)")


def grid_search(config: Config, grid: dict[str, list], rank_by: str | list[str] = "val_f1_macro",
                backend: str = "sequential", n_jobs: int = 1, ray_address: str | None = None) -> dict[str, Any]:
    """Run every trial, write leaderboard.csv, then evaluate the best trial on test once.

    ``rank_by`` is one validation metric or several (``"f1_macro,accuracy"``): trials are ranked by
    the first, ties broken by the next; trials tied on all keep their trial order.
    """
    out = Path(config.out or "grid")
    keys = rank_keys(rank_by)
    trials = trial_configs(config, grid, out)  # every trial's settings checked before the folder is claimed
    check_paths(config.model_copy(update={"out": str(out)}))
    open_experiment(out, "grid", grid_digest(grid), "settings (another --param or --grid)")
    folder = atomic.inner_folder(out, "trials")
    for _, _, trial in trials:  # trials/ or a trial's folder planted as a link would take its run elsewhere
        atomic.own_folder(folder / Path(trial.out).name)
    log.info("grid: %d trials over %s, backend %s, ranked by %s", len(trials), ", ".join(grid), backend,
             " then ".join(keys))
    jobs = [(c.model_dump(), False, {"params": p}) for _, p, c in trials]  # trials never read test
    results = run_jobs(train_job, jobs, backend, n_jobs, ray_address)
    ranked = rank_results(results, keys)
    rows = [{"rank": i + 1, "trial": Path(r["run"]).name, **{k: r[k] for k in keys},
             **{k: v for k, v in r.items() if k.startswith("val_") and k not in keys},
             "seconds": r["seconds"], "seed": r["seed"], **{f"param_{k}": v for k, v in r["params"].items()}}
            for i, r in enumerate(ranked)]
    atomic.write_rows(out / "leaderboard.csv", rows)

    best = open_run(ranked[0]["run"])
    _say_earlier_test_reads([Path(r["run"]) for r in ranked[1:]])
    test = _close_best(best)
    summary = {"best_trial": rows[0]["trial"], "params": ranked[0]["params"], "rank_by": keys,
               **{k: ranked[0][k] for k in keys}, "test": test}
    atomic.write_json(out / "best.json", summary)
    if config.evaluate.report:
        write_report(best.path)  # now with its test split
        write_report(out)
    runlock.release(out)
    return {"leaderboard": rows, **summary}


def grid_digest(grid: dict[str, list]) -> str:
    """The grid's settings and values, hashed: what decides its trials beside the base config."""
    return hashlib.sha256(json.dumps(grid, sort_keys=True, default=str).encode()).hexdigest()


def _say_earlier_test_reads(others: list[Path]) -> None:
    """A trial scored on test by an earlier run of this grid (the best then, no longer): test read more than once."""
    earlier = [p.name for p in others if (p / "predictions_test.csv").is_file()]
    if earlier:
        log.warning("warning: %s %s scored on test by an earlier run of this grid, when %s best; test has now "
                    "been read for %d trials, so the best trial's test score is no longer an untouched estimate",
                    ", ".join(earlier), "was" if len(earlier) == 1 else "were", "it was" if len(earlier) == 1
                    else "each was", len(earlier) + 1)


def _close_best(best: Run) -> dict | None:
    """The best trial's only test pass, then what any finished run holds beside it: its baselines on val and test
    (the linear probe too, which trials skip) and summary.md with the test row."""
    prepared = prepare(best.index(), best.preprocess, best.config.data)
    splits = [split for split in ("val", "test") if split in prepared.index.splits]
    test = best.evaluate("test", prepared=prepared) if "test" in splits else None
    write_baselines(best.path, baseline_rows(prepared, best.preprocess, best.compute, best.config, splits))
    redraw_after_scoring(best, ("test",))
    return test


def rank_keys(rank_by: str | list[str]) -> list[str]:
    """``"f1_macro,accuracy"`` (or a list) -> ``["val_f1_macro", "val_accuracy"]``: validation metrics, in order,
    each one a trial records (``HEADLINE``; ``loss`` is Keras's name for ``log_loss``), checked before any trial."""
    names = rank_by.split(",") if isinstance(rank_by, str) else list(rank_by)
    bases = [name.removeprefix("val_") for name in (n.strip() for n in names) if name]
    keys = [f"val_{'log_loss' if base == 'loss' else base}" for base in bases]
    if not keys or len(set(keys)) != len(keys):
        raise ConfigError(f"--rank-by {rank_by!r}: give validation metrics, each once, e.g. f1_macro,accuracy")
    unknown = [base for base in bases if base not in (*HEADLINE, "loss")]
    if unknown:
        raise ConfigError(f"--rank-by {unknown[0]!r} is not a metric a trial records; use one of "
                          f"{', '.join(HEADLINE)} (loss: log_loss)")
    return keys


def rank_results(results: list[dict], keys: list[str]) -> list[dict]:
    """Best first: by the first key (losses ascending, scores descending), ties by the next; missing values last."""
    unknown = [k for k in keys if k not in results[0]]
    if unknown:
        raise ConfigError(f"--rank-by {unknown[0]!r} is not a validation metric; use one of "
                          f"{', '.join(k for k in results[0] if k.startswith('val_'))}")

    def order(result: dict) -> tuple:
        return tuple(part for k in keys for part in (result[k] is None, _ascending(k, result[k])))

    return sorted(results, key=order)  # stable: trials tied on every key keep their order


def _ascending(key: str, value: float | None) -> float:
    if value is None:
        return 0.0
    return value if key.endswith("loss") else -value
