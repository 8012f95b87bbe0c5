"""Decode one image file into a resized uint8 array, by one documented rule.

Only a regular file (after following a symlink) is opened: a FIFO or device file (``/dev/zero``) is a
BadImage before any read, because reading it would never end.

Mode rule (after EXIF orientation is applied; animated files use their first frame):
- 16-bit integer grayscale (``I;16``, and 16-bit PGM, which Pillow opens as ``I``) is scaled by its bit depth:
  value / 257; other 32-bit integer grayscale (``I``, e.g. TIFF) by the range its values span: within [0, 255]
  kept as they are, else / 257 (16-bit data stored in 32 bits) with values above 65535 clipped;
- 32-bit float grayscale (``F``, float TIFFs) is scaled by the range its values span: any NaN or
  infinity refuses the image (BadImage); values within [0, 1] are x 255; within [0, 255] kept as they
  are; within [0, 65535] / 257 (16-bit data stored as float); anything else (negative values, or
  above 65535) refuses the image, since no fixed rule maps it to 8 bits without guessing;
- palette (``P``) expands to RGB, or RGBA when it has transparency; ``1`` becomes ``L``;
- alpha (``LA``, ``RGBA``, ``PA``, and a gray or RGB PNG's transparent colour, ``tRNS``) is composited onto
  black, so transparent areas read as 0;
- ``CMYK`` and other colour spaces are converted to RGB by Pillow;
- finally ``channels=1`` takes the luma (ITU-R 601) and ``channels=3`` replicates gray to RGB.
Images are resized to a square ``size`` x ``size`` (no crop, as Keras' ``target_size`` does).
DICOM files follow the rule in ``dicom.py`` (rescale, window, MONOCHROME1 inverted) first.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from imgclf.data.dicom import dicom_size, read_dicom
from imgclf.errors import DataError
from imgclf.safeio import special_file_kind

# Beyond this many pixels an image is treated as a decompression bomb rather than decoded.
MAX_PIXELS = 16_000 * 16_000
# PIL warns from 89.5M pixels and refuses from twice that. Its refusal, like MAX_PIXELS (checked on the header),
# ends in one line naming the file; its warning for the images in between would be raw two-line noise.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Pillow warns of damaged metadata ("Corrupt EXIF data", "Tag data larger than file") as it reads on: the
# image then decodes (with its pixels) or fails as a BadImage naming the file; the warning is two raw lines.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")


def decodable_pixels() -> int:
    """The most pixels an image may have and still be decoded: MAX_PIXELS, or Pillow's refusal below it."""
    pillow = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else MAX_PIXELS
    return min(MAX_PIXELS, pillow)


_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, UnidentifiedImageError,
                  Image.DecompressionBombError, IndexError, NotImplementedError)  # a pixel format Pillow lacks


# evaluate, explain and report have no --skip-bad-images: they score or show a run's own images
SKIP_HINT = "fix or delete it (train and predict skip such images with --skip-bad-images)"


class BadImage(DataError):
    """An image that cannot be decoded; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot read image {path}: {reason}; {SKIP_HINT}")


RESAMPLING = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
              "nearest": Image.Resampling.NEAREST}


def load_image(path: str | Path, size: int, channels: int, interpolation: str = "bilinear") -> np.ndarray:
    """Return an ``H x W x channels`` uint8 array of ``path`` resized to ``size``; raise BadImage."""
    path = Path(path)
    require_regular_file(path)
    try:
        with open_image(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise BadImage(path, f"{img.width}x{img.height} pixels exceeds the {MAX_PIXELS:,} limit")
            if img.width < 2 or img.height < 2:
                raise BadImage(path, f"image is only {img.width}x{img.height} pixels")
            if img.format == "JPEG" and interpolation != "nearest":  # the DCT scaling averages: not nearest
                img.draft("RGB" if channels == 3 else "L", (size, size))  # decode at reduced scale
            img.load()
            sixteen_bit = img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PPM")  # PGM: 16-bit
            img = ImageOps.exif_transpose(img)
            img = to_mode(img, "RGB" if channels == 3 else "L", sixteen_bit)
            img = img.resize((size, size), RESAMPLING[interpolation], reducing_gap=2.0)
            array = np.asarray(img, dtype=np.uint8)
    except BadImage:
        raise
    except PermissionError:
        raise BadImage(path, "permission denied") from None
    except _DECODE_ERRORS as err:
        raise BadImage(path, str(err) or type(err).__name__) from None
    return array[:, :, None] if array.ndim == 2 else array


def require_regular_file(path: Path) -> None:
    """BadImage unless ``path`` is a regular file (or cannot be stat'ed, which opening then reports)."""
    if kind := special_file_kind(path):
        raise BadImage(path, f"it is a {kind}, not a regular file")


def open_image(path: Path) -> Image.Image:
    """Pillow's lazy open, or the DICOM reader for ``.dcm``."""
    if path.suffix.lower() == ".dcm":
        return read_dicom(path, MAX_PIXELS)
    return Image.open(path)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, decoding nothing (a DICOM file included)."""
    if path.suffix.lower() == ".dcm":
        return dicom_size(path)
    with Image.open(path) as img:
        return img.width, img.height


def to_mode(img: Image.Image, target: str, sixteen_bit: bool = False) -> Image.Image:
    """Convert any Pillow mode to ``L`` or ``RGB`` by the module's documented rule; ``sixteen_bit``: the file
    stores 16-bit samples (Pillow opens a 16-bit PGM as 32-bit ``I``)."""
    if img.mode == "F":
        with np.errstate(invalid="ignore"):  # NaN is refused by the rule, not warned about by numpy
            img = Image.fromarray(float_to_uint8(np.asarray(img, dtype=np.float64)))
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        img = Image.fromarray(integer_to_uint8(np.asarray(img), sixteen_bit or img.mode.startswith("I;16")))
    if img.mode == "1":
        img = img.convert("L")
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:  # a palette's, or a PNG's tRNS colour
        img = img.convert("RGBA")
    if img.mode == "P":
        img = img.convert("RGB")
    if img.mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")  # convert would copy an RGBA image whole
        img = Image.new("RGB", rgba.size, 0)  # onto black through the alpha mask: alpha_composite's pixels
        img.paste(rgba, mask=rgba)  # (tested), without its two more full-size RGBA copies
    if img.mode not in ("L", "RGB"):
        img = img.convert("RGB")
    return img.convert(target) if img.mode != target else img


def integer_to_uint8(array: np.ndarray, sixteen_bit: bool) -> np.ndarray:
    """16/32-bit integer gray to 8 bits by the module's rule (value / 257, rounded, for 16-bit data), in integers:
    (v + 128) // 257 is round(v / 257) exactly (no value falls on a half), at 4 bytes a pixel, not float64's 8
    and its copies (a 13,000 x 13,000 16-bit PNG is 338 MB decoded)."""
    if not sixteen_bit and array.max(initial=0) <= 255:
        return np.clip(array, 0, 255).astype(np.uint8)
    wide = np.clip(array, 0, 65535).astype(np.uint32)
    wide += 128
    wide //= 257
    return wide.astype(np.uint8)


def float_to_uint8(array: np.ndarray) -> np.ndarray:
    """The float rule of the module docstring; ValueError (a BadImage in load_image) when it refuses."""
    if not np.isfinite(array).all():
        raise ValueError("32-bit float image holds NaN or infinite values; export it with finite values")
    low, high = float(array.min(initial=0.0)), float(array.max(initial=0.0))
    if low < 0 or high > 65535:
        raise ValueError(f"32-bit float image spans [{low:g}, {high:g}], outside 0..65535; "
                         "scale it to [0, 1] or export it as 8/16-bit")
    scale = 255.0 if high <= 1 else 1.0 if high <= 255 else 1 / 257.0
    return np.clip(array * scale, 0, 255).round().astype(np.uint8)
