import logging
import os
import shutil
from pathlib import Path

import pytest

import imgclf
from imgclf.config import DataConfig, build_config
from imgclf.data.index import DatasetIndex, build_index, detect_layout
from imgclf.errors import ConfigError, DataError
from imgclf.workflows.settings import check_paths

from conftest import tiny_config
from imagefactory import make_class_folders, make_csv, make_split_folders


def index_of(path, seed=0, **data):
    return build_index(DataConfig(path=str(path), **data), seed)


def test_class_folder_pool_is_split_stratified_and_seeded(pool_dataset):
    a = index_of(pool_dataset, seed=1, val_fraction=0.2, test_fraction=0.2)
    b = index_of(pool_dataset, seed=1, val_fraction=0.2, test_fraction=0.2)
    c = index_of(pool_dataset, seed=2, val_fraction=0.2, test_fraction=0.2)
    assert detect_layout(pool_dataset) == "class_folders"
    assert a == b and a.paths != c.paths  # same seed, same split; another seed, another
    counts = a.counts()
    assert a.classes == ("left bar", "right bar", "top bar")  # sorted, spaces kept
    for split, expected in (("train", 8), ("val", 3), ("test", 3)):
        assert set(counts[split].values()) == {expected}  # 14 per class: 3 test, 3 val, 8 train


def test_val_and_test_of_a_pool_take_their_shares_of_each_class_alike(tmp_path):
    """0.3 and 0.3 of 8 images a class: 2 and 2 (val took 0.3/0.7 of the 6 test left: 3, so 9 val to 6 test)."""
    counts = index_of(make_class_folders(tmp_path / "d", per_class=8), val_fraction=0.3, test_fraction=0.3).counts()
    assert [set(counts[split].values()) for split in ("train", "val", "test")] == [{4}, {2}, {2}]


def test_split_folders_with_missing_val_take_val_from_train(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 10, "test": 4})
    index = index_of(root, val_fraction=0.3)
    counts = index.counts()
    assert detect_layout(root) == "split_folders"
    assert counts["test"] == dict.fromkeys(index.classes, 4)
    assert counts["val"] == dict.fromkeys(index.classes, 3) and counts["train"] == dict.fromkeys(index.classes, 7)
    test_paths = {p for p, s in zip(index.paths, index.splits, strict=True) if s == "test"}
    assert all(p.startswith("test/") for p in test_paths)


@pytest.mark.parametrize("alias", ["val", "valid", "validation"])
def test_val_folder_aliases(tmp_path, alias):
    root = make_split_folders(tmp_path / "d", {"train": 4, alias: 2})
    assert index_of(root).counts()["val"] == dict.fromkeys(("left bar", "right bar", "top bar"), 2)


def test_test_split_with_a_class_train_lacks_is_an_error(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 4}, classes=["covid", "normal", "pneumonia"])
    make_class_folders(root / "test", 3, classes=["covid", "normal", "pneumonia", "tuberculosis"])
    with pytest.raises(DataError, match="test split holds class.*'tuberculosis' \\(3 images\\) that train lacks"):
        index_of(root)


def test_empty_split_folder_is_an_error(tmp_path):
    root = make_split_folders(tmp_path / "d", {"train": 4})
    (root / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        index_of(root)


def test_hidden_files_ignored_non_images_and_empty_classes_warned(pool_dataset, caplog):
    (pool_dataset / "left bar" / ".DS_Store").write_bytes(b"\0")
    (pool_dataset / "left bar" / "Thumbs.db").write_bytes(b"\0")
    (pool_dataset / "left bar" / "notes.txt").write_text("x")
    (pool_dataset / "empty class").mkdir()
    (pool_dataset / ".hidden class").mkdir()
    (pool_dataset / "top bar" / ".old").mkdir()
    (pool_dataset / "top bar" / ".ipynb_checkpoints").mkdir()  # a tool's: not worth a word
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        index = index_of(pool_dataset)
    assert index.classes == ("left bar", "right bar", "top bar")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "1 non-image file" in messages and "notes.txt" in messages
    assert "empty class" in messages and "Thumbs" not in messages and "DS_Store" not in messages
    assert "did not search 2 hidden folder(s)" in messages  # not a class, not searched, but said
    assert ".hidden class" in messages and "top bar/.old" in messages and "ipynb" not in messages


def test_a_hidden_image_and_a_linked_sub_folder_are_counted_in_warnings_not_dropped_in_silence(pool_dataset, caplog,
                                                                                              tmp_path):
    source = sorted((pool_dataset / "left bar").iterdir())[0]
    shutil.copy(source, pool_dataset / "left bar" / ".copy.png")
    shutil.copy(source, pool_dataset / "left bar" / "._fork.png")  # macOS's resource fork: not an image
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(source, outside / "x.png")
    (pool_dataset / "top bar" / "more").symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        index = index_of(pool_dataset)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 1 hidden image file(s)" in messages and ".copy.png" in messages and "fork" not in messages
    assert "did not follow 1 linked folder(s)" in messages and "top bar/more" in messages
    assert not any(".copy" in p or "more/" in p for p in index.paths)


def test_nested_folders_belong_to_their_class_and_unicode_names_work(tmp_path):
    root = make_class_folders(tmp_path / "d", 8, classes=["Ärzte", "normal"])
    moved = sorted((root / "normal").iterdir())[0]
    (root / "normal" / "sub" / "deeper").mkdir(parents=True)
    shutil.move(moved, root / "normal" / "sub" / "deeper" / moved.name)
    index = index_of(root)
    assert f"normal/sub/deeper/{moved.name}" in index.paths
    assert index.counts()["train"]["normal"] + index.counts()["val"]["normal"] + index.counts()["test"]["normal"] == 8
    assert index.classes == ("normal", "Ärzte")


def test_csv_with_and_without_split_column(tmp_path):
    with_split = index_of(make_csv(tmp_path / "a", 10, with_split=True))
    assert detect_layout(tmp_path / "a" / "labels.csv") == "csv"
    assert set(with_split.splits) == {"train", "val", "test"}
    pool = index_of(make_csv(tmp_path / "b", 10, with_split=False, delimiter="\t"))
    assert set(pool.splits) == {"train", "val", "test"}
    assert all((pool.root / p).is_file() for p in pool.paths)


def test_csv_naming_a_missing_file_is_an_error(tmp_path):
    csv_path = make_csv(tmp_path / "a", 4, with_split=False)
    csv_path.write_text(csv_path.read_text() + "images/nope.png,left bar\n")
    with pytest.raises(DataError, match="nope.png"):
        index_of(csv_path)


def test_a_class_with_one_image_stays_in_train(tmp_path):
    root = make_class_folders(tmp_path / "d", 10, classes=["common", "rare"])
    for extra in sorted((root / "rare").iterdir())[1:]:
        extra.unlink()
    index = index_of(root)
    assert index.counts()["train"]["rare"] == 1


@pytest.mark.parametrize(("rare_images", "expected"), [(2, {"train": 1, "val": 1}),
                                                         (3, {"train": 2, "val": 1}),
                                                         (4, {"train": 2, "val": 1})])  # 4: one goes to test first
def test_a_tiny_class_keeps_one_validation_image_and_is_named_in_a_warning(tmp_path, caplog, rare_images,
                                                                           expected):
    root = make_class_folders(tmp_path / "d", 20, classes=["common", "rare"])
    for extra in sorted((root / "rare").iterdir())[rare_images:]:
        extra.unlink()
    caplog.set_level(logging.WARNING)
    index = index_of(root, val_fraction=0.15, test_fraction=0.15)  # round(0.15 * n) is 0 for n < 4
    counts = index.counts()
    assert {split: counts.get(split, {}).get("rare", 0) for split in ("train", "val")} == expected
    assert counts["val"]["common"] == 3 and counts["test"]["common"] == 3  # large classes split as before
    warned = [r.getMessage() for r in caplog.records if "fewer than 5 training images" in r.getMessage()]
    assert len(warned) == 1 and "'rare'" in warned[0] and "'common'" not in warned[0]


def test_no_tiny_class_warning_when_every_class_has_enough_images(pool_dataset, caplog):
    caplog.set_level(logging.WARNING)
    index_of(pool_dataset)
    assert not [r for r in caplog.records if "fewer than" in r.getMessage()]


def test_single_class_is_an_error(tmp_path):
    with pytest.raises(DataError, match="at least 2 classes"):
        index_of(make_class_folders(tmp_path / "d", 5, classes=["only"]))


def deny_listing(monkeypatch, *denied: Path) -> None:
    """We run as root, which lists any folder, so denial is simulated: os.scandir raises for ``denied``."""
    real = os.scandir
    blocked = {os.path.normpath(p) for p in denied}

    def scandir(path="."):
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.normpath(os.fsdecode(path)) in blocked:
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("where", ["left bar", "left bar/sub", "."])
def test_an_unreadable_class_sub_or_root_folder_is_an_error_naming_it(pool_dataset, monkeypatch, where):
    """Permission denial simulated (root reads everything): the class is not silently dropped."""
    (pool_dataset / "left bar" / "sub").mkdir()
    folder = pool_dataset / where
    deny_listing(monkeypatch, folder)
    with pytest.raises(DataError, match="cannot read .*permission denied") as err:
        index_of(pool_dataset)
    assert str(os.path.normpath(folder)) in str(err.value) and "\n" not in str(err.value)


def test_an_unreadable_split_folder_is_an_error(tmp_path, monkeypatch):
    """Permission denial simulated on the test split folder (we run as root)."""
    root = make_split_folders(tmp_path / "d", {"train": 4, "test": 2})
    deny_listing(monkeypatch, root / "test")
    with pytest.raises(DataError, match=f"cannot read split folder {root / 'test'}: permission denied"):
        index_of(root)


def test_a_csv_row_with_an_empty_label_or_path_names_its_line(tmp_path):
    csv_path = make_csv(tmp_path / "a", 4, with_split=False)
    lines = csv_path.read_text().splitlines()
    first = lines[1].split(",")[0]
    csv_path.write_text("\n".join([*lines[:3], f"{first},  ", *lines[3:]]) + "\n")
    with pytest.raises(DataError, match=f"labels.csv:4: the label of '{first}' is empty"):
        index_of(csv_path)
    csv_path.write_text("\n".join([*lines[:2], ",left bar", *lines[2:]]) + "\n")
    with pytest.raises(DataError, match="labels.csv:3: the path is empty"):
        index_of(csv_path)


def test_a_file_listed_twice_is_used_once_under_its_first_label_with_a_warning(tmp_path, caplog):
    csv_path = make_csv(tmp_path / "a", 6, with_split=False)
    lines = csv_path.read_text().splitlines()
    path, label = lines[1].split(",")
    csv_path.write_text(csv_path.read_text() + f"{path},top bar\n./{path},{label}\n")
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        index = index_of(csv_path)
    assert index.paths.count(path) == 1 and index.labels[index.paths.index(path)] == label
    assert len(index) == 18
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "2 file(s) more than once (1 with another label)" in warning and f"{path} as 'top bar'" in warning


def test_one_file_reached_through_a_symlink_in_another_class_is_kept_once(pool_dataset, caplog):
    original = sorted((pool_dataset / "left bar").iterdir())[0]
    os.symlink(original, pool_dataset / "top bar" / "link.png")
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        index = index_of(pool_dataset)
    assert "top bar/link.png" not in index.paths and f"left bar/{original.name}" in index.paths
    assert "top bar/link.png as 'top bar'" in " ".join(r.getMessage() for r in caplog.records)


def test_fifos_and_devices_in_folders_are_skipped_with_a_warning(pool_dataset, caplog):
    os.mkfifo(pool_dataset / "left bar" / "pipe.png")
    os.symlink("/dev/zero", pool_dataset / "right bar" / "zero.jpg")
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        index = index_of(pool_dataset)
    assert len(index) == 42 and not any(p.endswith(("pipe.png", "zero.jpg")) for p in index.paths)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "left bar/pipe.png (FIFO)" in warning and "right bar/zero.jpg (character device)" in warning


def test_a_csv_listing_a_fifo_or_device_is_an_error_naming_the_line(tmp_path):
    csv_path = make_csv(tmp_path / "a", 3, with_split=False)
    os.symlink("/dev/zero", tmp_path / "a" / "images" / "zero.png")
    csv_path.write_text(csv_path.read_text() + "images/zero.png,left bar\n")
    with pytest.raises(DataError, match="labels.csv:11: 'images/zero.png' is a character device, not a regular"):
        index_of(csv_path)
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(DataError, match="fifo.csv is a FIFO"):
        index_of(tmp_path / "fifo.csv")


def test_split_csv_round_trips_names_that_are_not_utf8(tmp_path):
    root = make_class_folders(tmp_path / "d", 5)
    first = sorted((root / "left bar").iterdir())[0]
    os.rename(first, os.fsencode(first.parent) + b"/\xff\xfe.png")
    index = index_of(root)
    odd = "left bar/" + os.fsdecode(b"\xff\xfe.png")
    assert odd in index.paths and index.abspath(index.paths.index(odd)).is_file()
    index.save(tmp_path / "split.csv")
    assert b"left bar/\xff\xfe.png," in (tmp_path / "split.csv").read_bytes()
    assert DatasetIndex.load(tmp_path / "split.csv", root, list(index.classes)) == index


def test_fractions_the_splits_make_moot_and_folders_that_are_no_split_are_said(tmp_path, caplog):
    data = make_split_folders(tmp_path / "d", {"train": 4, "val": 2})
    make_class_folders(data / "holdout", 2)
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        index = build_index(DataConfig(path=str(data), val_fraction=0.5, test_fraction=0.3), 0)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "--test-fraction 0.3 and --val-fraction 0.5: no effect" in said and "holdout is not a train, val" in said
    assert "holdout" not in " ".join(map(str, index.paths)) and set(index.splits) == {"train", "val"}
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        build_index(DataConfig(path=str(data)), 0)  # defaults: nothing asked, nothing said about fractions
    assert "no effect" not in " ".join(r.getMessage() for r in caplog.records)


def test_a_class_folder_whose_name_is_not_utf8_is_refused_before_training(tmp_path):
    data = make_class_folders(tmp_path / "d", 3)
    (data / "left bar").rename(data / os.fsdecode(b"cls\xe9"))  # a name from another system's encoding
    with pytest.raises(DataError, match=r"class 'cls\\udce9' is not a valid UTF-8 name .*b'cls\\xe9'.*rename it"):
        build_index(DataConfig(path=str(data)), 0)


def test_a_run_inside_its_dataset_folder_is_refused_before_anything_is_written(tmp_path):
    data = make_class_folders(tmp_path / "d", 3)
    with pytest.raises(ConfigError, match="is inside the dataset folder .* read this run's files as images"):
        imgclf.train(tiny_config(data, data / "runx"))
    with pytest.raises(ConfigError, match="is inside the dataset folder"):
        imgclf.cross_validate(tiny_config(data, data / "cv"), folds=2)  # its folds' data are CSVs: checked first
    assert sorted(p.name for p in data.iterdir()) == ["left bar", "right bar", "top bar"]
    split = make_split_folders(tmp_path / "s", {"train": 3, "val": 2})
    check_paths(tiny_config(split, split / "runs" / "x"))  # beside train/ and val/: never read as data
    check_paths(build_config({}))  # no dataset given: that is said elsewhere
    with pytest.raises(ConfigError, match="inside the dataset folder"):
        check_paths(tiny_config(split, split / "train" / "x"))
