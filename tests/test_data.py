import logging
import shutil

import pytest

from imgclf.config import DataConfig
from imgclf.data import build_index, detect_layout
from imgclf.errors import DataError

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
    with caplog.at_level(logging.WARNING, logger="imgclf"):
        index = index_of(pool_dataset)
    assert index.classes == ("left bar", "right bar", "top bar")
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "1 non-image file" in messages and "notes.txt" in messages
    assert "empty class" in messages and "Thumbs" not in messages and "DS_Store" not in messages


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


def test_single_class_is_an_error(tmp_path):
    with pytest.raises(DataError, match="at least 2 classes"):
        index_of(make_class_folders(tmp_path / "d", 5, classes=["only"]))
