"""Bad-input corpus for issue 14 (items 4 and 5): no input is dropped or invented silently.

Every case runs the real CLI in a fresh interpreter (``clitools.imgclf``); the timeout proves no hang.
Documented behaviour checked here (the rules live in scan.py, images.py, atomic.py and cache.py):
- a folder that cannot be listed (dataset root, split, class, a sub-folder of a class): one-line error
  naming it. We run as root, which lists anything, so denial is simulated: a ``sitecustomize`` put on
  PYTHONPATH makes ``os.scandir`` raise PermissionError for the folders in ``IMGCLF_TEST_DENY``;
- a readable class folder with no image files: skipped with a warning saying so;
- a CSV row with an empty label: error at file:line; a CSV naming a device file: error at file:line;
- the same file reached twice (a symlink into another class): used once, under its first label, warned;
- a FIFO or a symlink to ``/dev/zero`` in a folder: skipped with a warning (train, audit, predict);
  named on the predict command line: an error;
- file names that are not UTF-8: trained on, predicted, listed in split.csv, predictions and
  skipped_images.csv with their original bytes, and in dataset.json as ``\\udcXX`` escapes;
- a float TIFF in [0, 1] trains (scaled x 255); one holding NaN is an unreadable image naming it;
- a truncated decode-cache file: rebuilt with a warning on the next run.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import assert_clean_error, imgclf
from imgclf.evaluation.predictions import Predictions

from imagefactory import make_class_folders, make_csv, make_split_folders, pattern, to_pil

# the bad-input corpus: every case ends within a bound, so a hang fails instead of blocking CI
pytestmark = pytest.mark.timeout(300)

TRAIN = ["--epochs", "1", "--image-size", "16", "--conv-filters", "8", "--augment", "none"]
ODD_NAME = b"\xff name.png"  # not UTF-8: Python shows it as a lone surrogate
BROKEN_NAME = b"broken \xfe.jpg"
DENY_HOOK = '''
import os

_real_scandir = os.scandir
_denied = {os.path.normpath(p) for p in os.environ.get("IMGCLF_TEST_DENY", "").split(os.pathsep) if p}

def _scandir(path="."):
    if isinstance(path, (str, bytes, os.PathLike)) and os.path.normpath(os.fsdecode(path)) in _denied:
        raise PermissionError(13, "Permission denied", os.fsdecode(path))
    return _real_scandir(path)

os.scandir = _scandir
'''


def odd(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory) -> Path:
    """Class folders holding every odd case that trains (with warnings) rather than fails."""
    root = make_class_folders(tmp_path_factory.mktemp("odd") / "data", per_class=8)
    to_pil(pattern(0, 20, np.random.default_rng(1)), "L").save(odd(root / "left bar", ODD_NAME))
    odd(root / "left bar", BROKEN_NAME).write_bytes(b"not a jpeg")
    os.mkfifo(root / "left bar" / "pipe.png")
    os.symlink("/dev/zero", root / "right bar" / "zero.jpg")
    os.symlink(sorted((root / "left bar").glob("img*"))[0], root / "top bar" / "link.png")
    Image.fromarray(pattern(2, 20, np.random.default_rng(2)).astype(np.float32)).save(root / "top bar" / "f.tif")
    (root / "empty class" / "sub").mkdir(parents=True)
    return root


@pytest.fixture(scope="module")
def odd_run(odd_data, cache_dir):
    out = odd_data.parent / "run"
    result = imgclf("train", odd_data, *TRAIN, "--skip-bad-images", "--out", out, timeout=120,
                    env={"IMGCLF_CACHE_DIR": str(cache_dir)})
    assert result.returncode == 0, result.stderr
    return out, result


def deny_env(tmp_path: Path, *folders: Path) -> dict:
    """Environment for a CLI run in which listing ``folders`` fails as if permission were denied."""
    hook = tmp_path / "deny_hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(DENY_HOOK)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")])),
            "IMGCLF_TEST_DENY": os.pathsep.join(map(str, folders))}


def test_train_reads_odd_data_with_a_warning_for_every_skipped_or_merged_file(odd_run):
    out, result = odd_run
    err = result.stderr
    assert "left bar/pipe.png (FIFO)" in err and "right bar/zero.jpg (character device)" in err
    assert "top bar/link.png as 'top bar' pool repeats left bar/img 000" in err
    assert "empty class holds no image files" in err and "Traceback" not in err
    split_csv = (out / "split.csv").read_bytes()
    assert b"left bar/" + ODD_NAME + b"," in split_csv and b"top bar/f.tif," in split_csv
    assert b"link.png" not in split_csv and b"pipe.png" not in split_csv and b"zero.jpg" not in split_csv
    assert b"\\udcfe" in (out / "dataset.json").read_bytes()  # valid UTF-8 JSON, the name escaped
    skipped = json.loads((out / "dataset.json").read_text(encoding="utf-8"))["skipped"]
    assert [os.fsencode(p) for p, _ in skipped] == [os.fsencode(odd(Path(skipped[0][0]).parent, BROKEN_NAME))]
    assert BROKEN_NAME in (out / "skipped_images.csv").read_bytes()


def test_audit_reads_odd_data_without_hanging(odd_data, tmp_path):
    result = imgclf("audit", odd_data, "--no-near", "--json", tmp_path / "a.json", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pipe.png (FIFO)" in result.stderr and "link.png as 'top bar'" in result.stderr
    report = json.loads((tmp_path / "a.json").read_text(encoding="utf-8"))
    assert report["images"] == 3 * 8 + 3  # the odd name, the broken file and the float TIFF; no link, no FIFO
    assert [os.fsencode(Path(p).name) for p, _ in report["unreadable"]] == [BROKEN_NAME]


def test_predict_skips_special_files_in_a_folder_and_keeps_odd_names(odd_run, odd_data, tmp_path):
    out, _ = odd_run
    result = imgclf("predict", out, odd_data / "left bar", "--skip-bad-images", "--out", tmp_path / "p.csv",
                    timeout=60)
    assert result.returncode == 0, result.stderr
    assert "pipe.png (FIFO)" in result.stderr
    preds = Predictions.from_csv(tmp_path / "p.csv")
    assert str(odd(odd_data / "left bar", ODD_NAME)) in preds.paths and len(preds.paths) == 9


def test_predict_on_a_named_fifo_is_an_error(odd_run, odd_data):
    out, _ = odd_run
    result = imgclf("predict", out, odd_data / "left bar" / "pipe.png", timeout=60)
    assert_clean_error(result, "pipe.png is a FIFO, not an image file")


def test_a_truncated_cache_file_is_rebuilt_with_a_warning(odd_run, odd_data, cache_dir):
    _, first = odd_run
    entry = Path(re.search(r"decoding \d+ images once into (\S+\.npy)", first.stderr).group(1))
    entry.write_bytes(entry.read_bytes()[:-100])
    result = imgclf("train", odd_data, *TRAIN, "--skip-bad-images", "--out", odd_data.parent / "run2",
                    timeout=120, env={"IMGCLF_CACHE_DIR": str(cache_dir)})
    assert result.returncode == 0, result.stderr
    assert f"decode cache entry {entry} is damaged" in result.stderr and "rebuilding it" in result.stderr
    assert np.load(entry).shape[0] == 3 * 8 + 3


@pytest.mark.parametrize(("command", "where", "fragments"), [
    ("train", "left bar", ["cannot read folder", "left bar: permission denied"]),
    ("audit", "left bar", ["cannot read folder", "left bar: permission denied"]),
    ("audit", "left bar/deeper", ["cannot read folder", "left bar/deeper: permission denied"]),
    ("audit", ".", ["cannot read dataset folder", "permission denied"]),
])
def test_an_unreadable_folder_is_one_line_naming_it(tmp_path, command, where, fragments):
    """Permission denial is simulated through a sitecustomize hook (we run as root)."""
    data = make_class_folders(tmp_path / "data", per_class=4)
    (data / "left bar" / "deeper").mkdir()
    args = [*TRAIN, "--out", tmp_path / "r"] if command == "train" else []
    result = imgclf(command, data, *args, timeout=60, env=deny_env(tmp_path, data / where))
    assert_clean_error(result, *fragments)


def test_an_unreadable_split_folder_is_one_line(tmp_path):
    """Permission denial is simulated through a sitecustomize hook (we run as root)."""
    data = make_split_folders(tmp_path / "data", {"train": 4, "test": 2})
    result = imgclf("train", data, *TRAIN, "--out", tmp_path / "r", timeout=60,
                    env=deny_env(tmp_path, data / "test"))
    assert_clean_error(result, f"cannot read split folder {data / 'test'}: permission denied")


def test_a_csv_row_with_an_empty_label_names_its_line(tmp_path):
    labels = make_csv(tmp_path, per_class=4, with_split=False)
    rows = list(csv.reader(labels.open()))
    rows[3][1] = " "
    with labels.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    result = imgclf("audit", labels, timeout=60)  # the scan train uses too, without importing torch
    assert_clean_error(result, f"{labels}:4: the label of '{rows[3][0]}' is empty")


def test_a_csv_listing_a_device_names_its_line(tmp_path):
    labels = make_csv(tmp_path, per_class=3, with_split=False)
    os.symlink("/dev/zero", tmp_path / "images" / "zero.png")
    labels.write_text(labels.read_text() + "images/zero.png,left bar\n")
    result = imgclf("audit", labels, timeout=60)
    assert_clean_error(result, f"{labels}:11: 'images/zero.png' is a character device, not a regular file")


def test_a_float_tiff_holding_nan_is_an_unreadable_image(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=4)
    pixels = pattern(0, 20, np.random.default_rng(0)).astype(np.float32)
    pixels[3, 3] = np.nan
    Image.fromarray(pixels).save(data / "left bar" / "nan.tif")
    result = imgclf("train", data, *TRAIN, "--out", tmp_path / "r", timeout=120)
    assert_clean_error(result, "nan.tif", "NaN or infinite", "--skip-bad-images")
