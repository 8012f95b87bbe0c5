"""The subcommands that use a trained run or a model: report, seal, explain, compare, ensemble, features,
predict, model-info, export and serve. Like ``commands``, imported only when one of them runs (``usage.lazy``)."""

from __future__ import annotations

import argparse
import fnmatch
from functools import partial
from pathlib import Path

from imgclf.cli.flags import config_from_args, format_metrics, given_settings, parse_stage
from imgclf.config import cli_flag
from imgclf.config.stages import resolve_stages
from imgclf.errors import ConfigError
from imgclf.logs import get_logger
from imgclf.models.networks import build_model, check_input_size, resolve_preprocess
from imgclf.models.summary import describe_model
from imgclf.reporting.compare import compare_runs, format_side_by_side
from imgclf.reporting.explain import explain_files
from imgclf.reporting.html import write_report
from imgclf.runs.base import check_and_seal, load_run
from imgclf.runs.files import MAX_CLASSES
from imgclf.runs.manifest import SEALED
from imgclf.serving.engine import predict_with_onnx
from imgclf.serving.export import export_run
from imgclf.serving.server import ServeOptions, serve
from imgclf.workflows.embeddings import write_features
from imgclf.workflows.ensemble import create_ensemble
from imgclf.workflows.lifecycle import RUN_ENTRIES
from imgclf.workflows.settings import warn_replaced_settings

log = get_logger("cli")


def cmd_report(args: argparse.Namespace) -> int:
    print(f"wrote {write_report(args.dir)}")
    return 0


def cmd_seal(args: argparse.Namespace) -> int:
    files = check_and_seal(args.run)
    print(f"sealed {args.run}: {len(files)} files checked and their sha256 recorded in manifest.json")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    layers = [name.strip() for name in args.layers.split(",") if name.strip()] if args.layers is not None else None
    if layers == []:
        raise ConfigError(f"--layers {args.layers!r} names no layer; give module names, e.g. --layers "
                          "features.1,features.11 (imgclf model-info RUN lists them)")
    rows = explain_files(load_run(args.run), args.inputs, Path(args.out), feature_maps=args.feature_maps,
                         layers=layers)
    for row in rows:
        print(f"{row['path']}: {row['explained_class']} ({row['probability']:.3f}) -> {row['overlay']}")
    maps = f" and feature maps of {', '.join(layers) if layers else 'the first two convolutions'}" \
        if args.feature_maps else ""
    print(f"wrote {len(rows)} Grad-CAM overlay(s) (layer {rows[0]['layer']}){maps} to {args.out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    result = compare_runs(args.runs, args.out)
    print(format_side_by_side(result["rows"]))
    for row in result["settings"]:
        print(f"setting {row['setting']} differs: " + ", ".join(f"{run} {value}" for run, value in row.items()
                                                                if run != "setting"))
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


def refuse_run_file(out: Path, run: Path) -> None:
    """--overwrite is for the user's own file, never one of the run's (it replaced a sealed config.yaml)."""
    owned = any(fnmatch.fnmatchcase(out.name, pattern) for pattern in (*RUN_ENTRIES, *SEALED))
    if owned and run.is_dir() and out.parent.resolve() == run.resolve():
        raise ConfigError(f"--out {out} is the run's own file; write to another path (e.g. predictions.csv)")


def cmd_features(args: argparse.Namespace) -> int:
    refuse_run_file(Path(args.out), Path(args.source))
    result = write_features(args.source, args.data, args.out, args.image_size, args.channels, args.pretrained,
                            args.weights, args.batch_size)
    print(f"wrote {result['images']} embeddings of dimension {result['dim']} to {result['out']}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    refuse_run_file(Path(args.out), Path(args.run))
    run = load_run(args.run)
    predict = partial(predict_with_onnx, run) if args.engine == "onnx" else run.predict
    preds = predict(args.inputs, skip_bad_images=args.skip_bad_images, batch_size=args.batch_size, tta=args.tta)
    preds.to_csv(Path(args.out))
    counts = {c: int((preds.pred == i).sum()) for i, c in enumerate(preds.classes)}
    print(f"predicted {len(preds.paths)} images: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    if getattr(run, "threshold", None) is not None:
        print(f"decided at the run's threshold: {run.classes[run.positive]} where its probability is at least "
              f"{run.threshold:.4f} ({run.threshold_rule}, chosen on val); confidence is the decided class's")
        if not run.is_own_tta(args.tta):
            log.warning("warning: --tta %s: the threshold was chosen on the run's own validation probabilities (tta "
                        "%s); these are %s-averaged", args.tta, run.config.evaluate.tta, args.tta)
    if preds.label_note:
        print(preds.label_note + (f" (accuracy {(preds.pred == preds.true).mean():.4f})" if preds.has_labels else ""))
    print(f"wrote {args.out}")
    return 0


def cmd_model_info(args: argparse.Namespace) -> int:
    """A Keras model.summary() of a model name, a config file or a run directory, under its freeze policies."""
    source = Path(args.source) if args.source else None
    if source is not None and source.is_dir():
        given = sorted(k.split("__")[-1] for k in vars(args) if k.startswith("cfg__")) + ["stage"] * bool(args.stages)
        given += ["classes"] * (args.classes is not None)
        if given or args.config:
            raise ConfigError(f"model-info {source}: a run directory is shown as it was trained; drop "
                              f"{', '.join(given) or 'config'} (or pass its config.yaml to change settings)")
        run = load_run(source)
        config, model, pre = run.config, run.model.float().cpu(), run.preprocess  # an ensemble says it has none
    else:
        refuse_unused_model_info_settings(args, source)
        if source is not None and source.suffix in (".yaml", ".yml"):
            args.config = str(source)
        elif source is not None:
            args.cfg__model__name = args.source
        args.classes = 2 if args.classes is None else args.classes
        if not 1 <= args.classes <= MAX_CLASSES:
            raise ConfigError(f"--classes {args.classes}: give 1 to {MAX_CLASSES:,} (the final layer's outputs)")
        config = config_from_args(args)
        data = config.data
        pre = resolve_preprocess(config.model, data.image_size, data.channels, data.interpolation)
        check_input_size(config.model, pre)
        model = build_model(config.model, args.classes, pre)
        warn_replaced_settings(config)  # --freeze under the default transfer recipe, as train says it
    stages = [(name, cfg.freeze, cfg.freeze_bn) for name, cfg in resolve_stages(config)]
    kind = config.model.head
    answer = f"{model.head.fc.out_features} output(s)" if kind == "linear" else (
        f"a scikit-learn {kind} classifier fitted on these features (the final linear layer 'fc' below is unused)")
    print(f"{config.model.name}: input {pre.channels}x{pre.size}x{pre.size}, mean {pre.mean} std {pre.std}; head "
          f"{', '.join(config.model.head_layers or [])} -> {answer}; freeze patterns match the names below without "
          "'backbone.'\n")
    print(describe_model(model, (pre.channels, pre.size, pre.size), stages, args.depth))
    return 0


# What model-info draws from: the model, the input it takes, and the stages' freezing
MODEL_INFO_SETTINGS = ("data.image_size", "data.channels", "data.interpolation", "train.freeze", "train.freeze_bn")
STAGE_SHAPES = {"name", "freeze", "freeze_bn"}


def refuse_unused_model_info_settings(args: argparse.Namespace, source: Path | None) -> None:
    """model-info shows a model: a setting that cannot change it is refused, as is a model or config given twice."""
    given = given_settings(args)
    if source is not None and source.suffix in (".yaml", ".yml") and args.config:
        raise ConfigError(f"model-info {source} --config {args.config}: give the config once")
    if source is not None and source.suffix not in (".yaml", ".yml") and "model.name" in given:
        raise ConfigError(f"model-info {source} --model {args.cfg__model__name}: give the model once")
    unused = sorted(name for name in given if not name.startswith("model.") and name not in MODEL_INFO_SETTINGS)
    unused += ["model.weights_map"] if "model.weights_map" in given and "model.weights" not in given else []
    stage_keys = sorted({key for text in args.stages or [] for key in parse_stage(text)} - STAGE_SHAPES)
    if stage_keys:
        raise ConfigError(f"model-info shows the model, which --stage {', '.join(stage_keys)} would not change; "
                          "give each stage's name, freeze and freeze_bn only")
    if unused:
        flags = ", ".join(cli_flag(*name.split(".")) if "." in name else cli_flag(None, name) for name in unused)
        raise ConfigError(f"model-info shows the model, which {flags} would not change; drop "
                          f"{'them' if len(unused) > 1 else 'it'}")


def cmd_export(args: argparse.Namespace) -> int:
    run = load_run(args.run)
    record = export_run(run, args.opset, args.data)
    parity = record["parity"]
    print(f"parity on {parity['images']} images ({parity['run_images']} from {parity['split']}, "
          f"{parity['random_images']} random): max |Δprobability| {parity['max_abs_diff_probability']:.1e}, "
          f"top-1 agreement {parity['top1_agreement']:.0%}, batch 1 vs 8 {parity['max_abs_diff_batch1_vs_batch8']:.1e}")
    print(f"wrote {run.path / 'export' / 'model.onnx'} (opset {record['opset']}) and export.json")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    options = ServeOptions(args.host, args.port, args.token, args.engine, args.max_batch, args.max_upload_mb,
                           args.max_pixels)
    options.check()
    serve(load_run(args.run), options)
    return 0
