"""Real image sets that exist offline, written as DATA/{train,val,test}/<class>/*.png for benchmarks.

- ``fashion``: a class-imbalanced subsample of Fashion-MNIST (Debian's ``dataset-fashion-mnist``,
  28 px grayscale photos of clothes), one class with only 4 training images.
- ``textures``: random 64 px crops of scikit-image's brick, grass, gravel and moon-surface photos.
- ``faces``: scikit-image's LFW subset, 100 faces against 100 non-faces, 25 px grayscale.
- ``digits``: scikit-learn's handwritten digits (8 px, upscaled to 32 px), 20/8/8 per class: small
  uniform images where ImageNet features carry little.

Each set is drawn with a fixed seed, so every benchmark that names it trains on the same images.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
# class -> (train, val, test) images; 'bag' is the tiny class
FASHION_CLASSES = {"t-shirt": (150, 40, 40), "trouser": (60, 16, 16), "pullover": (30, 10, 10),
                   "dress": (12, 6, 6), "bag": (4, 3, 3)}
FASHION_LABELS = {"t-shirt": 0, "trouser": 1, "pullover": 2, "dress": 3, "bag": 8}
TEXTURES = ("brick", "grass", "gravel", "moon")
SPLITS = ("train", "val", "test")


def fashion(root: Path, seed: int = 0, test_scale: int = 1) -> Path:
    """The imbalanced Fashion-MNIST subsample; an error naming the apt package when it is missing.

    ``test_scale``: the test split holds that many times the validation images of every class (the
    same class mix as train and val, as a held-out split of the user's folder has), so that a test
    macro-F1 can resolve a 1-point difference: with the default 3 test bags, one image moves it ~5 points."""
    images_file, labels_file = FASHION_DIR / "train-images-idx3-ubyte.gz", FASHION_DIR / "train-labels-idx1-ubyte.gz"
    if not images_file.exists():
        raise SystemExit(f"{images_file} is missing: apt install dataset-fashion-mnist")
    with gzip.open(images_file) as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(labels_file) as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    rng = np.random.default_rng(seed)
    for name, counts in FASHION_CLASSES.items():
        counts = (*counts[:2], counts[1] * test_scale)
        chosen = rng.permutation(np.flatnonzero(labels == FASHION_LABELS[name]))[:sum(counts)]
        _write_splits(root, name, [images[i] for i in chosen], counts)
    return root


def textures(root: Path, per_class: tuple[int, int, int] = (40, 15, 15), size: int = 64, seed: int = 0) -> Path:
    """Random crops (train, val and test crops from disjoint thirds of each photo, so no crop overlaps
    another split's)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in TEXTURES:
        photo = np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)
        third = photo.shape[1] // 3
        for split, count, part in zip(SPLITS, per_class, range(3), strict=True):
            strip = photo[:, part * third:(part + 1) * third]
            crops = [_crop(strip, size, rng) for _ in range(count)]
            _write(root / split / name, crops)
    return root


def faces(root: Path, seed: int = 0) -> Path:
    import skimage.data

    images = (skimage.data.lfw_subset() * 255).round().astype(np.uint8)  # 100 faces, then 100 non-faces
    rng = np.random.default_rng(seed)
    for name, block in (("face", images[:100]), ("not a face", images[100:])):
        _write_splits(root, name, list(block[rng.permutation(100)]), (60, 20, 20))
    return root


def digits(root: Path, per_class: tuple[int, int, int] = (20, 8, 8), seed: int = 0) -> Path:
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    for label in range(10):
        picks = rng.permutation(np.flatnonzero(data.target == label))[:sum(per_class)]
        images = [np.kron(data.images[i] * (255 / 16), np.ones((4, 4))).round().astype(np.uint8) for i in picks]
        _write_splits(root, str(label), images, per_class)
    return root


SETS = {"fashion": fashion, "textures": textures, "faces": faces, "digits": digits}


def _crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    y = rng.integers(0, photo.shape[0] - size)
    x = rng.integers(0, photo.shape[1] - size)
    return np.rot90(photo[y:y + size, x:x + size], k=int(rng.integers(4)))


def _write_splits(root: Path, name: str, images: list[np.ndarray], counts: tuple[int, int, int]) -> None:
    start = 0
    for split, count in zip(SPLITS, counts, strict=True):
        _write(root / split / name, images[start:start + count])
        start += count


def _write(folder: Path, images: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(np.ascontiguousarray(image)).save(folder / f"{i:04d}.png")
