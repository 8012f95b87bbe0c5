"""Data ingestion never reads a dataset otherwise than it looks without saying so: fold folders are not classes,
Kaggle's Training/Testing are splits, split-like class folders and loose images beside split folders are said,
and a file decodes by its format, not its content (16-bit PGM, PNG transparency)."""

import logging
import re
import shutil

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.config import DataConfig
from imgclf.data.images import load_image
from imgclf.data.index import build_index
from imgclf.errors import DataError
from imgclf.logs import get_logger

from conftest import tiny_config
from imagefactory import make_class_folders, make_csv, make_split_folders


@pytest.fixture
def logged(caplog):
    logger = get_logger()
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    yield caplog
    logger.removeHandler(caplog.handler)


def index_of(path, **data):
    return build_index(DataConfig(path=str(path), **data), 0)


def test_fold_folders_given_to_train_are_refused_not_read_as_classes(tmp_path):
    for i in range(2):
        make_split_folders(tmp_path / "data" / f"Fold{i}", {"train": 4, "valid": 2, "test": 2}, seed=i)
    with pytest.raises(DataError, match="holds cross-validation folds \\(Fold0, Fold1...\\), not class folders"):
        index_of(tmp_path / "data")
    assert index_of(tmp_path / "data" / "Fold0").classes == ("left bar", "right bar", "top bar")  # one fold trains
    explicit = index_of(tmp_path / "data", layout="class_folders")  # asked for by name: read as asked
    assert explicit.classes == ("Fold0", "Fold1")


def test_training_and_testing_folders_are_splits(tmp_path):
    make_split_folders(tmp_path / "data", {"Training": 6, "Testing": 3})
    index = index_of(tmp_path / "data")
    assert set(index.splits) == {"train", "val", "test"} and "Training" not in index.classes
    assert index.counts()["test"] == {name: 3 for name in index.classes}


def test_class_folders_that_all_hold_the_same_sub_folders_are_said_to_look_like_splits(tmp_path, logged):
    make_split_folders(tmp_path / "data", {"seg_train": 6, "seg_test": 3})
    index = index_of(tmp_path / "data")
    assert index.classes == ("seg_test", "seg_train")  # read as asked...
    assert "each hold the same sub-folders (left bar, right bar, top bar)" in logged.text  # ...and said
    logged.clear()
    index_of(make_class_folders(tmp_path / "plain", 4))
    assert "same sub-folders" not in logged.text


def test_images_beside_split_folders_are_said_not_read(tmp_path, logged):
    data = make_split_folders(tmp_path / "data", {"train": 6, "val": 2})
    shutil.copy(next((data / "train" / "left bar").iterdir()), data / "stray.png")
    index = index_of(data)
    assert "stray.png" not in index.paths and len(index) == 24
    assert "1 image(s) directly in" in logged.text and "(stray.png, ...) are not read" in logged.text


def test_a_16_bit_pgm_decodes_by_its_bit_depth_whatever_its_values(tmp_path):
    dark = np.full((8, 8), 250, np.uint16)
    bright = dark.copy()
    bright[0, 0] = 300
    for name, values in (("dark.pgm", dark), ("bright.pgm", bright)):
        Image.fromarray(values).save(tmp_path / name)
    assert Image.open(tmp_path / "dark.pgm").mode == "I"  # how Pillow opens it: the content decided, before
    assert load_image(tmp_path / "dark.pgm", 8, 1)[4, 4, 0] == load_image(tmp_path / "bright.pgm", 8, 1)[4, 4, 0] == 1


@pytest.mark.parametrize("mode,white,channels", [("RGB", (255, 255, 255), 3), ("L", 255, 1)])
def test_a_pngs_transparent_colour_is_composited_onto_black_as_alpha_is(tmp_path, mode, white, channels):
    Image.new(mode, (8, 8), white).save(tmp_path / "t.png", transparency=white)
    assert (load_image(tmp_path / "t.png", 8, channels) == 0).all()
    Image.new(mode, (8, 8), white).save(tmp_path / "opaque.png")
    assert (load_image(tmp_path / "opaque.png", 8, channels) == 255).all()


def test_class_names_that_differ_only_in_case_are_said(tmp_path, logged):
    data = make_class_folders(tmp_path / "data", 4, classes=["Cat", "cat", "dog"])
    assert index_of(data).classes == ("Cat", "cat", "dog")
    assert "classes 'Cat', 'cat' differ only in letter case" in logged.text
    logged.clear()  # one folder typed with a composed é, the other with e and a combining accent: they print alike
    composed, decomposed = "\u00e9l\u00e9phant", "e\u0301le\u0301phant"
    data = make_class_folders(tmp_path / "accents", 4, classes=[composed, decomposed, "dog"])
    assert len(index_of(data).classes) == 3
    assert f"classes {decomposed!a}, {composed!a} differ only in letter case, accents' Unicode" in logged.text


@pytest.mark.parametrize("label,said", [("cat\nINJECT: a forged line", "holds a control character"),
                                        ("x" * 300, "is 300 characters long")])
def test_a_class_name_no_summary_can_show_is_refused(tmp_path, label, said):
    """A CSV label (or a folder name) with a line break forged lines in every summary naming it; one of 100 kB was
    printed whole. Training refuses them as a run file's reader does."""
    csv_path = make_csv(tmp_path, per_class=4, with_split=False)
    lines = csv_path.read_text().splitlines()
    first = lines[1].rsplit(",", 1)[0]
    csv_path.write_text("\n".join([lines[0], f'{first},"{label}"', *lines[2:]]) + "\n")
    with pytest.raises(DataError, match=said) as err:
        index_of(csv_path)
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def test_csv_columns_train_does_not_read_are_said(tmp_path, logged):
    csv_path = make_csv(tmp_path, per_class=4, with_split=False)
    rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([rows[0] + ",patient_id"] + [f"{row},p{i % 3}" for i, row in enumerate(rows[1:])]))
    index_of(csv_path)
    assert "column(s) patient_id are not read" in logged.text and "--group-column COLUMN keeps each group in one " \
        "split" in logged.text


def with_patients(csv_path, per_patient: int = 2):
    rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([rows[0] + ",patient_id"] +
                                  [f"{row},p{i // per_patient}" for i, row in enumerate(rows[1:])]))
    return {row.split(",")[0]: f"p{i // per_patient}" for i, row in enumerate(rows[1:])}


def test_group_column_keeps_each_patient_in_one_split(tmp_path, logged):
    """train had no --group-column: a patient's images were split at random between train, val and test."""
    csv_path = make_csv(tmp_path, per_class=20, with_split=False)
    patient = with_patients(csv_path)
    index = index_of(csv_path, group_column="patient_id")
    by_split: dict[str, set] = {}
    for path, split in zip(index.paths, index.splits, strict=True):
        by_split.setdefault(split, set()).add(patient[path])
    assert set(by_split) == {"train", "val", "test"}
    assert not (by_split["train"] & by_split["val"] or by_split["train"] & by_split["test"]
                or by_split["val"] & by_split["test"])
    assert 0.08 < index.splits.count("test") / len(index) < 0.25  # about 1/7, whole patients at a time
    assert "not read" not in logged.text  # the group column is read
    at_random = index_of(csv_path)  # without it, the same patients do span splits
    assert {patient[p] for p, s in zip(at_random.paths, at_random.splits, strict=True) if s == "train"} & \
        {patient[p] for p, s in zip(at_random.paths, at_random.splits, strict=True) if s == "test"}


def test_group_column_mistakes_are_one_line_and_a_given_split_that_mixes_groups_is_said(tmp_path, logged):
    csv_path = make_csv(tmp_path / "pool", per_class=6, with_split=False)
    with_patients(csv_path)
    with pytest.raises(DataError, match=r"has no 'patient' column \(found \['path', 'label', 'patient_id'\]\); give "
                                        "--group-column one of its columns"):
        index_of(csv_path, group_column="patient")
    with pytest.raises(DataError, match="--group-column 'patient_id' needs a CSV dataset with that column"):
        index_of(make_class_folders(tmp_path / "folders", 4), group_column="patient_id")
    given = make_csv(tmp_path / "given", per_class=10, with_split=True)  # rows cycle train,train,train,val,test
    with_patients(given, per_patient=4)
    index = index_of(given, group_column="patient_id")
    assert "group(s) of its own split are in two splits (first: 'p0' in train+val); the split is kept as the CSV " \
        "gives it" in logged.text
    assert index.splits.count("test") == 6  # kept as given


def test_grouped_splits_say_the_shares_they_took_and_refuse_what_they_cannot_do(tmp_path, logged):
    csv_path = make_csv(tmp_path / "pool", per_class=20, with_split=False)
    with_patients(csv_path, per_patient=5)
    logged.set_level(logging.INFO)
    index = index_of(csv_path, group_column="patient_id", val_fraction=0.7, test_fraction=0.2)  # whole groups
    n, test, val = len(index), index.splits.count("test"), index.splits.count("val")
    assert f"split by patient_id, whole groups at a time: test {test} of {n} images ({test / n:.2f}, asked 0.2), " \
        f"val {val} of {n} images ({val / n:.2f}, asked 0.7)" in logged.text and val / n < 0.6  # said, not silent
    with pytest.raises(ValueError, match="'Label' is a column the dataset CSV gives its own meaning"):
        DataConfig(path=str(csv_path), group_column="Label")  # every class one group: nothing to stratify
    rows = csv_path.read_text().splitlines()  # a second path column: the scan reads one, the groups another
    csv_path.write_text("\n".join([rows[0] + ",PATH"] + [f"{r},{r.split(',')[0]}" for r in rows[1:]]))
    with pytest.raises(DataError, match="the header names column.s. path twice; keep one of each"):
        index_of(csv_path, group_column="patient_id")  # was a KeyError's traceback
    csv_path.write_text("\n".join([rows[0]] + [r.rsplit(",", 1)[0] + "," for r in rows[1:3]] + rows[3:]))
    index_of(csv_path, group_column="patient_id")
    assert "2 image(s) have no 'patient_id'; they are held out or kept together, as one group" in logged.text


def test_a_class_whose_every_image_is_one_group_is_said_to_miss_from_val_or_test(tmp_path, logged):
    csv_path = make_csv(tmp_path, per_class=12, with_split=False)
    rows = csv_path.read_text().splitlines()
    first = rows[1].split(",")[1]  # every image of the first class: one patient
    csv_path.write_text("\n".join([rows[0] + ",patient_id"] + [f"{r},{'one' if r.split(',')[1] == first else i}"
                                                                for i, r in enumerate(rows[1:])]))
    index = index_of(csv_path, group_column="patient_id")
    missing = [s for s in ("val", "test") if first not in {lbl for lbl, sp in zip(index.labels, index.splits,
                                                                                   strict=True) if sp == s}]
    assert missing and all(f"no {s} image of class {first!r}" in logged.text for s in missing)


def test_a_class_whose_every_training_image_is_skipped_is_refused(tmp_path):
    data = make_class_folders(tmp_path / "data", 6, classes=["good", "broken"])
    for image in (data / "broken").iterdir():
        image.write_bytes(b"not an image")
    config = tiny_config(data, tmp_path / "run", data={"skip_bad_images": True})
    with pytest.raises(DataError, match="every training image of class 'broken' is unreadable"):
        imgclf.train(config)


def test_nearest_interpolation_of_a_jpeg_picks_pixels_and_does_not_average_them(tmp_path):
    board = (np.indices((64, 64)).sum(axis=0) // 2 % 2 * 255).astype(np.uint8)  # 2-pixel checkerboard
    Image.fromarray(board).save(tmp_path / "board.jpg", quality=100)
    nearest = load_image(tmp_path / "board.jpg", 16, 1, "nearest")
    assert ((nearest < 40) | (nearest > 215)).all()  # pixels picked, black or white (the DCT draft gives ~128)
    assert 90 < load_image(tmp_path / "board.jpg", 16, 1, "bilinear").mean() < 165


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda lines: ["path,label,label", *(f"{row},other" for row in lines[1:])],
     "the header names column(s) label twice; keep one of each"),  # the second label won
    (lambda lines: ["path,label", *(f"{row},train" for row in lines[1:])],
     ":2: 3 values, the header names 2 columns"),  # the split column was dropped: a random split instead
])
def test_a_csv_whose_rows_and_header_disagree_is_refused_not_read_in_part(tmp_path, edit, fragment):
    labels = make_csv(tmp_path, 4, with_split=False)
    labels.write_text("\n".join(edit(labels.read_text().splitlines())) + "\n")
    with pytest.raises(DataError, match=re.escape(fragment)):
        index_of(labels)


def test_pgm_images_in_class_folders_are_read_not_skipped_as_other_files(tmp_path):
    data = make_class_folders(tmp_path / "data", per_class=3)
    for folder in data.iterdir():
        Image.fromarray(np.full((8, 8), 300, np.uint16)).save(folder / "scan.pgm")
    assert sum(p.endswith("scan.pgm") for p in index_of(data).paths) == 3


def test_a_file_copied_under_another_class_is_said_when_training(tmp_path, logged):
    """Byte-identical images under two labels: one of them is wrong; train only looked across splits."""
    data = make_class_folders(tmp_path / "data", per_class=6)
    shutil.copy(data / "left bar" / "img 000.jpg", data / "right bar" / "copy.jpg")
    imgclf.train(tiny_config(data, tmp_path / "run", train={"epochs": 1}))
    assert "1 image(s) are byte-identical files under different labels, e.g. left bar:" in logged.text
    assert "right bar:" + str(data / "right bar" / "copy.jpg") in logged.text
