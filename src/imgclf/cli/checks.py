"""The checks a command makes before it loads torch, timm or scikit-learn (``usage.lazy`` runs them
first): a refused setting, or an --out that holds the user's files, answers in a fraction of a second."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from imgclf.cli.flags import config_from_args, refuse_existing_file, refuse_filled_folder, refuse_settings_with_resume
from imgclf.config.stages import SYNC_BN_NEEDS_CUDA, per_rank_batch, resolve_stages
from imgclf.errors import ConfigError, PeerError
from imgclf.logs import is_main_process
from imgclf.workflows.candidates import is_default_request
from imgclf.workflows.demo import PARTIAL_PREFIX

DEMO_LAYOUT = ("digits", "runs", PARTIAL_PREFIX + "digits")  # what `imgclf demo` writes into its --out


def check_train(args: argparse.Namespace) -> None:
    """``train``'s settings: sets ``args.train_config`` (None with --resume, which keeps the run's own) and
    ``args.default`` (no model setting given: the default tries its candidates)."""
    if args.resume:
        refuse_settings_with_resume(args)
    else:
        _take_data_dir(args)
    config = None if args.resume else config_from_args(args)
    default = config is not None and is_default_request(config)
    if args.budget is not None and not default:
        raise ConfigError("--budget applies only when no model setting is given (the default tries its candidates); "
                          "drop --budget, or drop the model settings and --config")
    if default and _several_processes(args):
        raise ConfigError("the default (no --model) tries its candidates on one process; pass --model "
                          "(e.g. --model tf_efficientnet_lite0 --pretrained) to train on several")
    if config is not None:
        _check_batches(config, _world_size(args))
    args.train_config, args.default = config, default


def _check_batches(config, world_size: int) -> None:
    """Every stage's global --batch-size must split evenly over the processes, and --sync-bn needs CUDA
    where --device says cpu: rank 0 says so, the other ranks stop without repeating it (as
    ``training.ddp.check_world`` does after torch has loaded, for --device auto too)."""
    try:
        for _, stage in resolve_stages(config):
            per_rank_batch(stage.batch_size, world_size)
        if config.train.sync_bn and world_size > 1 and config.train.device == "cpu":
            raise ConfigError(SYNC_BN_NEEDS_CUDA)
    except ConfigError as err:
        raise err if is_main_process() else PeerError(str(err)) from None


def _world_size(args: argparse.Namespace) -> int:
    """The processes the training will run on: torchrun's WORLD_SIZE, else --nproc, else 1 (a value that
    is not a count is left to the launcher and DistContext to name)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE") or args.nproc or 1))
    except ValueError:
        return 1


def check_experiment(args: argparse.Namespace) -> None:
    """``cv``'s and ``grid``'s settings: sets ``args.experiment_config`` (--out defaults to cv/ or grid/)."""
    unit = "fold" if args.command == "cv" else "trial"
    if args.jobs > 1 and args.backend == "sequential":
        raise ConfigError(f"--jobs {args.jobs}: the sequential backend trains one {unit} at a time; add --backend "
                          "processes (or ray), or drop --jobs")
    if args.ray_address and args.backend != "ray":
        raise ConfigError(f"--ray-address is for --backend ray (this is --backend {args.backend}); add it, or drop "
                          "--ray-address")
    _take_data_dir(args)
    config = config_from_args(args)
    args.experiment_config = config if config.out else config.model_copy(update={"out": args.command})


def _take_data_dir(args: argparse.Namespace) -> None:
    """DATA is ``--data``; both, naming different datasets, are refused rather than one dropped."""
    given = getattr(args, "cfg__data__path", None)
    if args.data_dir and given is not None and os.path.realpath(given) != os.path.realpath(args.data_dir):
        raise ConfigError(f"DATA {args.data_dir} and --data {given}: give the dataset once")
    if args.data_dir:
        args.cfg__data__path = args.data_dir


def _several_processes(args: argparse.Namespace) -> bool:
    """Whether train runs on several processes; a wrong --nproc is left to ``launch`` to name."""
    if "WORLD_SIZE" in os.environ:
        return args.nproc is None  # under torchrun; with --nproc as well, launch says to drop it
    return args.nproc is not None and args.nproc > 1


def refuse_to_overwrite(args: argparse.Namespace) -> None:
    """What is at a command's --out (audit's --json) is the user's: replaced only with --overwrite."""
    if args.command == "audit" and args.json:
        refuse_existing_file(args.json, "--json", args.overwrite)
    elif args.command == "audit" and args.overwrite:
        raise ConfigError("--overwrite replaces an existing --json file; audit writes no file without --json")
    elif args.command in ("predict", "features"):
        refuse_existing_file(args.out, "--out", args.overwrite)
    elif args.command in ("explain", "compare"):
        refuse_filled_folder(args.out, "--out", args.overwrite)
    elif args.command == "demo":
        refuse_filled_folder(Path(args.out), "--out", args.overwrite, allowed=DEMO_LAYOUT)
