"""How the command line talks to a person: no abbreviated flags, an example under every command's
help, and a misspelt flag answered with the nearest real one and that command's own usage."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable
from importlib import import_module

# One line each, shown under `imgclf COMMAND --help`.
EXAMPLES = {
    "train": "imgclf train data/ --model resnet18 --pretrained --epochs 20 --out runs/x",
    "cv": "imgclf cv data/ --folds 10 --epochs 20 --out cv/x",
    "grid": "imgclf grid data/ --param optimizer=adam,sgd --param lr=1e-3,1e-4 --out grid/x",
    "audit": "imgclf audit data/ --strict --json audit.json",
    "cache": "imgclf cache --prune --max-gb 5",
    "evaluate": "imgclf evaluate runs/x --split test --threshold youden",
    "report": "imgclf report runs/x",
    "seal": "imgclf seal runs/x",
    "explain": "imgclf explain runs/x some_images/ --out why/ --feature-maps",
    "predict": "imgclf predict runs/x new_images/ --out predictions.csv",
    "ensemble": "imgclf ensemble runs/a runs/b runs/c --method weighted --out runs/ens",
    "features": "imgclf features runs/x --out features.npz",
    "model-info": "imgclf model-info resnet18 --image-size 224",
    "demo": "imgclf demo",
    "export": "imgclf export runs/x",
    "serve": "imgclf serve runs/x --port 8000",
    "compare": "imgclf compare runs/a runs/b --out compare/",
}


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer from ``low`` to ``high``; anything else is the parser's one-line error
    (0 is not quietly read as "the default", a negative or a huge number does not reach a loader)."""

    def parse_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give {low:,} to {high:,}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value:,} is out of range; give {low:,} to {high:,}")
        return value

    return parse_number


def seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type``: a number of seconds from ``low`` to ``high`` (nan and inf are refused)."""

    def parse_seconds(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not low <= value <= high:  # also false for nan
            raise argparse.ArgumentTypeError(f"{value:g} is out of range; give {low:g} to {high:g} seconds")
        return value

    return parse_seconds


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: exact flags only, and its example line under --help."""

    def __init__(self, *args, **kwargs):
        name = str(kwargs.get("prog", "")).rsplit(" ", 1)[-1]
        if name in EXAMPLES and "epilog" not in kwargs:
            kwargs["epilog"] = f"example: {EXAMPLES[name]}"
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse; an unknown flag is reported by its own subcommand, with the nearest real flag if one is close."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = parser._subparsers._group_actions[0].choices[args.command]  # type: ignore[union-attr]
        word = unknown[0].split("=", 1)[0]
        flags = [option for action in command._actions for option in action.option_strings]
        close = difflib.get_close_matches(word, flags, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else f"; see imgclf {args.command} --help"
        command.error(f"unrecognized argument {unknown[0]!r}{hint}")
    return args


def lazy(module: str, name: str, check: Callable[[argparse.Namespace], None] | None = None
         ) -> Callable[[argparse.Namespace], int]:
    """The command function ``imgclf.cli.<module>.<name>``, imported when the command runs, after ``check``
    (see ``checks``): building the parser loads none of torch, timm or scikit-learn, so ``--help``, a
    refused setting and an --out that would replace the user's files answer in a fraction of a second."""

    def run(args: argparse.Namespace) -> int:
        if check is not None:
            check(args)
        return getattr(import_module(f"imgclf.cli.{module}"), name)(args)

    return run
