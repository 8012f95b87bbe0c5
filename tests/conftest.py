from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import imgclf

from imagefactory import make_class_folders


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """The test session decodes into its own cache, never the user's ~/.cache."""
    old = os.environ.get("IMGCLF_CACHE_DIR")
    os.environ["IMGCLF_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "cache")
    yield
    if old is None:
        os.environ.pop("IMGCLF_CACHE_DIR", None)
    else:
        os.environ["IMGCLF_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _imgclf_logger_as_found():
    """Each test finds the ``imgclf`` logger as the session began: a CLI call in an earlier test leaves it a
    handler on that test's captured stderr (closed since) and propagation off, which hides the next test's
    warnings from caplog, or makes them a "Logging error" traceback."""
    logger = logging.getLogger("imgclf")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers, logger.propagate, logger.level = saved


@pytest.fixture
def pool_dataset(tmp_path) -> Path:
    return make_class_folders(tmp_path / "data", per_class=14)


def tiny_config(data_path: Path | str, out: Path | str, **sections) -> imgclf.Config:
    """A seconds-long training config: 16 px, a 2-block CNN, few epochs."""
    values = {
        "data": {"path": str(data_path), "image_size": 16, "val_fraction": 0.2, "test_fraction": 0.2},
        "model": {"name": "simple_cnn", "conv_filters": [8, 16], "dropout": 0.0},
        "augment": {"preset": "none"},
        "train": {"epochs": 10, "batch_size": 8, "lr": 0.01},
        "evaluate": {"report": False, "bootstrap": 100, "baseline": False},  # test_report.py: report on
        "out": str(out),
    }
    for section, fields in sections.items():
        if isinstance(fields, dict):
            values.setdefault(section, {}).update(fields)
        else:
            values[section] = fields
    return imgclf.build_config(values)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> imgclf.Run:
    """One trained run shared by read-only tests (evaluate, predict, metrics)."""
    base = tmp_path_factory.mktemp("shared")
    data = make_class_folders(base / "data", per_class=14)
    return imgclf.train(tiny_config(data, base / "run"))
