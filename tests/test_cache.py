import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data import cache, images
from imgclf.data.cache import decode_all, fingerprint
from imgclf.errors import DataError

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


def bmp_paths(folder, n=4):
    """Same-size BMPs: an edit that keeps size (and, with touch -r, mtime) is possible on them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        paths.append(folder / f"{i}.bmp")
        Image.fromarray(np.full((8, 8), (40 * i) % 256, dtype=np.uint8)).save(paths[-1])
    return paths


def test_an_edit_that_keeps_size_and_mtime_is_decoded_again(tmp_path):
    paths = bmp_paths(tmp_path / "d")
    first = decode_all(paths, 8, 1, tmp_path / "c")
    before = os.stat(paths[1])
    size = paths[1].stat().st_size
    Image.fromarray(np.full((8, 8), 250, dtype=np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(before.st_atime_ns, before.st_mtime_ns))  # touch -r: the edit hides from size+mtime
    assert paths[1].stat().st_size == size and paths[1].stat().st_mtime_ns == before.st_mtime_ns
    second = decode_all(paths, 8, 1, tmp_path / "c")
    assert second.file != first.file and second.open()[1].min() == 250 and first.open()[1].max() == 40


def damage_truncate(entry):
    entry.write_bytes(entry.read_bytes()[:-10])


def damage_header(entry):
    np.save(entry, np.zeros((2, 1, 8, 8), dtype=np.uint8))


def damage_sidecar(entry):
    entry.with_suffix(".json").write_text("{not json")


def damage_sidecar_shape(entry):
    meta = json.loads(entry.with_suffix(".json").read_text())
    entry.with_suffix(".json").write_text(json.dumps({**meta, "shape": [9, 9]}))


def damage_sidecar_failures(entry):
    """More failed images than the entry has images: each would become an object (8 kB a image allowed)."""
    meta = json.loads(entry.with_suffix(".json").read_text())
    entry.with_suffix(".json").write_text(json.dumps({**meta, "bad": [["a", "b"]] * (meta["shape"][0] + 1)}))


def damage_sidecar_nesting(entry):
    """Nested past Python's recursion limit, within the sidecar's size cap: a RecursionError, not a traceback."""
    meta = json.loads(entry.with_suffix(".json").read_text())
    text = json.dumps(meta)[:-1] + ', "extra": ' + "[" * 20_000 + "]" * 20_000 + "}"
    entry.with_suffix(".json").write_text(text)


def damage_sidecar_foreign_failure(entry):
    """A failed image that is not one of the entry's: a good image would be refused, or skipped, by its word."""
    meta = json.loads(entry.with_suffix(".json").read_text())
    entry.with_suffix(".json").write_text(json.dumps({**meta, "bad": [["/elsewhere/0.bmp", "evil"]]}))


def damage_sidecar_long_reason(entry):
    meta = json.loads(entry.with_suffix(".json").read_text())
    entry.with_suffix(".json").write_text(json.dumps({**meta, "bad": [[meta["bad"][0][0], "x" * 5000]]}))


def damage_pixels(entry):
    """Every pixel overwritten, header and length kept: only the recorded hash tells."""
    array = np.load(entry, mmap_mode="r+")
    array[:] = 255
    array.flush()


def planted(make):
    """Damage that replaces one of the entry's files (the .npy, or its .json sidecar) with ``make(path)``."""
    def damage(entry, suffix):
        path = entry.with_suffix(suffix)
        path.unlink()
        make(path)
    return damage


def fifo(path):
    os.mkfifo(path)  # a plain open() would wait on it forever


def link_to_zeros(path):
    path.symlink_to("/dev/zero")  # endless bytes: read whole, it would fill memory


def oversized(path):
    path.write_bytes(b" " * 2_000_000)  # far more than 4 images' entry can hold


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", [fifo, link_to_zeros, oversized])
@pytest.mark.parametrize("suffix", [".npy", ".json"])
def test_a_planted_entry_file_is_rebuilt_without_hanging_or_reading_it_whole(tmp_path, caplog, make, suffix):
    paths = bmp_paths(tmp_path / "d")
    entry = decode_all(paths, 8, 1, tmp_path / "c").file
    expected = np.array(np.load(entry))
    planted(make)(entry, suffix)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        rebuilt = decode_all(paths, 8, 1, tmp_path / "c")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("warning: decode cache entry") and "damaged" in m for m in messages), messages
    assert all("\n" not in m for m in messages)
    np.testing.assert_array_equal(rebuilt.open(), expected)
    assert entry.with_suffix(suffix).is_file() and not entry.with_suffix(suffix).is_symlink()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("plant", ["fifo lock", "folder npy", "folder json"])
def test_what_a_rename_cannot_replace_is_a_one_line_error_naming_it(tmp_path, plant):
    paths = bmp_paths(tmp_path / "d")
    key = fingerprint(paths, 8, 1)
    (tmp_path / "c").mkdir()
    kind, suffix = plant.split()
    target = tmp_path / "c" / f"{key}.{suffix}"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    with pytest.raises(DataError, match=f"{target.name}.*(delete it|IMGCLF_CACHE_DIR)") as err:
        decode_all(paths, 8, 1, tmp_path / "c")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage", [damage_truncate, damage_header, damage_sidecar, damage_sidecar_shape,
                                    damage_sidecar_failures, damage_sidecar_nesting, damage_sidecar_foreign_failure,
                                    damage_pixels])
def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    paths = bmp_paths(tmp_path / "d")
    entry = decode_all(paths, 8, 1, tmp_path / "c").file
    expected = np.array(np.load(entry))
    damage(entry)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        rebuilt = decode_all(paths, 8, 1, tmp_path / "c")
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("warning: decode cache entry") and "damaged" in m for m in messages), messages
    assert any("decoding 4 images" in m for m in messages)
    np.testing.assert_array_equal(rebuilt.open(), expected)


def test_a_failed_images_reason_must_be_short_and_its_own(tmp_path, caplog):
    root = make_class_folders(tmp_path / "d", 2)
    (root / "left bar" / "broken.jpg").write_bytes(b"nope")
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    entry = decode_all(paths, 12, 1, tmp_path / "c").file
    damage_sidecar_long_reason(entry)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        again = decode_all(paths, 12, 1, tmp_path / "c")
    assert any("damaged" in r.getMessage() and "short text" in r.getMessage() for r in caplog.records)
    assert [b.path.name for b in again.bad] == ["broken.jpg"] and len(again.bad[0].reason) < 1000


def test_a_cache_folder_others_can_write_is_said(tmp_path, caplog):
    paths = bmp_paths(tmp_path / "d")
    (tmp_path / "mine").mkdir(mode=0o700)
    (tmp_path / "shared").mkdir()
    os.chmod(tmp_path / "shared", 0o777)
    with caplog.at_level(logging.INFO, logger="imgclf"):
        decode_all(paths, 8, 1, tmp_path / "mine")
        assert not [r for r in caplog.records if "writable by other users" in r.getMessage()]
        decode_all(paths, 8, 1, tmp_path / "shared")
    said = [r.getMessage() for r in caplog.records if "writable by other users" in r.getMessage()]
    assert len(said) == 1 and str(tmp_path / "shared") in said[0] and "IMGCLF_CACHE_DIR" in said[0]


def test_orphaned_temp_files_of_the_key_being_built_are_removed(tmp_path):
    paths = bmp_paths(tmp_path / "d")
    key = cache.fingerprint(paths, 8, 1)
    folder = tmp_path / "c"
    folder.mkdir()
    orphans = [folder / f".{key}.npy.x1y2.tmp", folder / f".{key}.json.z3.tmp"]
    other = folder / ".0123456789abcdef01234567.npy.q9.tmp"  # another key: its writer may be alive
    for path in [*orphans, other]:
        path.write_bytes(b"half written")
    decode_all(paths, 8, 1, folder)
    assert not any(p.exists() for p in orphans) and other.exists()


def test_names_that_are_not_utf8_key_and_list_bad_images(tmp_path):
    paths = bmp_paths(tmp_path / "d", 2)
    odd = Path(os.fsdecode(os.fsencode(tmp_path / "d") + b"/\xff.jpg"))
    odd.write_bytes(b"not a jpeg")
    first = decode_all([*paths, odd], 8, 1, tmp_path / "c")
    again = decode_all([*paths, odd], 8, 1, tmp_path / "c")  # bad list read back from the sidecar
    assert [b.path for b in first.bad] == [b.path for b in again.bad] == [odd]
    assert first.file == again.file


BUILD = """
import logging, sys, time
from pathlib import Path
from imgclf.data.cache import decode_all, fingerprint
from imgclf.errors import DataError
from imgclf.logs import setup_logging
setup_logging()
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
paths = sorted(Path(sys.argv[2]).glob("*.bmp"))
decoded = decode_all(paths, 16, 1, sys.argv[3], threads=1)
print("sum", int(decoded.open().sum(dtype="int64")))
"""


def test_two_processes_building_one_entry_at_once_build_it_once(tmp_path):
    """Two real interpreters start on an empty cache together: one decodes, the other waits and reuses."""
    paths = bmp_paths(tmp_path / "d", 120)
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(go), str(tmp_path / "d"), str(tmp_path / "c")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    built = [err.count("decoding 120 images") for _, err in results]
    assert sorted(built) == [0, 1], results
    sums = {out.strip() for out, _ in results}
    expected = sum(int(np.asarray(Image.open(p).resize((16, 16))).sum()) for p in paths)
    assert sums == {f"sum {expected}"}
    leftovers = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert [n for n in leftovers if n.endswith(".tmp")] == [] and sum(n.endswith(".npy") for n in leftovers) == 1
