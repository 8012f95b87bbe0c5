"""Runs: a trained classifier on disk, of one of several kinds, opened by the kind it records.

``base`` (the Run protocol, the kind registry, ``load_run``) is at the bottom; each kind registers
itself: ``network`` (a trained network), ``classical`` (a scikit-learn head on a frozen backbone),
``ensemble`` (a vote of runs). ``files`` and ``manifest`` validate and seal what is on disk.
"""

from imgclf.runs import ensemble, heads, network  # noqa: F401 - each kind registers its opener
from imgclf.runs.base import Run, load_run

__all__ = ["Run", "load_run"]
