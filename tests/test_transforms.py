import torch

from imgclf.config import AugmentConfig
from imgclf.transforms import build_eval_transform, build_train_transform, resolve_augment


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


def test_train_transform_varies_and_keeps_shape():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (1, 24, 24), dtype=torch.uint8)
    transform = build_train_transform(AugmentConfig(preset="strong"), 24, [0.0], [1.0])
    outs = [transform(image) for _ in range(4)]
    assert all(o.shape == (1, 24, 24) and o.dtype == torch.float32 for o in outs)
    assert not torch.equal(outs[0], outs[1])


def test_fill_modes_nearest_and_reflect_leave_no_empty_corners():
    image = torch.full((1, 20, 20), 200, dtype=torch.uint8)
    for fill_mode, expect_black in (("nearest", False), ("reflect", False), ("constant", True)):
        torch.manual_seed(1)
        transform = build_train_transform(
            AugmentConfig(preset="none", rotation_range=45, zoom_range=0.3, width_shift_range=0.2,
                          fill_mode=fill_mode), 20, [0.0], [1.0])
        blacks = max(int((transform(image) < 0.1).sum()) for _ in range(5))
        assert (blacks > 0) == expect_black, fill_mode


def test_constant_fill_uses_cval():
    torch.manual_seed(0)
    image = torch.full((1, 20, 20), 10, dtype=torch.uint8)
    transform = build_train_transform(AugmentConfig(preset="none", rotation_range=45, fill_mode="constant",
                                                    cval=255), 20, [0.0], [1.0])
    assert max(transform(image).max() for _ in range(5)) == 1.0
