"""The red team's second round, on what other commands than train are given: globs, CSVs, image files and
names, output paths and memory. Each case is a one-line refusal or works, quickly, in bounded memory."""

import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clitools import assert_clean_error, run_main
from clitools import imgclf as imgclf_cli
from imgclf.data.images import integer_to_uint8, load_image, to_mode
from imgclf.errors import RunDirError
from imgclf.reporting.format import read_rows
from imgclf.serving import service as service_module

pytestmark = pytest.mark.timeout(300)  # a hang fails instead of blocking CI
FIXTURES = Path(__file__).parent / "fixtures"


def an_image(trained_run):
    return trained_run.index().abspath(0)


def test_a_glob_over_folders_that_link_back_to_themselves_ends(trained_run, tmp_path):
    folder = tmp_path / "d"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(an_image(trained_run), folder / "ok.png")
    shutil.copy(an_image(trained_run), folder / "sub" / "x.png")
    for name in ("a", "b"):  # glob's own ** follows both: 2^depth paths until the links' depth limit
        (folder / name).symlink_to(".")
    result = run_main("predict", trained_run.path, f"{folder}/**/*.png", "--out", tmp_path / "p.csv")
    assert result.returncode == 0, result.stderr
    assert "predicted 2 images" in result.stdout
    result = run_main("predict", trained_run.path, f"{folder}/**.png", "--out", tmp_path / "q.csv")
    assert result.returncode == 0 and "predicted 1 images" in result.stdout  # '**' inside a name is glob's '*'
    assert_clean_error(run_main("predict", trained_run.path, f"{folder}/**/s**/*.png", "--out", tmp_path / "r.csv"),
                       "'**' searches folders only as a whole path part")


def test_a_csv_field_over_the_csv_modules_limit_is_one_line(trained_run, tmp_path):
    listing = tmp_path / "big.csv"
    listing.write_text('path,label\n"' + "x" * 200_000 + '",cat\n')
    assert_clean_error(run_main("predict", trained_run.path, listing, "--out", tmp_path / "p.csv"),
                       "big.csv:", "not a readable CSV row", "field larger than field limit")
    assert_clean_error(run_main("audit", listing), "big.csv:", "not a readable CSV row")


def test_an_experiments_table_is_read_capped_and_checked(tmp_path):
    os.mkfifo(tmp_path / "folds.csv")
    with pytest.raises(RunDirError, match="not a regular file"):
        read_rows(tmp_path / "folds.csv")
    (tmp_path / "summary.csv").write_text('metric,mean\n"' + "x" * 200_000 + '",1\n')
    with pytest.raises(RunDirError, match="summary.csv is not a readable CSV"):
        read_rows(tmp_path / "summary.csv")


def test_explain_draws_images_whose_names_are_not_utf8_hold_dollars_or_are_long(trained_run, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    names = [os.fsdecode(b"bad\xff\xfe.png"), "cost $_$ and $\\frac$.png", "n" * 240 + ".png",
             "影像" * 40 + ".png"]  # 244 bytes: a name's limit is in bytes
    for name in names:
        shutil.copy(an_image(trained_run), folder / name)
    result = run_main("explain", trained_run.path, folder, "--out", tmp_path / "ex")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "ex").glob("*_gradcam.png"))) == 4
    assert "the figures' font has no glyph for 像, 影 (in a class or file name): shown as boxes" in result.stderr


def test_an_out_name_near_the_file_system_limit_is_written(trained_run, tmp_path):
    for out in (tmp_path / ("b" * 246 + ".csv"), tmp_path / ("😀" * 60 + ".csv")):  # 250 and 244 bytes
        result = run_main("predict", trained_run.path, an_image(trained_run), "--out", out)
        assert result.returncode == 0, result.stderr  # the temporary name beside it stays shorter
        assert out.is_file()


def test_out_never_replaces_a_device_or_fifo_and_a_dangling_link_is_the_users(trained_run, tmp_path):
    image = an_image(trained_run)
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    for overwrite in ([], ["--overwrite"]):
        assert_clean_error(run_main("predict", trained_run.path, image, "--out", fifo, *overwrite),
                           "pipe.csv is a FIFO, which imgclf never replaces")
    assert fifo.is_fifo()
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere.csv")
    assert_clean_error(run_main("predict", trained_run.path, image, "--out", dangling), "already exists",
                       "--overwrite")
    assert dangling.is_symlink()


def test_predict_with_the_onnx_engine_on_a_run_never_exported_says_to_export(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run.path, run, ignore=shutil.ignore_patterns("export"))  # another test may export it
    assert_clean_error(run_main("predict", run, an_image(trained_run), "--engine", "onnx",
                                "--out", tmp_path / "p.csv"), "has no export", "imgclf export")


@pytest.mark.parametrize("message", [
    "[enforce fail at alloc_cpu.cpp:118] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
    "36864000000 bytes. Error code 12 (Cannot allocate memory)",  # Linux, macOS
    "DefaultCPUAllocator: not enough memory: you tried to allocate 36864000000 bytes.",  # Windows
    "MPS backend out of memory (MPS allocated: 36864000000 bytes)"])
def test_running_out_of_memory_is_one_line_naming_the_settings(trained_run, tmp_path, monkeypatch, message):
    def allocate(*args, **kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr("imgclf.cli.runtools.write_features", allocate)
    line = assert_clean_error(run_main("features", trained_run.path, an_image(trained_run).parent,
                                       "--out", tmp_path / "f.npz"), "out of memory", "--batch-size")
    assert "36864000000 bytes" in line


def test_pillow_warnings_about_damaged_metadata_are_not_printed(trained_run, tmp_path):
    result = imgclf_cli("predict", trained_run.path, FIXTURES / "damaged_tags.tif", "--out", tmp_path / "p.csv",
                        env={"PYTHONWARNINGS": "default"})
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr and "warnings.warn" not in result.stderr


def test_sixteen_bit_gray_is_scaled_in_integers_exactly_as_the_float_rule():
    values = np.arange(0, 65536, dtype=np.uint16)
    rule = np.clip(values / 257.0, 0, 255).round().astype(np.uint8)
    assert (integer_to_uint8(values, True) == rule).all()
    signed = np.array([-7, 0, 255, 256, 70_000], dtype=np.int32)  # mode I: beyond 255 is 16-bit data
    assert integer_to_uint8(signed, False).tolist() == np.clip(signed / 257.0, 0, 255).round().astype(int).tolist()


def test_alpha_is_composited_onto_black_pixel_for_pixel_as_pillows_alpha_composite():
    rng = np.random.default_rng(0)
    for mode, bands in (("RGBA", 4), ("LA", 2)):
        image = Image.fromarray(rng.integers(0, 256, (64, 64, bands), dtype=np.uint8), mode)
        rgba = image.convert("RGBA")
        expected = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
        assert np.array_equal(np.asarray(to_mode(image, "RGB")), np.asarray(expected))


def test_the_server_decodes_at_most_its_slots_at_once(trained_run, monkeypatch):
    busy, peak, lock = [0], [0], threading.Lock()

    def decode(*args):
        with lock:
            busy[0] += 1
            peak[0] = max(peak[0], busy[0])
        time.sleep(0.05)
        with lock:
            busy[0] -= 1

    monkeypatch.setattr(service_module, "decode_upload", decode)
    server = service_module.Service(trained_run, "torch")  # not loaded: decoding needs no model
    threads = [threading.Thread(target=server._decode, args=(b"", "x", Path("."))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert peak[0] == service_module.DECODE_SLOTS


def test_a_data_path_that_is_a_file_is_named_as_such(trained_run, tmp_path):
    assert_clean_error(run_main("evaluate", trained_run.path, "--data", an_image(trained_run)), "--data",
                       "is not a folder")
    assert load_image(an_image(trained_run), 8, 3).shape == (8, 8, 3)


def test_a_dataset_or_out_that_is_a_link_loop_and_an_empty_dataset_are_one_line(tmp_path):
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    loop = f"{tmp_path / 'loop1'}: symbolic links that lead back to themselves (a loop)"
    for command in (("audit", tmp_path / "loop1"), ("train", tmp_path / "loop1", "--model", "simple_cnn"),
                    ("cv", tmp_path / "loop1", "--model", "simple_cnn"),
                    ("train", tmp_path / "empty", "--model", "simple_cnn", "--out", tmp_path / "loop1")):
        assert_clean_error(run_main(*command), loop)
    assert_clean_error(run_main("audit", tmp_path / "empty"), "empty holds no images; put them in one sub-folder")
    assert_clean_error(run_main("cv", tmp_path / "empty", "--out", tmp_path / "cv"), "empty holds no images")
    (tmp_path / "it's").symlink_to(tmp_path / "it's")  # a quote in the name: repr() switches to double quotes
    assert_clean_error(run_main("audit", tmp_path / "it's"), f"{tmp_path / 'it'}'s: symbolic links that lead back")
    (tmp_path / "header.csv").write_text("path,label\n")
    assert_clean_error(run_main("audit", tmp_path / "header.csv"), "header.csv lists no images; add rows")


def test_paths_that_cannot_be_what_a_flag_needs_are_named_before_any_work(trained_run, tmp_path):
    (tmp_path / "afile").write_text("x")
    data = trained_run.index().root
    assert_clean_error(run_main("audit", data, "--json", tmp_path / "afile" / "x.json"),
                       "afile is a file, not a folder; give a path in a folder")
    assert_clean_error(run_main("predict", trained_run.path, an_image(trained_run), "--out",
                                tmp_path / "afile" / "p.csv"), "afile is a file, not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_clean_error(run_main("predict", trained_run.path, an_image(trained_run), "--out",
                                tmp_path / "dangling" / "p.csv"), "dangling is a link that leads nowhere")
    assert_clean_error(run_main("train", data, "--data", f"{data}/", "--epochs", "0"), "train.epochs")  # one dataset
    (tmp_path / "simple_cnn").mkdir()  # a folder named as a model: the model is meant
    result = run_main("features", "simple_cnn", data, "--out", tmp_path / "g.npz", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_clean_error(run_main("features", tmp_path, data, "--out", tmp_path / "f.npz"),
                       "a folder, but not a run directory (no config.yaml)")
    assert_clean_error(run_main("cv", data, "--from-grid", tmp_path / "nowhere", cwd=tmp_path),
                       "nowhere holds no best.json; give the --out folder of a finished imgclf grid")
