import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgclf.data.images import BadImage, load_image

from imagefactory import pattern, to_pil


@pytest.mark.parametrize(("mode", "ext"), [("L", ".png"), ("LA", ".png"), ("RGB", ".jpg"), ("RGBA", ".png"),
                                           ("P", ".png"), ("I;16", ".png"), ("CMYK", ".jpg"), ("RGB", ".bmp"),
                                           ("RGB", ".tiff"), ("RGB", ".webp"), ("L", ".gif")])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_mode_becomes_the_model_channels_and_keeps_the_picture(tmp_path, mode, ext, channels):
    gray = pattern(0, 32, np.random.default_rng(0))  # bright bar on the left third
    img = to_pil(gray, "L").convert("LA") if mode == "LA" else to_pil(gray, mode)
    path = tmp_path / f"x{ext}"
    img.save(path)
    array = load_image(path, 16, channels)
    assert array.shape == (16, 16, channels) and array.dtype == np.uint8
    left, right = array[:, :5].mean(), array[:, -5:].mean()
    assert left > right + 60, f"{mode}{ext}: the bright bar was lost ({left:.0f} vs {right:.0f})"


def test_sixteen_bit_png_uses_its_full_range(tmp_path):
    path = tmp_path / "x16.png"
    Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16)).save(path)
    assert load_image(path, 8, 1).min() == 255


def test_transparent_pixels_become_black(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:, 4:, 3] = 255  # right half opaque, left half transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    array = load_image(tmp_path / "a.png", 8, 3)
    assert array[:, :3].max() == 0 and array[:, 5:].min() == 200


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :10] = 255  # bright left edge of a landscape image
    img = Image.fromarray(pixels)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    array = load_image(tmp_path / "r.jpg", 20, 1)[..., 0]
    assert array[:5].mean() > 200 and array[-5:].mean() < 50  # the bright edge is now on top


def test_animated_gif_uses_first_frame(tmp_path):
    frames = [Image.new("L", (8, 8), v) for v in (250, 0)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert load_image(tmp_path / "a.gif", 8, 1).mean() > 200


@pytest.mark.parametrize(("name", "content", "reason"), [
    ("empty.jpg", b"", "cannot identify"),
    ("text.jpg", b"hello, not an image", "cannot identify"),
    ("page.png", b"<html><body>404</body></html>", "cannot identify"),
])
def test_unreadable_files_name_the_file_and_the_fix(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(BadImage) as err:
        load_image(tmp_path / name, 8, 3)
    assert name in str(err.value) and reason in str(err.value) and "--skip-bad-images" in str(err.value)


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_truncated_files_are_bad(tmp_path, ext):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"full{ext}")
    data = (tmp_path / f"full{ext}").read_bytes()
    (tmp_path / f"cut{ext}").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="cut"):
        load_image(tmp_path / f"cut{ext}", 16, 3)


def test_one_pixel_image_is_bad(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(BadImage, match="only 1x1"):
        load_image(tmp_path / "dot.png", 8, 3)


def test_unreadable_permissions_are_a_bad_image(tmp_path, monkeypatch):
    """Root reads any file, so the denial is simulated at the point Pillow opens it."""
    from imgclf.data import images

    Image.new("RGB", (8, 8)).save(tmp_path / "locked.png")

    def deny(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(images, "open_image", deny)
    with pytest.raises(BadImage, match="locked.png: permission denied"):
        load_image(tmp_path / "locked.png", 8, 3)


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    pytest.importorskip("pydicom")
    from imagefactory import write_dicom

    pixels = np.zeros((16, 16))
    pixels[:, :5], pixels[:, 5:] = 1000, 100
    # stored -> HU: 2 * v - 1024 gives 976 and -824; window centre 0, width 1000 spans -500..500
    bright_left = load_image(write_dicom(tmp_path / "a.dcm", pixels, 2.0, -1024, (0, 1000)), 16, 1)[..., 0]
    assert bright_left[:, :4].min() == 255 and bright_left[:, 6:].max() == 0
    inverted = load_image(write_dicom(tmp_path / "b.dcm", pixels, photometric="MONOCHROME1"), 16, 1)[..., 0]
    assert inverted[:, :4].max() == 0 and inverted[:, 6:].min() == 255
    assert load_image(tmp_path / "a.dcm", 16, 3).shape == (16, 16, 3)


def test_dicom_sigmoid_window_and_a_voi_lut_are_applied_not_the_full_range(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from imagefactory import write_dicom

    pixels = np.tile(np.array([0, 450, 500, 550, 4000], dtype=float), (5, 1))
    # sigmoid around 500, width 100: 0.5 at the centre, 1/(1+e^2) and 1/(1+e^-2) at 450 and 550
    sigmoid = load_image(write_dicom(tmp_path / "s.dcm", pixels, window=(500, 100), voi_function="SIGMOID"),
                         5, 1)[0, :, 0]
    assert sigmoid.tolist() == [0, 30, 128, 225, 255]
    # a VOI LUT (no window) that shows only 400..600, inverted: the full range would make 450 and 550 near black
    lut = [255 - min(max(v - 400, 0), 200) * 255 // 200 for v in range(0, 1000)]
    through = load_image(write_dicom(tmp_path / "l.dcm", pixels, voi_lut=(0, lut)), 5, 1)[0, :, 0]
    assert through.tolist() == [255, 192, 128, 64, 0]
    as_words = write_dicom(tmp_path / "ow.dcm", pixels, voi_lut=(0, lut), lut_vr="OW")
    assert load_image(as_words, 5, 1)[0, :, 0].tolist() == through.tolist()
    tampered = pydicom.dcmread(tmp_path / "l.dcm")
    tampered.VOILUTSequence[0].LUTDescriptor = [5000, 0, 8]  # more entries described than the table holds
    broken = tmp_path / "broken.dcm"
    tampered.save_as(broken)
    with pytest.raises(BadImage, match="broken.dcm: cannot apply its VOI LUT .1000 entries of 8 bits, 5000"):
        load_image(broken, 5, 1)


def test_dicom_size_is_checked_on_the_header_before_decoding_and_only_the_first_frame_is_read(tmp_path):
    pytest.importorskip("pydicom")
    from imgclf.data.images import MAX_PIXELS, image_size

    from imagefactory import write_dicom

    # 20000 x 20000 in the header, 32 bytes of pixels: decoding would fail on the pixel data's length instead
    bomb = write_dicom(tmp_path / "bomb.dcm", np.zeros((4, 4)), claimed_size=(20000, 20000))
    assert image_size(bomb) == (20000, 20000)
    with pytest.raises(BadImage, match=f"bomb.dcm: 20000x20000 pixels exceeds the {MAX_PIXELS:,} limit"):
        load_image(bomb, 8, 1)
    frames = np.zeros((3, 12, 12))
    frames[0, :, :6] = 1000  # the first frame: bright left half; the others: bright right half
    frames[1:, :, 6:] = 1000
    first = load_image(write_dicom(tmp_path / "frames.dcm", frames), 12, 1)[..., 0]
    assert first[:, :5].min() == 255 and first[:, 7:].max() == 0
    assert image_size(tmp_path / "frames.dcm") == (12, 12)
    (tmp_path / "notes.dcm").write_text("not a DICOM file")  # pydicom's InvalidDicomError is a plain Exception
    with pytest.raises(BadImage, match="notes.dcm: not a readable DICOM file"):
        load_image(tmp_path / "notes.dcm", 8, 1)
    with pytest.raises(ValueError, match="not a readable DICOM file"):
        image_size(tmp_path / "notes.dcm")


def float_tiff(path: Path, values: tuple[float, float]) -> Path:
    """A 32-bit float grayscale TIFF (Pillow mode F): bright left third at ``values[0]``, the rest ``values[1]``."""
    pixels = np.full((12, 12), values[1], dtype=np.float32)
    pixels[:, :4] = values[0]
    Image.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize(("bright", "dark", "expected"), [
    (1.0, 0.2, (255, 51)),  # within [0, 1]: x 255
    (200.0, 20.0, (200, 20)),  # within [0, 255]: kept
    (65535.0, 2570.0, (255, 10)),  # within [0, 65535]: / 257
])
def test_float_tiffs_are_scaled_by_the_range_they_span(tmp_path, bright, dark, expected):
    path = float_tiff(tmp_path / "f.tif", (bright, dark))
    assert Image.open(path).mode == "F"
    array = load_image(path, 12, 1)[..., 0]
    assert array[:, 0].min() == array[:, 0].max() == expected[0]
    assert array[:, -1].min() == array[:, -1].max() == expected[1]


@pytest.mark.parametrize(("values", "reason"), [
    ((float("nan"), 0.5), "NaN or infinite"),
    ((float("inf"), 0.5), "NaN or infinite"),
    ((0.5, -0.25), "outside 0..65535"),
    ((70000.0, 1.0), "outside 0..65535"),
])
def test_float_tiffs_outside_the_rule_are_refused(tmp_path, values, reason):
    path = float_tiff(tmp_path / "f.tif", values)
    with pytest.raises(BadImage, match=reason) as err:
        load_image(path, 12, 1)
    assert "f.tif" in str(err.value)


def test_a_fifo_or_device_is_refused_before_it_is_opened(tmp_path, monkeypatch):
    """Opening either would block or never end; the refusal must come from os.stat alone."""
    from imgclf import safeio
    from imgclf.data import images

    os.mkfifo(tmp_path / "pipe.png")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    monkeypatch.setattr(images, "open_image", lambda path: pytest.fail(f"opened {path}"))
    with pytest.raises(BadImage, match="pipe.png: it is a FIFO, not a regular file"):
        load_image(tmp_path / "pipe.png", 8, 1)
    with pytest.raises(BadImage, match="zero.jpg: it is a character device"):
        load_image(tmp_path / "zero.jpg", 8, 1)
    assert safeio.special_file_kind(tmp_path) == "folder" and safeio.special_file_kind(tmp_path / "no") is None


def test_a_name_that_is_not_utf8_decodes(tmp_path):
    path = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff\xfe.png"))
    to_pil(pattern(0, 16, np.random.default_rng(0)), "L").save(path)
    assert load_image(path, 8, 1).shape == (8, 8, 1)
