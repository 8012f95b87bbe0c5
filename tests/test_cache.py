import os

import numpy as np

from imgclf import cache, images
from imgclf.cache import decode_all

from imagefactory import make_class_folders


def test_images_are_decoded_once_and_reused(tmp_path, monkeypatch):
    root = make_class_folders(tmp_path / "d", 3)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    calls = []
    real = images.load_image
    monkeypatch.setattr(cache, "load_image", lambda *a: calls.append(a[0]) or real(*a))
    first = decode_all(paths, 12, 3, tmp_path / "c")
    assert len(calls) == len(paths)
    second = decode_all(paths, 12, 3, tmp_path / "c")
    assert len(calls) == len(paths) and second.file == first.file
    array = second.open()
    assert array.shape == (len(paths), 3, 12, 12) and array.dtype == np.uint8
    np.testing.assert_array_equal(array[0], real(paths[0], 12, 3).transpose(2, 0, 1))


def test_a_changed_file_or_size_invalidates_the_cache(tmp_path):
    root = make_class_folders(tmp_path / "d", 2)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    a = decode_all(paths, 12, 3, tmp_path / "c")
    assert decode_all(paths, 16, 3, tmp_path / "c").file != a.file
    os.utime(paths[0], ns=(1, 1))
    assert decode_all(paths, 12, 3, tmp_path / "c").file != a.file


def test_bad_images_are_listed_not_raised(tmp_path):
    root = make_class_folders(tmp_path / "d", 2)
    (root / "left bar" / "broken.jpg").write_bytes(b"nope")
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    decoded = decode_all(paths, 12, 1, tmp_path / "c")
    assert [b.path.name for b in decoded.bad] == ["broken.jpg"]
    assert [b.path.name for b in decode_all(paths, 12, 1, tmp_path / "c").bad] == ["broken.jpg"]  # from cache
