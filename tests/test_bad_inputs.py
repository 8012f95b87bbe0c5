"""The bad-input corpus: every case has a documented behaviour, and the CLI never prints a traceback.

- zero-byte, truncated JPEG/PNG, text as .jpg, HTML as .png, 1x1, a 40000x40000 header, a symlink
  loop: an error naming the file and --skip-bad-images; with that flag, skipped and listed;
- 16-bit PNG, CMYK JPEG, palette PNG with transparency, animated GIF, EXIF-rotated JPEG, DICOM:
  decoded by the documented mode rule;
- unicode and space names, upper-case extensions, nested folders inside a class: read normally;
- .DS_Store and Thumbs.db: ignored; hidden images and folders and other non-image files: skipped with a
  counted warning;
- a class folder with no images: skipped with a warning;
- the same file in train and test: trains with a leakage warning; ``imgclf audit --strict`` exits 1.
No read permission cannot be tested as root (root reads anything); images.py maps it to "permission denied".
"""

import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

import imgclf
from imgclf.cli import main
from imgclf.data.audit import audit_dataset
from imgclf.data.images import BadImage, load_image
from imgclf.errors import DataError, RunDirError
from imgclf.runs.base import open_run

from conftest import tiny_config
from imagefactory import make_split_folders, pattern, to_pil, write_dicom

# the bad-input corpus: every case ends within a bound, so a hang fails instead of blocking CI
pytestmark = pytest.mark.timeout(300)


def bomb_png(path):
    """A valid 1x1 PNG whose header claims 40000 x 40000 pixels."""
    ihdr = struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(  # noqa: E731
        ">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0\0"))
                     + chunk(b"IEND", b""))


def truncated(path, fmt):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, format=fmt)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD = {
    "zero.jpg": lambda p: p.write_bytes(b""),
    "cut.jpg": lambda p: truncated(p, "JPEG"),
    "cut.png": lambda p: truncated(p, "PNG"),
    "text.jpg": lambda p: p.write_text("not an image"),
    "page.png": lambda p: p.write_text("<html><body>Not found</body></html>"),
    "dot.png": lambda p: Image.new("RGB", (1, 1)).save(p),
    "bomb.png": bomb_png,
    "loop.jpg": lambda p: (os.symlink(p.with_name("loop2.jpg"), p), os.symlink(p, p.with_name("loop2.jpg"))),
}


def exif_rotated(path):
    img = to_pil(pattern(1, 24, np.random.default_rng(1)), "RGB")
    exif = img.getexif()
    exif[0x0112] = 3
    img.save(path, exif=exif)


def palette_with_transparency(path):
    img = to_pil(pattern(1, 24, np.random.default_rng(2)), "P")
    img.info["transparency"] = 0
    img.save(path, transparency=0)


def animated_gif(path):
    frames = [to_pil(pattern(1, 24, np.random.default_rng(s)), "L") for s in (3, 4)]
    frames[0].save(path, save_all=True, append_images=frames[1:])


GOOD = {
    "sixteen bit.png": lambda p: to_pil(pattern(1, 24, np.random.default_rng(5)), "I;16").save(p),
    "cmyk.JPG": lambda p: to_pil(pattern(1, 24, np.random.default_rng(6)), "CMYK").save(p),
    "palette.png": palette_with_transparency,
    "anim.gif": animated_gif,
    "rotated.jpeg": exif_rotated,
    "ünïcödé name.PNG": lambda p: to_pil(pattern(1, 24, np.random.default_rng(7)), "RGB").save(p),
    "scan.dcm": lambda p: write_dicom(p, pattern(1, 24, np.random.default_rng(8)) * 4000),
}


@pytest.fixture
def corpus(tmp_path):
    """A split-folders dataset whose class 'right bar' of train holds every bad and odd case."""
    root = make_split_folders(tmp_path / "data", {"train": 10, "test": 3})
    target = root / "train" / "right bar"
    for name, make in {**BAD, **GOOD}.items():
        make(target / name)
    (target / "nested" / "deeper").mkdir(parents=True)
    to_pil(pattern(1, 24, np.random.default_rng(9)), "L").save(target / "nested" / "deeper" / "n.png")
    (target / ".DS_Store").write_bytes(b"\0")
    (target / "Thumbs.db").write_bytes(b"\0")
    (target / "readme.txt").write_text("notes")
    (root / "train" / "empty class").mkdir()
    leaked = sorted((root / "train" / "left bar").iterdir())[0]
    (root / "test" / "left bar" / "copied.png").write_bytes(leaked.read_bytes())
    return root


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_file_is_a_bad_image_naming_it(corpus, name):
    with pytest.raises(BadImage) as err:
        load_image(corpus / "train" / "right bar" / name, 16, 3)
    assert name in str(err.value) and "--skip-bad-images" in str(err.value)


@pytest.mark.parametrize("name", sorted(GOOD))
def test_each_odd_but_valid_file_decodes_with_its_bright_bar(corpus, name):
    array = load_image(corpus / "train" / "right bar" / name, 24, 1)[..., 0].astype(float)
    if name == "rotated.jpeg":
        array = array[:, ::-1]  # EXIF 3 = rotated 180 degrees: the bar is now on the left
    assert array[:, -6:].mean() > array[:, :6].mean() + 40, name


def test_cli_on_the_whole_corpus_names_a_bad_file_then_skips_them_all(corpus, tmp_path, capsys):
    flags = ["--image-size", "16", "--conv-filters", "8", "--epochs", "1", "--augment", "none"]
    assert main(["train", str(corpus), *flags, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("imgclf: error:")]
    assert len(errors) == 1 and "Traceback" not in err and "--skip-bad-images" in errors[0]
    assert main(["train", str(corpus), *flags, "--skip-bad-images", "--out", str(tmp_path / "r2")]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    skipped = (tmp_path / "r2" / "skipped_images.csv").read_text()
    assert all(name in skipped for name in BAD) and not any(name in skipped for name in GOOD)
    assert "appear in more than one split" in captured.err  # the copied file: leakage warning
    assert "1 non-image file" in captured.err and "empty class" in captured.err


def test_audit_reports_leakage_and_unreadable_files(corpus, tmp_path, capsys):
    report = audit_dataset(corpus)
    assert len(report["exact_duplicates_across_splits"]) == 1
    assert any(a[0] != b[0] for a, b, _ in report["near_duplicates_across_splits"])
    assert {os.path.basename(p) for p, _ in report["unreadable"]} == set(BAD) | {"loop2.jpg"}
    assert report["counts"]["test"]["left bar"] == 4 and report["imbalance_ratio"]["train"] > 1
    assert main(["audit", str(corpus), "--strict", "--json", str(tmp_path / "a.json")]) == 1
    out = capsys.readouterr().out
    assert "across splits (leakage)" in out and (tmp_path / "a.json").is_file()


def test_a_clean_dataset_passes_audit_strict(pool_dataset, capsys):
    assert main(["audit", str(pool_dataset), "--strict"]) == 0


def test_tampered_or_truncated_checkpoint_is_a_clear_error(trained_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run.path, copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(RunDirError, match="model.safetensors changed since the run was sealed"):
        imgclf.load_run(copy)
    (copy / "manifest.json").unlink()  # without the seal, the loaders' own checks still refuse the files
    with pytest.raises(RunDirError, match="damaged or truncated"):
        imgclf.load_run(copy).model  # noqa: B018
    (copy / "model.json").write_text("{not json")
    with pytest.raises(RunDirError, match="model.json is damaged"):
        imgclf.load_run(copy).meta  # noqa: B018


def test_a_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, pool_dataset, monkeypatch):
    from imgclf.models.objective import Objective

    real_loss, calls = Objective.loss, []

    def loss_that_turns_nan(self, logits, targets):  # 3 batches an epoch: NaN from epoch 3 on
        calls.append(1)
        out = real_loss(self, logits, targets)
        return out * float("nan") if len(calls) > 6 else out

    monkeypatch.setattr(Objective, "loss", loss_that_turns_nan)
    with pytest.raises(imgclf.ImgclfError, match="training diverged.*lower --lr"):
        imgclf.train(tiny_config(pool_dataset, tmp_path / "r", train={"epochs": 5}))
    with pytest.raises(RunDirError, match="has not finished"):  # a diverged run is not a finished one
        imgclf.load_run(tmp_path / "r")
    good = open_run(tmp_path / "r")  # but its last good checkpoint is kept
    assert good.meta.epoch <= 2 and np.isfinite(next(good.model.parameters()).detach().numpy()).all()


def test_empty_data_is_an_error(tmp_path):
    (tmp_path / "d" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        imgclf.train(tiny_config(tmp_path / "d", tmp_path / "r"))


def test_near_duplicates_count_every_pair_but_list_a_bounded_number(tmp_path, monkeypatch):
    """n identical images make n^2/2 pairs (2e8 for 20,000 blank ones): counted, not all kept in memory."""
    from imgclf.data import audit

    paths = []
    for k in range(40):
        paths.append(tmp_path / f"blank{k}.png")
        Image.new("L", (32, 32), 0).save(paths[-1])
    splits = ["train"] * 20 + ["test"] * 20
    monkeypatch.setattr(audit, "MAX_LISTED_PAIRS", 50)
    found = audit.near_duplicates(paths, splits)
    assert found["near_duplicate_pairs"] == 40 * 39 // 2 and found["near_duplicate_pairs_across_splits"] == 20 * 20
    assert len(found["near_duplicates"]) == len(found["near_duplicates_across_splits"]) == 50
    assert all(a[0] != b[0] for a, b, _ in found["near_duplicates_across_splits"])  # its own list, never crowded out
    merged = audit.merge_near([found, found])
    assert merged["near_duplicate_pairs"] == 2 * 780 and len(merged["near_duplicates"]) == 50
    assert "near duplicates: 780 pair(s), 400 across splits (--json lists the first 50 of each)" in audit.format_report(
        {**audit.audit_dataset(make_split_folders(tmp_path / "data", {"train": 3, "test": 2}), near=False), **found})
