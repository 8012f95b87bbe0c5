"""``imgclf cv``: k-fold cross-validation where every fold is a full run directory.

Fold sources: predefined ``DATA/Fold0..FoldK/{train,valid|val,test}/<class>`` folders;
stratified k-fold over a folder pool or CSV (``--folds K``, seeded); or stratified group
k-fold when a CSV has a group column (e.g. patient id), so one patient never sits in two folds.
Outputs: ``fold_<i>/`` runs, ``folds.csv``, ``summary.csv`` (describe() + 95% CI of the mean),
``plots/folds.png`` and pooled out-of-fold predictions with their own metrics.
``with_grid_winners`` takes the settings to cross-validate from grids' ``best.json`` (``--from-grid``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imgclf import atomic
from imgclf.config import Config, StageConfig, build_config
from imgclf.data.audit import crosses_splits, exact_duplicates
from imgclf.errors import ConfigError, DataError
from imgclf.evaluation.metrics import save_and_score
from imgclf.evaluation.predictions import Predictions
from imgclf.logs import get_logger
from imgclf.reporting.html import write_report
from imgclf.reporting.plots import plot_folds
from imgclf.runs.files import read_dataset, read_grid_best
from imgclf.runtime import derive_seed
from imgclf.workflows import runlock
from imgclf.workflows.backends import run_jobs
from imgclf.workflows.folds import FoldPlan, plan_folds, write_fold_csvs
from imgclf.workflows.gridparams import apply_params, check_reaches_stages, setting
from imgclf.workflows.settings import check_paths
from imgclf.workflows.summary import describe, open_experiment, train_job

log = get_logger("cv")


def fold_configs(config: Config, out: Path, plan: FoldPlan) -> list[Config]:
    """One config per fold of ``plan`` (``plan_folds``): its data, its derived seed and its run directory."""
    base = config.model_dump()
    sources = [str(p) for p in plan.predefined] or write_fold_csvs(plan, out)
    configs = []
    for i, source in enumerate(sources):
        values = {**base, "out": str(out / f"fold_{i}"), "versions": {}}
        values["data"] = {**base["data"], "path": source, "path_as_typed": source, "layout": "auto"}
        values["train"] = {**base["train"], "seed": derive_seed(config.train.seed, f"fold{i}")}
        configs.append(build_config(values))
    return configs


def cross_validate(config: Config, folds: int | None = None, group_column: str | None = None,
                   backend: str = "sequential", n_jobs: int = 1, ray_address: str | None = None) -> dict:
    """Run every fold, then write folds.csv, summary.csv, the fold plot and pooled out-of-fold metrics."""
    out = Path(config.out or "cv")
    check_paths(config.model_copy(update={"out": str(out)}))  # before any file is written
    config = _with_group_column(config, group_column)
    plan = plan_folds(config, folds)  # every refusal before the folder is claimed
    open_experiment(out, "cv", plan.digest(), "folds (another --folds, --group-column, data or split seed)")
    configs = fold_configs(config, out, plan)
    for fold in configs:  # a fold_<i> planted as a link would take a fold's run elsewhere
        atomic.own_folder(Path(fold.out))
    log.info("cross-validation: %d folds, backend %s", len(configs), backend)
    results = run_jobs(train_job, [(c.model_dump(), True) for c in configs], backend, n_jobs, ray_address)
    rows = [{"fold": i, **r} for i, r in enumerate(results)]
    atomic.write_rows(out / "folds.csv", rows)
    metric_names = [k for k in rows[0] if k.startswith(("val_", "test_"))]
    summary = describe(rows, [*metric_names, "seconds"])  # seconds: each fold's training time
    atomic.write_rows(out / "summary.csv", summary)
    oof = pooled_predictions([Path(r["run"]) for r in results])
    if oof.decided is not None:
        log.info("pooled out-of-fold decisions: each fold's, at the threshold it chose on its own validation "
                 "(--threshold %s)", config.evaluate.threshold)
    _, oof_metrics = save_and_score(oof, out / "predictions_oof.csv", config.data.positive_class)
    atomic.write_json(out / "metrics_oof.json", oof_metrics)

    plot_folds(rows, atomic.inner_folder(out, "plots") / "folds.png")
    if config.evaluate.report:
        write_report(out)
    runlock.release(out)
    return {"folds": rows, "summary": summary, "oof": oof_metrics}


def _with_group_column(config: Config, group_column: str | None) -> Config:
    """``group_column`` (the API's argument) as the config's ``data.group_column``, which each fold's run reads."""
    if group_column is None or group_column == config.data.group_column:
        return config
    if config.data.group_column is not None:
        raise ConfigError(f"group_column {group_column!r} and the config's data.group_column "
                          f"{config.data.group_column!r}: give it once")
    return config.model_copy(update={"data": config.data.model_copy(update={"group_column": group_column})})


def pooled_predictions(runs: list[Path]) -> Predictions:
    """Every fold's test predictions together: each image once, predicted by the model that never saw it."""
    parts = [Predictions.from_csv(run / "predictions_test.csv") for run in runs]
    classes = parts[0].classes
    if any(p.classes != classes for p in parts):
        raise DataError("folds have different classes; every fold's train split must hold every class")
    thresholded = any(part.decided is not None for part in parts)  # each fold decided at its own threshold
    paths = [str(Path(read_dataset(run / "dataset.json").root) / p) for run, part in zip(runs, parts, strict=True)
             for p in part.paths]  # a fold folder's paths are its own (test/cat/1.png): where each image is
    folds = [run.name for run, part in zip(runs, parts, strict=True) for _ in part.paths]
    twice = [group for group in exact_duplicates([Path(p) for p in paths], folds) if crosses_splits(group)]
    if twice:  # one image (or a copy of it) in two fold folders' test: "each image once" would not hold
        log.warning("warning: %d image(s) were tested by more than one fold (byte-identical files, e.g. %s): the "
                    "pooled out-of-fold metrics count each once per fold; imgclf audit lists them", len(twice),
                    " = ".join(f"{fold}:{path}" for fold, path in twice[0]))
    return Predictions(paths, classes,
                       np.concatenate([p.true for p in parts]), np.concatenate([p.probs for p in parts]),
                       np.concatenate([part.pred for part in parts]) if thresholded else None)


def with_grid_winners(config: Config, sources: list[str], given: frozenset[str] = frozenset()) -> Config:
    """``config`` with each grid's winning settings (``GRID_DIR/best.json``'s params) applied.

    ``STAGE=GRID_DIR`` puts that grid's train settings into the stage ``STAGE`` (a name or a position),
    as a stage chain's CV needs (model 1's grid -> stage model1); settings a stage cannot hold apply
    to the whole config. A setting two grids set differently is an error, and so is anything best.json holds that is
    not a valid setting: the file is read through the validated reader, then every value is validated.
    A setting in ``given`` (``train.lr``: set on the command line) is kept, and the log says so.
    """
    values = config.model_dump()
    chosen: dict[str, tuple[Any, Path]] = {}
    for source in sources:
        stage, path = _grid_source(source)
        _check_stage(config, stage, source)
        best = read_grid_best(path)
        params = {_winner_key(key, stage, path): value for key, value in best["params"].items()}
        kept = [key for key in params if setting(key).given_in(given)]
        if kept:
            log.info("--from-grid %s: %s not applied: given on the command line", source,
                     ", ".join(f"{key}={params.pop(key)}" for key in kept))
        for key, value in params.items():
            if key in chosen and chosen[key][0] != value:
                raise ConfigError(f"--from-grid: {key} is {chosen[key][0]!r} in {chosen[key][1]} but {value!r} in "
                                  f"{path}; cross-validate one of them (give that grid alone, or pass the value)")
            chosen[key] = (value, path)
        try:
            apply_params(values, params)
            merged = build_config(values)
            check_reaches_stages(merged, {k: v for k, v in params.items() if not k.startswith("stages.")})
        except ConfigError as err:
            raise ConfigError(f"--from-grid {source}: {path}'s params {params}: {err}") from None
        log.info("from %s (%s): %s", path, best["best_trial"], ", ".join(f"{k}={v}" for k, v in params.items()))
    return build_config(values)


def _grid_source(source: str) -> tuple[str | None, Path]:
    """``[STAGE=]GRID_DIR`` -> (the stage or None, the grid's best.json)."""
    stage, sep, rest = source.partition("=")
    staged = bool(sep and rest and not Path(source).expanduser().exists())
    best = Path(rest if staged else source).expanduser() / "best.json"
    if not (best.exists() or best.is_symlink()):
        raise ConfigError(f"--from-grid {source}: {best.parent} holds no best.json; give the --out folder of a "
                          "finished imgclf grid")
    return (stage.strip() if staged else None), best


def _check_stage(config: Config, stage: str | None, source: str) -> None:
    names = [s.name for s in config.stages]
    if stage is None or stage in names or (stage.isdigit() and int(stage) < len(names)):
        return
    listed = ", ".join(f"{i} {n}" for i, n in enumerate(names)) or "none"
    raise ConfigError(f"--from-grid {source}: no such stage {stage!r}; the config's stages are: {listed} (give "
                      "them in the config, stages:, or with --stage)")


def _winner_key(key: str, stage: str | None, path: Path) -> str:
    """Where a grid's setting lands in the CV's config: as varied, or as a field of ``stage``."""
    try:
        target = setting(key)
    except ConfigError as err:
        raise ConfigError(f"{path}: params: {err}; run the grid again") from None
    if stage is None or target.section not in ("train", "stages"):
        return key
    if target.section == "stages":
        raise ConfigError(f"{path}: its grid varied {target.describe()}, a stage of its own config; give "
                          f"--from-grid {path.parent} without {stage}=")
    # a train setting that stages cannot override (seed, class_weight ...) is the whole chain's
    return f"stages.{stage}.{target.name}" if target.name in StageConfig.model_fields else key
