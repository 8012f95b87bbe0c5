"""DICOM (``.dcm``) decoding via pydicom, an optional extra (``pip install 'imgclf[dicom]'``).

Rule: stored values -> modality LUT (RescaleSlope/RescaleIntercept) -> the file's first VOI
window (WindowCenter/WindowWidth; linear, or sigmoid where VOILUTFunction says SIGMOID) if it has one,
else its first VOI LUT (VOILUTSequence), else the full value range -> 0..255, and MONOCHROME1 (where high
values are dark) is inverted so bone is bright as in MONOCHROME2.
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
    pixels = _values_of_interest(ds, pixels)
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


def _values_of_interest(ds, pixels: np.ndarray) -> np.ndarray:
    """``pixels`` mapped to 0..1 by the module docstring's rule; in place (one float64 frame at a time,
    whatever its size up to the cap) except through a VOI LUT, which makes one more frame."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center, width = _first(center), max(_first(width), 1e-9)  # a multi-valued window: use the first
        if str(ds.get("VOILUTFunction", "LINEAR")).upper() == "SIGMOID":  # PS3.3 C.11.2.1.3.1
            np.subtract(pixels, center, out=pixels)
            np.multiply(pixels, -4 / width, out=pixels)
            np.exp(pixels, out=pixels)
            np.add(pixels, 1, out=pixels)
            return np.reciprocal(pixels, out=pixels)
        return _rescaled(pixels, center - width / 2, center + width / 2)
    if ds.get("VOILUTSequence"):
        return _through_voi_lut(ds, pixels)
    return _rescaled(pixels, float(pixels.min()), float(pixels.max()))


def _through_voi_lut(ds, pixels: np.ndarray) -> np.ndarray:
    """The first VOI LUT (PS3.3 C.11.2.1.1): a value below the first one mapped takes the first entry, one
    past the last takes the last. pydicom's apply_voi_lut is not used: it indexes an 8-bit table of more
    than 256 entries through uint8, so values past 255 wrap (pydicom 3.0)."""
    try:
        item = ds.VOILUTSequence[0]
        count, first, bits = (int(v) for v in item.LUTDescriptor)
        count = count or 2**16
        table = _lut_entries(ds, item, count)
    except Exception as err:  # a damaged sequence raises many kinds
        raise ValueError(f"cannot apply its VOI LUT ({type(err).__name__}: {str(err)[:100]})") from None
    if len(table) != count or not 8 <= bits <= 16:
        raise ValueError(f"cannot apply its VOI LUT ({len(table)} entries of {bits} bits, {count} described)")
    np.subtract(pixels, first, out=pixels)
    np.clip(pixels, 0, count - 1, out=pixels)
    np.take(table, pixels.astype(np.intp), out=pixels)
    return _rescaled(pixels, 0, 2**bits - 1)


def _lut_entries(ds, item, count: int) -> np.ndarray:
    data = item["LUTData"].value
    if isinstance(data, bytes):  # OW: 16 bits an entry, in the file's byte order
        order = ">" if ds.original_encoding[1] is False else "<"
        return np.frombuffer(data, dtype=f"{order}u2", count=min(count, len(data) // 2)).astype(np.float64)
    return np.atleast_1d(np.asarray(data, dtype=np.float64))


def _rescaled(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    np.subtract(pixels, low, out=pixels)
    np.divide(pixels, max(high - low, 1e-9), out=pixels)
    return np.clip(pixels, 0, 1, out=pixels)


def _first(value) -> float:
    try:
        return float(value)
    except TypeError:
        return float(value[0])
