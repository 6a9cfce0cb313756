"""Training augmentation: shape and range survive, minority-only extras, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from faceattrs.augment import AugmentConfig, Augmenter, minority_classes, normalise

# base list reduced to the identity, so only the extra (minority) list changes images
IDENTITY_BASE = AugmentConfig(
    crop_padding=0, hflip_p=0.0, rotation=0.0, translate=0.0, scale_min=1.0, scale_max=1.0,
    erase_p=0.0,
)  # fmt: skip


def _faces(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 48, 48), generator=g, dtype=torch.uint8)
    images[0] = 0  # extreme images must stay in range too
    images[1] = 255
    return images, torch.arange(n) % 5


def test_shape_dtype_and_range_survive():
    images, eth = _faces()
    aug = Augmenter(AugmentConfig(), minority=(1, 2, 3, 4))
    for _ in range(3):
        x = aug(images, eth)
        assert x.shape == (32, 1, 48, 48) and x.dtype == torch.float32
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert torch.isfinite(x).all()
    # the input is not modified in place
    assert images.dtype == torch.uint8 and images[1].eq(255).all()


def test_augmentation_changes_images_but_keeps_their_level():
    images, eth = _faces()
    torch.manual_seed(0)
    x = Augmenter(AugmentConfig(), minority=()).eval()(images, eth)
    plain = normalise(images)
    changed = (x - plain).abs().flatten(1).amax(1) > 0.1
    assert changed.float().mean() > 0.9  # crop/rotation/affine move nearly every image
    # geometry and rare erasing keep the mean grey level close (no range mix-up)
    assert (x.mean() - plain.mean()).abs() < 0.1


def test_extra_list_only_on_minority_images():
    images, eth = _faces()
    torch.manual_seed(0)
    x = Augmenter(IDENTITY_BASE, minority=(3, 4))(images, eth)
    diff = (x - normalise(images)).abs().flatten(1).amax(1)
    minority = (eth == 3) | (eth == 4)
    assert diff[~minority].max() < 1e-4  # untouched (identity warps, up to rounding)
    assert (diff[minority] > 0.05).all()


def test_disabled_equals_normalise():
    images, eth = _faces()
    x = Augmenter(AugmentConfig(enabled=False), minority=(1, 2))(images, eth)
    assert torch.equal(x, normalise(images))


def test_reproducible_from_the_seed():
    images, eth = _faces()
    aug = Augmenter(AugmentConfig(), minority=(1, 2, 3, 4))
    torch.manual_seed(5)
    a = aug(images, eth)
    torch.manual_seed(5)
    b = aug(images, eth)
    assert torch.equal(a, b)


def test_minority_classes_on_reference_counts():
    counts = {0: 10078, 1: 4526, 2: 3434, 3: 3975, 4: 1692}  # the reference's counts
    labels = np.repeat(list(counts), list(counts.values()))
    assert minority_classes(labels) == (1, 2, 3, 4)
    assert minority_classes(labels, ratio=0.4) == (2, 3, 4)


@pytest.mark.parametrize("shape", [(4, 48, 48), (4, 1, 48, 48)])
def test_accepts_both_input_layouts(shape):
    x = Augmenter(AugmentConfig(), minority=(1,))(torch.zeros(shape, dtype=torch.uint8),
                                                    torch.tensor([0, 1, 1, 0]))  # fmt: skip
    assert x.shape == (4, 1, 48, 48)


def test_warp_conventions_are_exact():
    from faceattrs import augment as A

    x = torch.rand(2, 1, 48, 48)
    shifted = A._warp(x, A._translate(torch.tensor([[1.0, 0.0], [0.0, -2.0]])))
    assert torch.allclose(shifted[0, 0, :, 1:], x[0, 0, :, :-1], atol=1e-5)  # right by 1
    assert shifted[0, 0, :, 0].abs().max() < 1e-5  # zeros come in, as RandomCrop's padding
    assert torch.allclose(shifted[1, 0, :-2], x[1, 0, 2:], atol=1e-5)  # up by 2
    flip = A._about_centre(A._scale(torch.tensor([-1.0]), torch.tensor([1.0])), 48)
    assert torch.allclose(A._warp(x[:1], flip), x[:1].flip(-1), atol=1e-5)
    rot = A._about_centre(A._rotate(torch.tensor([90.0])), 48)
    assert torch.allclose(A._warp(x[:1], rot), torch.rot90(x[:1], 3, (2, 3)), atol=1e-5)


def test_erasing_probability_and_area():
    from faceattrs import augment as A

    torch.manual_seed(0)
    erased = A._erase(torch.ones(2000, 1, 48, 48), 0.1, (0.02, 0.10), 0.0)
    frac = (erased == 0).float().mean((1, 2, 3))
    on = frac > 0
    assert on.float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert frac[on].min() >= 0.015 and frac[on].max() <= 0.11  # 2-10 % of the image


def test_base_geometry_parameters_stay_in_range():
    torch.manual_seed(0)
    aug = Augmenter(AugmentConfig(), minority=())
    m = aug.base_matrix(4000, 48, torch.device("cpu"))
    lin = m[:, :2, :2]
    scale = torch.sqrt(torch.det(lin).abs())
    assert scale.min() >= 0.95 - 1e-4 and scale.max() <= 1.05 + 1e-4
    flipped = torch.det(lin) < 0
    assert flipped.float().mean().item() == pytest.approx(0.5, abs=0.03)
    angle = torch.rad2deg(torch.atan2(lin[:, 1, 0], lin[:, 1, 1]).abs())
    assert angle.max() <= 8.0 + 1e-3 and angle.max() > 7.0  # +-8 degrees
    # where the centre goes: crop shift (<= 3 px per axis, then rotated and scaled) plus
    # affine translation (<= 3 % of 48)
    c = torch.tensor([23.5, 23.5, 1.0])
    moved = (m @ c)[:, :2] - c[:2]
    rad = torch.deg2rad(torch.tensor(8.0))
    bound = 3 * 1.05 * (torch.cos(rad) + torch.sin(rad)) + 0.03 * 48
    assert moved.abs().max() <= bound + 1e-3 and moved.abs().max() > 3


CAMERA = {"camera_p": 1.0, "jpeg_p": 1.0, "jpeg_quality_min": 20}


def test_camera_options_are_off_by_default_and_leave_the_reference_alone():
    """Off (the default, and the paper preset): strengths do not matter and nothing is
    drawn from the generator, so the reference's batches are unchanged."""
    images, eth = _faces()
    other = dataclasses.replace(AugmentConfig(), gamma=0.9, contrast=0.9, noise_std=0.5)
    torch.manual_seed(2)
    a = Augmenter(AugmentConfig(), minority=(1, 2))(images, eth)
    after_a = torch.rand(1)
    torch.manual_seed(2)
    b = Augmenter(other, minority=(1, 2))(images, eth)
    assert torch.equal(a, b) and torch.equal(after_a, torch.rand(1))
    assert Augmenter(AugmentConfig()).camera is None


def test_camera_options_change_pixels_not_geometry():
    images, eth = _faces()
    smooth = torch.nn.functional.avg_pool2d(images[:, None].float(), 5, 1, 2)[:, 0].to(torch.uint8)
    cfg = dataclasses.replace(IDENTITY_BASE, **CAMERA)
    torch.manual_seed(0)
    x = Augmenter(cfg)(smooth, eth)
    plain = normalise(smooth)
    assert x.shape == plain.shape and x.min() >= -1 and x.max() <= 1
    diff = (x - plain).abs().flatten(1).mean(1)
    assert (diff > 0.01).float().mean() > 0.9  # every op at p=1: nearly every image changes
    r = [
        torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        for a, b in zip(x, plain, strict=True)
    ]
    assert torch.stack(r)[2:].median() > 0.8  # ... but stays the same face (no warp)


def test_jitter_moves_the_face():
    images, eth = _faces()
    torch.manual_seed(0)
    still = Augmenter(IDENTITY_BASE)(images, eth)
    cfg = dataclasses.replace(IDENTITY_BASE, jitter_rotation=10.0, jitter_shift=0.05)
    torch.manual_seed(0)
    moved = Augmenter(cfg)(images, eth)
    assert ((moved - still).abs().flatten(1).amax(1) > 0.1).float().mean() > 0.9


def test_colour_shifts_change_hue_and_saturation_of_colour_faces_only():
    """saturation / hue (camera white balance) act on colour models' faces: a gray pixel
    stays gray, coloured ones shift between channels; a grayscale model has no such op."""
    from faceattrs.inputs import InputSpec

    rgb = InputSpec(size=48, channels=3, mean=(0.5,) * 3, std=(0.5,) * 3)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(40, 216, (16, 48, 48, 3), generator=g, dtype=torch.uint8)
    images[0] = 128  # a gray face: no colour to shift
    eth = torch.zeros(16, dtype=torch.long)
    off = dataclasses.replace(IDENTITY_BASE, camera_p=1.0, contrast=0.0, gamma=0.0,
                              blur_sigma=0.1, noise_std=0.0)  # fmt: skip
    on = dataclasses.replace(off, saturation=0.5, hue=0.1)
    torch.manual_seed(0)
    a = Augmenter(off, spec=rgb)(images, eth)
    torch.manual_seed(0)
    b = Augmenter(on, spec=rgb)(images, eth)
    assert torch.allclose(b[0], a[0], atol=1e-3)  # gray stays gray
    assert ((b - a).abs().flatten(1).mean(1)[1:] > 0.01).all()  # colours moved
    # the channels' relation changes (not a brightness change): per-pixel channel spread
    assert not torch.allclose(b[1:].std(1), a[1:].std(1), atol=1e-2)
    gray = Augmenter(on)  # 48x48 grayscale: no colour op in the camera list
    assert not any(type(m).__name__ == "ColorJitter" for m in gray.camera)
