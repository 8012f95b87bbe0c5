"""Evaluation: per-image predictions, the metrics computed from them only, intervals and thresholds."""
