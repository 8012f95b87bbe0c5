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


def dicom_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header alone: nothing is decoded, so a size cap can refuse a bomb first."""
    return _size(_read(path, stop_before_pixels=True))


def read_dicom(path: Path, max_pixels: int) -> Image.Image:
    """The first frame as 8-bit gray (or RGB, for a colour file); a frame over ``max_pixels`` is refused
    (ValueError) before decoding. A compressed frame can be a thousandth of its decoded size, so the file's
    size says nothing. Anything pydicom cannot read is a ValueError too: callers name the file."""
    from pydicom.pixels import apply_modality_lut, pixel_array

    ds = _read(path)
    width, height = _size(ds)
    if width * height > max_pixels:
        raise ValueError(f"{width}x{height} pixels exceeds the {max_pixels:,} limit")
    try:
        stored = pixel_array(ds, index=0)  # the first frame only, and not cached on ``ds``
        pixels = apply_modality_lut(stored, ds).astype(np.float64, copy=False)
    except (ImgclfError, MemoryError):
        raise
    except Exception as err:  # pydicom's decoders raise many kinds on a damaged file
        raise ValueError(f"cannot decode its pixel data ({type(err).__name__}: {str(err)[:100]})") from None
    del stored  # the float frame is all that is needed from here
    low, high = _window(ds, pixels)
    # in place: one float64 frame at a time, whatever its size (up to the cap)
    np.subtract(pixels, low, out=pixels)
    np.divide(pixels, max(high - low, 1e-9), out=pixels)
    np.clip(pixels, 0, 1, out=pixels)
    if ds.get("PhotometricInterpretation", "") == "MONOCHROME1":
        np.subtract(1, pixels, out=pixels)
    np.multiply(pixels, 255, out=pixels)
    return Image.fromarray(np.rint(pixels, out=pixels).astype(np.uint8))


def _read(path: Path, stop_before_pixels: bool = False):
    """pydicom's dataset of ``path``; ImgclfError without pydicom, ValueError for a file it cannot parse."""
    try:
        import pydicom
    except ImportError:
        raise ImgclfError(f"{path} is DICOM: pip install 'imgclf[dicom]' to read .dcm files") from None
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except OSError:
        raise
    except Exception as err:  # InvalidDicomError is a plain Exception; a damaged file raises other kinds
        raise ValueError(f"not a readable DICOM file ({type(err).__name__}: {str(err)[:100]})") from None


def _size(ds) -> tuple[int, int]:
    try:
        return int(ds.Columns), int(ds.Rows)
    except (AttributeError, TypeError, ValueError):
        raise ValueError("the DICOM header has no valid Rows and Columns") from None


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
