"""An uploaded file to the model's input, by the same ``load_image`` as training, evaluation and predict.

The bytes go to a private temporary file (``load_image`` reads paths, so DICOM and every Pillow
format work as they do on disk). Before any pixel is decoded the header is read: a format Pillow
does not know is 415, an image whose pixel count is over the server's cap (a decompression bomb:
a few kB of PNG that expands to gigabytes) is 413, and anything that fails to decode is 422.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from imgclf.data.images import BadImage, image_size, load_image
from imgclf.errors import ImgclfError
from imgclf.serving.graph import InputSpec

# Decode memory of a pixel in Pillow's 32-bit modes against an 8-bit one: a 7000 x 7000 float TIFF took 1.6 GB
# (33 bytes a pixel through its float64 conversion), an RGB PNG of that size 290 MB (6 bytes a pixel).
WIDE_SAMPLE_COST = {"F": 6, "I": 6}


def header(path: Path) -> tuple[int, int, str]:
    """Width, height and Pillow mode from the header alone ("" for DICOM, which pydicom reads)."""
    if path.suffix.lower() == ".dcm":
        return (*image_size(path), "")
    with Image.open(path) as img:
        return img.width, img.height, img.mode


class UploadError(Exception):
    """A file the server refuses: ``status`` is the HTTP code, the message names the file and why."""

    def __init__(self, status: int, message: str):
        self.status = status
        super().__init__(message)


def decode_upload(data: bytes, name: str, spec: InputSpec, folder: Path, max_pixels: int) -> tuple[np.ndarray, Path]:
    """The upload as ``S x S x C`` uint8 and the temporary path it was decoded from (for Grad-CAM)."""
    shown = name or "(unnamed file)"
    if not data:
        raise UploadError(422, f"{shown}: the file is empty")
    path = folder / f"{len(list(folder.iterdir()))}{'.dcm' if shown.lower().endswith('.dcm') else '.upload'}"
    path.write_bytes(data)
    width, height, mode = _header_size(path, shown)
    cost = width * height * WIDE_SAMPLE_COST.get(mode, 1)
    if cost > max_pixels:
        weighed = f" ({mode} samples cost {cost // (width * height)}x an 8-bit pixel to decode)" \
            if cost > width * height else ""
        raise UploadError(413, f"{shown}: {width}x{height} is {width * height:,} pixels{weighed}, over the server's "
                               f"limit of {max_pixels:,} (--max-pixels); a decompression bomb is refused before "
                               "decoding")
    try:
        return load_image(path, spec.size, spec.channels, spec.interpolation), path
    except BadImage as err:
        raise UploadError(422, f"{shown}: cannot decode the image: {err.reason}") from None
    except ImgclfError as err:  # a DICOM file without pydicom installed
        raise UploadError(415, f"{shown}: {err}") from None


def _header_size(path: Path, shown: str) -> tuple[int, int, str]:
    """Width, height and Pillow mode from the header alone (Pillow opens lazily; a DICOM file's mode is "")."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the server's own cap decides
            return header(path)
    except UnidentifiedImageError:
        raise UploadError(415, f"{shown}: not an image format imgclf reads (PNG, JPEG, BMP, TIFF, WebP, GIF, "
                               "DICOM ...)") from None
    except Image.DecompressionBombError as err:  # Pillow's hard limit, twice its warning size
        raise UploadError(413, f"{shown}: refused as a decompression bomb ({err})") from None
    except ImgclfError as err:
        raise UploadError(415, f"{shown}: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, NotImplementedError) as err:
        raise UploadError(422, f"{shown}: cannot read the image header: {err or type(err).__name__}") from None
