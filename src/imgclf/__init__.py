"""imgclf: from a folder of images to a trained, evaluated and explained image classifier.

Python API (mirrors the CLI)::

    import imgclf
    config = imgclf.build_config({"data": {"path": "DATA"}, "train": {"epochs": 10}, "out": "runs/x"})
    run = imgclf.train(config)          # -> Run
    run.evaluate("test")                # metrics dict, from predictions_test.csv
    run.predict(["new_images/"])        # Predictions
    run = imgclf.load_run("runs/x")
    imgclf.cross_validate(config, folds=10)   # -> {"folds", "summary", "oof"}
    imgclf.grid_search(config, {"lr": [1e-3, 1e-4]})
"""

from importlib import import_module
from typing import TYPE_CHECKING

# Names resolve lazily (PEP 562): `imgclf --help` and config errors answer without importing torch.
_EXPORTS = {"train": "workflows.train", "Config": "config", "build_config": "config", "load_config": "config",
            "ImgclfError": "errors", "Predictions": "evaluation.predictions", "Run": "runs", "load_run": "runs",
            "cross_validate": "workflows.cv", "grid_search": "workflows.grid"}

if TYPE_CHECKING:
    from imgclf.config import Config, build_config, load_config
    from imgclf.errors import ImgclfError
    from imgclf.evaluation.predictions import Predictions
    from imgclf.runs import Run, load_run
    from imgclf.workflows.cv import cross_validate
    from imgclf.workflows.grid import grid_search
    from imgclf.workflows.train import train


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'imgclf' has no attribute {name!r}")


__all__ = ["Config", "ImgclfError", "Predictions", "Run", "build_config", "cross_validate", "grid_search",
           "load_config", "load_run", "train"]
__version__ = "0.1.0"
