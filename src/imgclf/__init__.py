"""imgclf: from a folder of images to a trained, evaluated and explained image classifier.

Python API (mirrors the CLI)::

    import imgclf
    config = imgclf.build_config({"data": {"path": "DATA"}, "train": {"epochs": 10}, "out": "runs/x"})
    run = imgclf.train(config)          # -> Run
    run.evaluate("test")                # metrics dict, from predictions_test.csv
    run.predict(["new_images/"])        # Predictions
    run = imgclf.load_run("runs/x")
"""

from .api import train
from .config import Config, build_config, load_config
from .errors import ImgclfError
from .predictions import Predictions
from .run import Run, load_run

__all__ = ["Config", "ImgclfError", "Predictions", "Run", "build_config", "load_config", "load_run", "train"]
__version__ = "0.1.0"
