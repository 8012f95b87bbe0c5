"""The command line's grammar: one sub-parser per command, every config field a flag; ``main`` dispatches."""

from __future__ import annotations

import argparse
import ast
import errno
import logging
import os
import re
import sys
from collections.abc import Callable

from imgclf.cli import checks
from imgclf.cli import flags as cliflags
from imgclf.cli.flags import add_config_flags
from imgclf.cli.serving import add_serving_parsers
from imgclf.cli.usage import CommandParser, lazy, parse, seconds, whole_number
from imgclf.config.defaults import DEFAULT_BUDGET_S, DEFAULT_DIST_TIMEOUT_S, DIST_BACKENDS, MAX_DIST_TIMEOUT_S
from imgclf.errors import ConfigError, ImgclfError, PeerError
from imgclf.logs import setup_logging
from imgclf.versions import version

RANKED_COMMANDS = ("train", "evaluate")  # the commands torchrun may start on several processes
MAX_BATCH = 65_536  # images in one batch for predict and features (a run's own is at most its training images)
MAX_JOBS = 1024
MAX_IMAGE_SIZE = 4096  # as data.image_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imgclf", description="Train, evaluate and use image classifiers.",
                                     allow_abbrev=False)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"imgclf {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    p = sub.add_parser("train", help="train a classifier on a folder or CSV of images")
    p.add_argument("data_dir", nargs="?", help="dataset folder or CSV (or set data.path in --config)")
    p.add_argument("--resume", metavar="RUN", help="continue a killed run from its last completed epoch")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train on N local processes: starts this command through torchrun "
                        "(torch.distributed.run --standalone --nproc-per-node N)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help="with no --model: the time the default may spend trying its candidates (linear probe, "
                        f"small CNN, fine-tuned EfficientNet-Lite0) before keeping the best (default: "
                        f"{DEFAULT_BUDGET_S:g})")
    add_dist_flags(p)
    add_config_flags(p)
    p.set_defaults(func=lazy("commands", "cmd_train", checks.check_train))

    for name, helptext in (("cv", "k-fold cross-validation; every fold is a run"),
                           ("grid", "grid search ranked on validation; test read once, for the best")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("data_dir", nargs="?", help="dataset folder (Fold0..FoldK, split or class folders) or CSV")
        add_config_flags(p)
        p.add_argument("--backend", default="sequential", choices=["sequential", "processes", "ray"],
                       help="where folds/trials run")
        p.add_argument("--jobs", type=whole_number(1, MAX_JOBS), default=1,
                       help="folds/trials at once (processes, ray)")
        p.add_argument("--ray-address", help="existing Ray cluster address (default: start a local one)")
        if name == "cv":
            p.add_argument("--folds", type=whole_number(2, 1000),
                           help="k for stratified k-fold (default 5; Fold0..FoldK folders make their own)")
            p.add_argument("--from-grid", action="append", metavar="[STAGE=]GRID_DIR",
                           help="cross-validate a grid's winning settings (its best.json); STAGE= puts its train "
                                "settings into that stage of the config (repeat for a chain: model1=DIR1 ...)")
            p.set_defaults(func=lazy("commands", "cmd_cv", checks.check_experiment))
        else:
            p.add_argument("--param", action="append", metavar="NAME=V1,V2",
                           help="a setting to vary (repeat); lists as [a,b];[c], a stage's field as stages.N.FIELD")
            p.add_argument("--grid", help="YAML mapping of settings to lists of values")
            p.add_argument("--rank-by", default="val_f1_macro", metavar="METRIC[,METRIC...]",
                           help="validation metric that ranks trials; more, comma-separated, break ties in order "
                                "(f1_macro,accuracy: by F1, then accuracy); the val_ prefix is optional")
            p.set_defaults(func=lazy("commands", "cmd_grid", checks.check_experiment))

    p = sub.add_parser("audit", help="class counts, image stats, unreadable files, duplicates and leakage")
    p.add_argument("data_dir", help="dataset folder or CSV")
    p.add_argument("--layout", default="auto", choices=["auto", "folds", "split_folders", "class_folders", "csv"],
                   help="dataset layout (folds: Fold0..FoldK folders, as cv reads them)")
    p.add_argument("--json", help="also write the report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--strict", action="store_true", help="exit 1 on unreadable files or leakage across splits")
    p.add_argument("--no-near", action="store_true", help="skip near-duplicate (perceptual hash) search")
    p.set_defaults(func=lazy("audit", "cmd_audit", checks.refuse_to_overwrite))

    p = sub.add_parser("cache", help="list the decode cache's entries, or remove them (--prune, --clear)")
    p.add_argument("--dir", help="the cache folder (default: IMGCLF_CACHE_DIR, else ~/.cache/imgclf)")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--prune", action="store_true",
                        help="remove the least recently used entries until the cache holds at most --max-gb")
    action.add_argument("--clear", action="store_true", help="remove every entry (a run rebuilds what it needs)")
    p.add_argument("--max-gb", type=float, metavar="GB",
                   help="with --prune: the size to keep the cache within (default: IMGCLF_CACHE_MAX_GB, else 20)")
    p.set_defaults(func=lazy("cache", "cmd_cache"))

    p = sub.add_parser("evaluate", help="evaluate a run on one of its splits")
    p.add_argument("run", help="run directory written by train")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate")
    p.add_argument("--data", help="dataset folder, if it moved since training")
    p.add_argument("--tta", choices=["none", "flip", "flip_shift"], help="test-time augmentation (default: the run's)")
    p.add_argument("--threshold", metavar="RULE",
                   help="re-choose the binary threshold on val: argmax, max_f1, youden, sensitivity:0.95")
    add_dist_flags(p)
    p.set_defaults(func=lazy("commands", "cmd_evaluate"))

    p = sub.add_parser("report", help="write report.html for a run, cv or grid directory")
    p.add_argument("dir", help="run, cv or grid directory")
    p.set_defaults(func=lazy("runtools", "cmd_report"))

    p = sub.add_parser("seal", help="after editing a run's files on purpose: check them, then record their hashes")
    p.add_argument("run", help="run or ensemble directory")
    p.set_defaults(func=lazy("runtools", "cmd_seal"))

    p = sub.add_parser("explain", help="Grad-CAM overlays (and feature maps) for images")
    p.add_argument("run", help="run directory written by train")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    p.add_argument("--out", default="explain", help="folder for the PNGs")
    p.add_argument("--feature-maps", action="store_true",
                   help="also draw feature maps: of --layers, else of the first two convolutions")
    p.add_argument("--layers", metavar="NAMES",
                   help="with --feature-maps: comma-separated layer names as model-info lists them, or Keras VGG "
                        "names (block1_conv1,block3_conv1)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.set_defaults(func=lazy("runtools", "cmd_explain", checks.refuse_to_overwrite))

    p = sub.add_parser("predict", help="predict image files, folders, globs or a CSV with a run")
    p.add_argument("run", help="run directory written by train")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively), glob patterns, or a "
                                             "dataset CSV (path,label: its labels give an accuracy)")
    p.add_argument("--out", default="predictions.csv", help="CSV to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=whole_number(1, MAX_BATCH),
                   help="images per batch (default: the run's, at most its training images)")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images instead of failing")
    p.add_argument("--tta", choices=["none", "flip", "flip_shift"], help="test-time augmentation (default: the run's)")
    p.add_argument("--engine", default="torch", choices=["torch", "onnx"],
                   help="torch: the run's model; onnx: RUN/export/model.onnx (imgclf export) via onnxruntime")
    p.set_defaults(func=lazy("runtools", "cmd_predict", checks.refuse_to_overwrite))

    p = sub.add_parser("compare", help="runs side by side: metrics, parameters, training time, overlaid curves")
    p.add_argument("runs", nargs="+", help="run directories (two or more)")
    p.add_argument("--out", required=True, help="folder for compare.html, compare.csv and curves_<metric>.png")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that already holds files")
    p.set_defaults(func=lazy("runtools", "cmd_compare", checks.refuse_to_overwrite))

    p = sub.add_parser("ensemble", help="combine runs that share classes and split into an ensemble run")
    p.add_argument("runs", nargs="+", help="run directories (two or more)")
    p.add_argument("--out", required=True, help="ensemble run directory to write")
    p.add_argument("--method", default="soft", choices=["soft", "weighted", "majority"],
                   help="soft: mean probabilities; weighted: weights fitted on val; majority: votes")
    p.set_defaults(func=lazy("runtools", "cmd_ensemble"))

    p = sub.add_parser("features", help="penultimate-layer embeddings of a dataset's images, as .npz")
    p.add_argument("source", help="run directory, or a backbone name (with --pretrained or --weights)")
    p.add_argument("data", nargs="?", help="dataset folder or CSV (default: the run's own dataset)")
    p.add_argument("--out", required=True, help=".npz file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--pretrained", action="store_true", help="backbone name: ImageNet weights")
    p.add_argument("--weights", help="backbone name: a local state dict")
    p.add_argument("--image-size", type=whole_number(1, MAX_IMAGE_SIZE),
                   help="backbone name: input size (default: the model's)")
    p.add_argument("--channels", type=int, choices=[1, 3], help="backbone name: input channels (default 3)")
    p.add_argument("--batch-size", type=whole_number(1, MAX_BATCH), default=64, help="images per batch")
    p.set_defaults(func=lazy("runtools", "cmd_features", checks.refuse_to_overwrite))

    p = sub.add_parser("model-info", help="a Keras-style summary: layers, output shapes, parameters (trainable, "
                                          "frozen), and each layer's name for freeze patterns")
    p.add_argument("source", nargs="?", help="a model name (simple_cnn, a timm name), a config file or a run directory")
    p.add_argument("--classes", type=int, help="classes of the final layer (default 2; a run knows its own)")
    p.add_argument("--depth", type=whole_number(1, 64), default=3,
                   help="module depth of the table (backbone.features.0 is 3)")
    add_config_flags(p)
    p.set_defaults(func=lazy("runtools", "cmd_model_info"))

    p = sub.add_parser("demo", help="train on scikit-learn's digits (no download) and report test accuracy")
    p.add_argument("--out", default="imgclf-demo", help="folder for the demo data and runs (reused by later demos)")
    p.add_argument("--overwrite", action="store_true", help="write into an --out folder that holds other files")
    p.add_argument("--epochs", type=whole_number(1, 10_000), help="maximum epochs (default 30; 4 with --transfer)")
    p.add_argument("--transfer", action="store_true",
                   help="fine-tune ImageNet EfficientNet-Lite0 instead (its weights come with imgclf; about 2 min)")
    p.set_defaults(func=lazy("commands", "cmd_demo", checks.refuse_to_overwrite))
    add_serving_parsers(sub)
    return parser


def add_dist_flags(parser: argparse.ArgumentParser) -> None:
    """How ranks started by torchrun (or --nproc) join; ignored by one process."""
    parser.add_argument("--dist-backend", default="auto", choices=list(DIST_BACKENDS),
                        help="under torchrun: how the processes talk; auto is nccl on CUDA GPUs, gloo on the CPU")
    parser.add_argument("--dist-timeout", type=seconds(1, MAX_DIST_TIMEOUT_S), default=DEFAULT_DIST_TIMEOUT_S,
                        metavar="SECONDS",
                        help="under torchrun: how long a process waits for the others to join (and for any one "
                             "exchange) before it ends with an error")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(build_parser(), argv)
    args.argv = argv  # `train --nproc N` starts the same command line on N processes
    setup_logging(args.verbose)
    if not _rank_zero():  # rank 0 alone logs; the others say only their own errors
        logging.getLogger("imgclf").setLevel(logging.ERROR)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        if args.command not in RANKED_COMMANDS:
            _one_process(args.command)
        return handler(args)
    except PeerError:  # another rank's error; that rank says it
        return 2
    except ImgclfError as err:
        print(f"imgclf: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgclf: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"imgclf: error: {OUT_OF_MEMORY}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # under torchrun: another rank died or hung; torchrun ends the job and says which
        if (loop := LINK_LOOP.match(str(err))) is not None:  # pathlib's resolve() up to Python 3.12: a repr
            print(f"imgclf: error: {ast.literal_eval(loop[1])}: {LINK_LOOP_FIX}", file=sys.stderr)
            return 2
        if out_of_memory(err):
            print(f"imgclf: error: {OUT_OF_MEMORY} ({' '.join(str(err).split())[:160]})", file=sys.stderr)
            return 2
        ddp = sys.modules.get("imgclf.training.ddp")  # not loaded: no collective ran, so no peer was lost
        if ddp is None or not ddp.lost_peer(err):
            raise
        print(f"imgclf: rank {os.environ.get('RANK')} stopped: it lost contact with another rank "
              f"({' '.join(str(err).split())[:160]})", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `imgclf model-info X | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    except OSError as err:  # only a full, read-only or forbidden disk is the user's; anything else is a bug
        line = cliflags.disk_error_line(err, getattr(args, "out", None) or getattr(args, "cfg____out", None))
        if err.errno == errno.ELOOP:
            line = f"{err.filename or 'a path'}: {LINK_LOOP_FIX}"
        if line is None:
            raise
        print(f"imgclf: error: {line}", file=sys.stderr)
        return 2


LINK_LOOP = re.compile(r"Symlink loop from ('.*'|\".*\")$", re.DOTALL)
LINK_LOOP_FIX = "symbolic links that lead back to themselves (a loop); point the link at a real file or folder"
OUT_OF_MEMORY = "out of memory; lower --batch-size (or --image-size), or run it where there is more memory"


def out_of_memory(err: RuntimeError) -> bool:
    """torch's allocation failures: CUDA's OutOfMemoryError, the CPU allocator's RuntimeError (Linux, macOS:
    "can't allocate memory"; Windows: "not enough memory"), MPS's and CUDA's "out of memory"."""
    text = str(err).lower()
    return type(err).__name__ == "OutOfMemoryError" or any(
        words in text for words in ("can't allocate memory", "not enough memory", "out of memory"))


def _rank_zero() -> bool:
    return os.environ.get("RANK", "0").strip() in ("", "0")


def _one_process(command: str) -> None:
    """Commands other than train and evaluate would repeat their work and writes on every rank."""
    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "1"):
        return
    message = (f"{command} runs on one process; start it without torchrun (only "
               f"{' and '.join(RANKED_COMMANDS)} run on several)")
    raise ConfigError(message) if _rank_zero() else PeerError(message)
