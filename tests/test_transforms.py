import pytest
import torch

from imgclf.config import AugmentConfig, build_config
from imgclf.data.transforms import BatchAugment, affine_grid, build_eval_transform, resolve_augment
from imgclf.errors import ConfigError


def test_medium_preset_holds_the_notebook_values_and_flags_override():
    medium = resolve_augment(AugmentConfig(preset="medium"))
    assert medium["rotation_range"] == 45 and medium["horizontal_flip"] and medium["vertical_flip"]
    assert medium["zoom_range"] == medium["shear_range"] == medium["width_shift_range"] == 0.2
    custom = resolve_augment(AugmentConfig(preset="medium", vertical_flip=False, rotation_range=5))
    assert custom["vertical_flip"] is False and custom["rotation_range"] == 5 and custom["zoom_range"] == 0.2
    assert resolve_augment(AugmentConfig(preset="none"))["rotation_range"] == 0


def test_eval_transform_never_augments():
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    transform = build_eval_transform([0.5] * 3, [0.25] * 3)
    out = transform(image)
    assert torch.equal(out, transform(image))
    torch.testing.assert_close(out, (image.float() / 255 - 0.5) / 0.25)


def augment(**settings) -> BatchAugment:
    channels = settings.pop("channels", 1)
    return BatchAugment(AugmentConfig(**{"preset": "none", **settings}), [0.0] * channels, [1.0] * channels)


def test_batch_augment_varies_per_image_keeps_shape_and_repeats_under_a_seed():
    images = torch.randint(0, 256, (1, 1, 24, 24), dtype=torch.uint8).repeat(6, 1, 1, 1)
    strong = BatchAugment(AugmentConfig(preset="strong"), [0.0], [1.0])
    torch.manual_seed(0)
    out = strong(images)
    assert out.shape == images.shape and out.dtype == torch.float32
    assert not torch.equal(out[0], out[1])  # the same image, a different draw in the same batch
    torch.manual_seed(0)
    assert torch.equal(out, strong(images))


@pytest.mark.parametrize("height,width", [(150, 150), (7, 13), (224, 96), (1, 1)])
def test_the_sampling_grid_is_torch_s_affine_grid(height, width):
    torch.manual_seed(height)
    theta = BatchAugment(AugmentConfig(preset="strong"), [0.0], [1.0]).random_theta(5)
    expected = torch.nn.functional.affine_grid(theta, [5, 1, height, width], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, height, width), expected, rtol=0, atol=1e-6)


def test_no_augmentation_is_exactly_the_eval_transform():
    images = torch.randint(0, 256, (4, 3, 10, 10), dtype=torch.uint8)
    plain = BatchAugment(AugmentConfig(preset="none"), [0.5] * 3, [0.25] * 3)
    expected = torch.stack([build_eval_transform([0.5] * 3, [0.25] * 3)(image) for image in images])
    torch.testing.assert_close(plain(images), expected)


def test_flips_mirror_the_pixels_exactly():
    images = torch.randint(0, 256, (32, 1, 8, 8), dtype=torch.uint8)
    out = augment(horizontal_flip=True)(images)
    flipped = [torch.allclose(o, i.float().flip(-1) / 255, atol=1e-5) for o, i in zip(out, images, strict=True)]
    kept = [torch.allclose(o, i.float() / 255, atol=1e-5) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 32  # a coin per image, not one for the whole batch
    vertical = augment(vertical_flip=True)(images)
    assert any(torch.allclose(o, i.float().flip(-2) / 255, atol=1e-5) for o, i in zip(vertical, images, strict=True))


def test_shift_moves_content_by_at_most_the_range():
    image = torch.zeros(1, 1, 20, 20, dtype=torch.uint8)
    image[..., 8:12, 8:12] = 255
    out = augment(width_shift_range=0.25, fill_mode="constant")(image.repeat(16, 1, 1, 1))
    columns = [(o[0].sum(0) > 0.5).nonzero().float().mean().item() for o in out]
    assert max(abs(c - 9.5) for c in columns) <= 5 + 0.5 and len({round(c) for c in columns}) > 2
    rows = [(o[0].sum(1) > 0.5).nonzero().float().mean().item() for o in out]
    assert all(abs(r - 9.5) < 0.5 for r in rows)  # a horizontal shift only


def test_fill_modes_nearest_and_reflect_leave_no_empty_corners():
    images = torch.full((5, 1, 20, 20), 200, dtype=torch.uint8)
    for fill_mode, expect_black in (("nearest", False), ("reflect", False), ("constant", True)):
        torch.manual_seed(1)
        out = augment(rotation_range=45, zoom_range=0.3, width_shift_range=0.2, fill_mode=fill_mode)(images)
        assert (int((out < 0.1).sum()) > 0) == expect_black, fill_mode


def test_constant_fill_uses_cval_and_brightness_scales():
    torch.manual_seed(0)
    images = torch.full((5, 1, 20, 20), 10, dtype=torch.uint8)
    out = augment(rotation_range=45, fill_mode="constant", cval=255)(images)
    assert out.max() == 1.0 and abs(out.min().item() - 10 / 255) < 1e-6
    bright = augment(brightness_range=[2.0, 3.0])(images)
    assert (bright > 2 * 10 / 255 - 1e-6).all() and (bright < 3 * 10 / 255 + 1e-6).all()


def test_augmentation_runs_on_the_batch_device():
    """No CPU-only step: on the 'meta' device (a stand-in for a GPU) a tensor left on the CPU would fail."""
    from imgclf.data.datasets import AugmentedBatches

    strong = BatchAugment(AugmentConfig(preset="strong", fill_mode="constant"), [0.5] * 3, [0.2] * 3)
    batches = [(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.zeros(4), torch.arange(4))]
    images, _, _ = next(iter(AugmentedBatches(batches, strong, torch.device("meta"))))
    assert images.device.type == "meta" and images.shape == (4, 3, 16, 16) and images.dtype == torch.float32


def zoom_factors(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The x and y zoom of zoom-only matrices (theta maps output to input: its diagonal is 1 / zoom)."""
    return 1 / theta[:, 0, 0].double(), 1 / theta[:, 1, 1].double()


def test_keras_zoom_draws_the_x_and_y_factors_apart():
    torch.manual_seed(0)
    zx, zy = zoom_factors(augment(zoom_range=0.3, zoom_axes="independent").random_theta(64))
    assert bool(((zx >= 0.7 - 1e-6) & (zx <= 1.3 + 1e-6) & (zy >= 0.7 - 1e-6) & (zy <= 1.3 + 1e-6)).all())
    assert (zx - zy).abs().min() > 0 and (zx - zy).abs().max() > 0.2  # every image its own aspect change
    torch.manual_seed(0)
    same_x, same_y = zoom_factors(augment(zoom_range=0.3).random_theta(64))
    torch.testing.assert_close(same_x, same_y)  # the default: one factor for both axes
    torch.manual_seed(0)
    u = torch.rand(64, 7, dtype=torch.float64) * 2 - 1  # what the default drew before zoom_axes existed
    torch.testing.assert_close(same_x, 1 + u[:, 2] * 0.3, rtol=1e-6, atol=1e-6)


def test_keras_zoom_stretches_a_square_into_rectangles():
    image = torch.zeros(1, 1, 41, 41, dtype=torch.uint8)
    image[..., 10:31, 10:31] = 255
    torch.manual_seed(1)
    out = augment(zoom_range=0.5, zoom_axes="independent", fill_mode="constant")(image.repeat(16, 1, 1, 1))
    widths = (out[:, 0, 20, :] > 0.5).sum(1)  # the bright square's extent along the middle row and column
    heights = (out[:, 0, :, 20] > 0.5).sum(1)
    assert (widths != heights).sum() >= 8
    torch.manual_seed(1)
    same = augment(zoom_range=0.5, fill_mode="constant")(image.repeat(16, 1, 1, 1))
    assert torch.equal((same[:, 0, 20, :] > 0.5).sum(1), (same[:, 0, :, 20] > 0.5).sum(1))


def test_independent_zoom_without_a_zoom_is_an_error():
    with pytest.raises(ConfigError, match="zoom_axes=independent needs a zoom"):
        build_config({"augment": {"preset": "none", "zoom_axes": "independent"}})
    assert build_config({"augment": {"zoom_axes": "independent"}}).augment.zoom_axes == "independent"  # light zooms
