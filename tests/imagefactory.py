"""Synthetic image datasets for tests: learnable classes, mixed modes, sizes and extensions.

Each class is a bright shape at a class-specific place (left bar, right bar, top bar, ...), so a
tiny CNN learns it in a few epochs whatever the mode conversion did to the colours.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

# (mode, extension) cycled over the images of every class: what real medical exports mix.
VARIANTS = [("RGB", ".jpg"), ("L", ".png"), ("RGB", ".PNG"), ("I;16", ".png"), ("RGBA", ".png"),
            ("P", ".png"), ("CMYK", ".jpg"), ("L", ".bmp"), ("RGB", ".tif"), ("RGB", ".webp")]
CLASS_NAMES = ["left bar", "right bar", "top bar", "bottom bar"]


def pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size float image in [0, 1]: noise plus a bright bar whose place is the class."""
    img = rng.uniform(0.0, 0.35, (size, size))
    third = max(1, size // 3)
    bars = [np.s_[:, :third], np.s_[:, -third:], np.s_[:third, :], np.s_[-third:, :]]
    img[bars[label % len(bars)]] += 0.6
    return np.clip(img, 0, 1)


def to_pil(gray: np.ndarray, mode: str) -> Image.Image:
    u8 = (gray * 255).round().astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray((gray * 65535).round().astype(np.uint16))
    if mode == "L":
        return Image.fromarray(u8)
    rgb = Image.fromarray(np.stack([u8, u8, (u8 * 0.8).astype(np.uint8)], axis=-1))
    if mode == "RGBA":
        rgba = rgb.convert("RGBA")
        rgba.putalpha(255)
        return rgba
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return rgb.convert(mode)


def write_image(path: Path, label: int, size: int, mode: str, rng: np.random.Generator) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(pattern(label, size, rng), mode).save(path)
    return path


def make_class_folders(folder: Path, per_class: int, classes: list[str] | None = None, seed: int = 0,
                       sizes: tuple[int, ...] = (20, 24, 28)) -> Path:
    """``folder/<class>/<n><ext>`` with modes, sizes and extensions cycling."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes or CLASS_NAMES[:3]):
        for n in range(per_class):
            mode, ext = VARIANTS[(n + label) % len(VARIANTS)]
            write_image(folder / name / f"img {n:03d}{ext}", label, sizes[n % len(sizes)], mode, rng)
    return folder


def make_split_folders(root: Path, per_class: dict[str, int], classes: list[str] | None = None,
                       seed: int = 0) -> Path:
    """``root/<split>/<class>/...``, e.g. per_class={"train": 12, "test": 4}."""
    for i, (split, n) in enumerate(per_class.items()):
        make_class_folders(root / split, n, classes, seed=seed + i)
    return root


def make_grouped_csv(root: Path, per_class: int, group_of: Callable[[int], str], column: str = "group") -> Path:
    """Images under ``root/images/`` listed in ``root/labels.csv`` with a group column: the n-th image (in path
    order) belongs to ``group_of(n)``."""
    images = make_class_folders(root / "images", per_class)
    rows = [[p.relative_to(root).as_posix(), p.parent.name, group_of(n)]
            for n, p in enumerate(sorted(q for q in images.rglob("*") if q.is_file()))]
    with open(root / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", column], *rows])
    return root / "labels.csv"


def make_csv(root: Path, per_class: int, with_split: bool, seed: int = 0, delimiter: str = ",") -> Path:
    """Images under ``root/images/`` listed in ``root/labels.csv`` (or .tsv)."""
    images = make_class_folders(root / "images", per_class, seed=seed)
    rows = []
    for n, path in enumerate(sorted(p for p in images.rglob("*") if p.is_file())):
        split = ("train", "train", "train", "val", "test")[n % 5]
        rows.append([path.relative_to(root).as_posix(), path.parent.name, *([split] if with_split else [])])
    target = root / ("labels.tsv" if delimiter == "\t" else "labels.csv")
    with open(target, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh, delimiter=delimiter)
        out.writerow(["path", "label", *(["split"] if with_split else [])])
        out.writerows(rows)
    return target


def write_dicom(path: Path, pixels: np.ndarray, slope: float = 1.0, intercept: float = 0.0,
                window: tuple[float, float] | None = None, photometric: str = "MONOCHROME2",
                claimed_size: tuple[int, int] | None = None, voi_function: str | None = None,
                voi_lut: tuple[int, list[int]] | None = None, lut_vr: str = "US") -> Path:
    """A minimal valid DICOM file (uncompressed, 16-bit unsigned) written with pydicom; ``pixels`` of 3
    dimensions are frames. ``claimed_size`` (rows, columns) puts another size in the header: a bomb's.
    ``voi_lut`` is (first value mapped, 8-bit table) for a VOI LUT Sequence, its data as ``lut_vr``."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CR", "anon"
    ds.Rows, ds.Columns = claimed_size or pixels.shape[-2:]
    if pixels.ndim == 3:
        ds.NumberOfFrames = len(pixels)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if voi_function:
        ds.VOILUTFunction = voi_function
    if voi_lut:
        item = Dataset()
        item.LUTDescriptor = [len(voi_lut[1]), voi_lut[0], 8]
        table = voi_lut[1] if lut_vr == "US" else np.asarray(voi_lut[1], "<u2").tobytes()
        item.add_new(0x00283006, lut_vr, table)  # LUT Data: its VR is US or OW
        ds.VOILUTSequence = [item]
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
