"""The parity gate every export passes before it reports success.

Up to 64 of the run's validation images (decoded by ``load_image``, the one resize) plus a few
images of random pixels go through the ONNX graph and through the torch engine (fp32, CPU). The
export stands only if the largest probability difference is at most 1e-4, every top-1 class agrees,
and the graph answers the same for one image at a time as for batches of 8 (within 1e-5).

The torch engine as the run predicts (fp32 on the run's device, whatever precision it trained in)
is measured too and recorded, and named in a warning when it differs by more than 1e-4.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgclf.data.images import BadImage, load_image
from imgclf.errors import ConfigError, DataError, ImgclfError
from imgclf.logs import get_logger
from imgclf.serving.graph import InputSpec, engine_probs, reference_probs, run_computes

log = get_logger("export")
MAX_VALIDATION = 64
RANDOM_IMAGES = 4
MAX_PROB_DIFF = 1e-4
MAX_BATCH_DIFF = 1e-5
PARITY_BATCH = 8


def parity_images(run, spec: InputSpec, data_root: str | Path | None = None) -> tuple[np.ndarray, dict]:
    """uint8 ``N x S x S x C`` images for the gate, and where they came from."""
    paths, split = _validation_paths(run, data_root)
    arrays, unreadable = [], 0
    for path in paths:
        try:
            arrays.append(load_image(path, spec.size, spec.channels, spec.interpolation))
        except BadImage:
            unreadable += 1
    if unreadable and data_root is not None and not arrays:  # the folder the user named is not the run's data
        raise DataError(f"--data {data_root}: none of the {len(paths)} {split} images the parity gate chose could be "
                        "read there; give the folder the run was trained on (its new location)")
    if unreadable:
        log.warning("warning: %d of the %d %s images chosen for the parity gate could not be read and were left "
                    "out", unreadable, len(paths), split)
    noise = np.random.default_rng(0).integers(0, 256, (RANDOM_IMAGES, spec.size, spec.size, spec.channels),
                                              dtype=np.uint8)
    images = np.concatenate([np.stack(arrays), noise]) if arrays else noise
    return images, {"split": split, "run_images": len(arrays), "random_images": RANDOM_IMAGES}


def _validation_paths(run, data_root: str | Path | None) -> tuple[list[Path], str]:
    """Up to 64 images of the run's val split (test where it has none), or none when the data is gone (a
    ``data_root`` the user gave must hold them: its errors stand)."""
    try:
        index = run.index(data_root)
    except ImgclfError as err:
        if data_root is not None:
            raise
        log.warning("warning: the parity gate checks random images only: %s", err)
        return [], "none"
    for split in ("val", "test"):
        rows = [i for i, s in enumerate(index.splits) if s == split][:MAX_VALIDATION]
        if rows:
            return [index.abspath(i) for i in rows], split
    return [], "none"


def run_session(session, images: np.ndarray, batch: int) -> np.ndarray:
    """The graph's probabilities for ``images``, ``batch`` at a time, as float64."""
    parts = [session.run(["probabilities"], {"images": images[i:i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(parts).astype(np.float64)


def parity_gate(run, session, images: np.ndarray) -> dict:
    """Compare the graph with the torch engine; the figures for export.json, or a ConfigError on a miss."""
    reference = reference_probs(run, images)
    batched = run_session(session, images, PARITY_BATCH)
    single = run_session(session, images, 1)
    figures = {
        "images": len(images),
        "reference": "torch engine, fp32 on cpu",
        "max_abs_diff_probability": float(np.abs(batched - reference).max()),
        "top1_agreement": float((batched.argmax(1) == reference.argmax(1)).mean()),
        "max_abs_diff_batch1_vs_batch8": float(np.abs(single - batched).max()),
        "tolerances": {"probability": MAX_PROB_DIFF, "top1_agreement": 1.0, "batch1_vs_batch8": MAX_BATCH_DIFF},
    }
    misses = _misses(figures)
    figures["passed"] = not misses
    figures["torch_engine_as_configured"] = _as_configured(run, images, batched)
    if misses:
        raise ConfigError(f"the exported graph of {run.path} disagrees with the torch engine ({'; '.join(misses)}) "
                          "on its parity images; nothing was written; try another --opset, or report it with the "
                          "model's name")
    return figures


def _misses(f: dict) -> list[str]:
    misses = []
    if f["max_abs_diff_probability"] > MAX_PROB_DIFF:
        misses.append(f"max |Δprobability| {f['max_abs_diff_probability']:.2g} > {MAX_PROB_DIFF:g}")
    if f["top1_agreement"] < 1.0:
        misses.append(f"top-1 agreement {f['top1_agreement']:.1%} < 100%")
    if f["max_abs_diff_batch1_vs_batch8"] > MAX_BATCH_DIFF:
        misses.append(f"batch 1 vs batch 8 differ by {f['max_abs_diff_batch1_vs_batch8']:.2g} > {MAX_BATCH_DIFF:g}")
    return misses


def _as_configured(run, images: np.ndarray, onnx_probs: np.ndarray) -> dict:
    """How far the run's own torch engine (fp32 on its device) is from the graph; warned when > 1e-4."""
    computes = run_computes(run)
    diff = float(np.abs(engine_probs(run, images) - onnx_probs).max())
    if diff > MAX_PROB_DIFF:
        log.warning("warning: %s predicts in %s with the torch engine, which differs from the ONNX graph (and torch "
                    "fp32 on the CPU) by up to %.2g here, so predict --engine torch and --engine onnx may disagree; "
                    "use one engine throughout", run.path, ", ".join(computes), diff)
    return {"compute": computes, "max_abs_diff_probability": diff}
