"""DICOM (``.dcm``) decoding via pydicom, an optional extra (``pip install 'imgclf[dicom]'``).

Rule: stored values -> modality LUT (RescaleSlope/RescaleIntercept) -> the file's first VOI
window (WindowCenter/WindowWidth) if it has one, else the full value range -> 0..255, and
MONOCHROME1 (where high values are dark) is inverted so bone is bright as in MONOCHROME2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from imgclf.errors import ImgclfError


def read_dicom(path: Path) -> Image.Image:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut
    except ImportError:
        raise ImgclfError(f"{path} is DICOM: pip install 'imgclf[dicom]' to read .dcm files") from None
    ds = pydicom.dcmread(path)
    pixels = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    low, high = _window(ds, pixels)
    scaled = np.clip((pixels - low) / max(high - low, 1e-9), 0, 1)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        scaled = 1 - scaled
    image = (scaled * 255).round().astype(np.uint8)
    return Image.fromarray(image)


def _window(ds, pixels: np.ndarray) -> tuple[float, float]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center, width = _first(center), _first(width)  # a multi-valued window: use the first
        return center - width / 2, center + width / 2
    return float(pixels.min()), float(pixels.max())


def _first(value) -> float:
    try:
        return float(value)
    except TypeError:
        return float(value[0])
