"""Batched augmentation on tensors (kornia), on the training device.

``normalise`` (:mod:`faceattrs.inputs`) turns uint8 faces into the model's input, with no
augmentation (evaluation, prediction). :class:`Augmenter` is the training transform of the reference: the *base*
list on every image, the *extra* list on images of minority ethnicity classes only
(per sample, inside the batch). Every op runs once per batch, in [0, 1]; the result is
standardised to [-1, 1] like ``normalise``.

>>> aug = Augmenter(AugmentConfig(), minority=(1, 2, 3, 4))
>>> x = aug(torch.zeros(4, 48, 48, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))
>>> tuple(x.shape), bool(x.min() >= -1) and bool(x.max() <= 1)
((4, 1, 48, 48), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import kornia.augmentation as K
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .inputs import GRAY48, InputSpec, normalise

__all__ = ["AugmentConfig", "Augmenter", "minority_classes", "normalise"]


@dataclass
class AugmentConfig:
    """The reference's two lists (section Augmentation). Defaults = the reference."""

    enabled: bool = True  # False: training images are only normalised (ablations)
    # base list, every training image
    crop_padding: int = 3  # RandomCrop 48 with this zero padding
    hflip_p: float = 0.5  # RandomHorizontalFlip probability
    rotation: float = 8.0  # RandomRotation, +- degrees (always applied)
    translate: float = 0.03  # RandomAffine translation, fraction of the side
    scale_min: float = 0.95  # RandomAffine scale range
    scale_max: float = 1.05
    erase_p: float = 0.1  # RandomErasing probability
    erase_min: float = 0.02  # RandomErasing area, fraction of the image
    erase_max: float = 0.10
    # [ours] erased pixels get 0.5 in [0, 1], i.e. 0 after standardisation: what
    # torchvision's RandomErasing(value=0) gives when it runs after Normalize.
    erase_value: float = 0.5
    # extra list, images of minority ethnicity classes only (after the base list)
    extra_crop_min: float = 0.85  # RandomResizedCrop scale (min, 1.0)
    extra_brightness: float = 0.08  # ColorJitter brightness
    extra_contrast: float = 0.1  # ColorJitter contrast
    extra_rotation: float = 10.0  # RandomRotation, +- degrees
    extra_erase_p: float = 0.3  # RandomErasing probability (torchvision's default area)
    # [ours] minority = classes with fewer than this fraction of the largest class's count
    minority_ratio: float = 0.5
    # [ours] other cameras and detectors (docs/photos.md), on every image; all off by
    # default (the reference has none; nothing is drawn from the generator while off)
    camera_p: float = 0.0  # probability per image of each of contrast, gamma, blur, noise
    contrast: float = 0.4  # contrast factor in [1 - c, 1 + c]
    gamma: float = 0.4  # gamma in [1 / (1 + g), 1 + g]
    blur_sigma: float = 1.2  # Gaussian blur (5x5), sigma in [0.1, this]
    noise_std: float = 0.03  # Gaussian noise, standard deviation in [0, 1] pixel units
    saturation: float = 0.0  # colour models only: saturation factor in [1 - s, 1 + s]
    hue: float = 0.0  # colour models only: hue shift in [-h, h] (fraction of the circle)
    jpeg_p: float = 0.0  # probability per image of a JPEG round trip (OpenCV, on the CPU)
    jpeg_quality_min: int = 30  # its quality in [this, 95]
    jitter_rotation: float = 0.0  # extra rotation, +- degrees (landmark / alignment error)
    jitter_shift: float = 0.0  # extra shift, +- fraction of the side (detector box error)
    jitter_scale: float = 0.0  # extra scale in [1 - s, 1 + s]


def minority_classes(ethnicity: Sequence[int] | np.ndarray | torch.Tensor, ratio: float = 0.5):
    """Ethnicity ids whose training count is below ``ratio`` x the largest class's count.

    >>> minority_classes([0, 0, 0, 0, 1, 2, 2, 2], ratio=0.5)
    (1,)
    """
    labels = np.asarray(torch.as_tensor(ethnicity).cpu(), dtype=np.int64)
    counts = np.bincount(labels)
    return tuple(int(i) for i, c in enumerate(counts) if 0 < c < ratio * counts.max())


class Augmenter(nn.Module):
    """``(uint8 faces (B, S, S) or (B, S, S, 3), ethnicity (B,) long) -> float
    (B, C, S, S)`` standardised by ``spec`` (the model's input contract; by default
    48x48 grayscale in [-1, 1]).

    The geometric ops of both lists (crop with padding, flip, rotation, affine; for
    minority images then resized crop and rotation) are composed into one affine matrix
    per image and applied with a single bilinear warp: the same transforms as running
    them one by one, with one resampling instead of up to six and a fraction of the
    time. Then base erasing on every image, and on minority images colour jitter (kornia)
    and the extra erasing. The one reordering against the reference's lists: the base
    erasing comes after the extra geometry, not before it (an erased box is not rotated
    or rescaled by the extra crop/rotation), so that one warp serves both lists.

    Runs on whatever device the inputs live on; randomness comes from torch's global
    generator of that device (seed it per epoch for reproducible runs).
    """

    def __init__(
        self,
        cfg: AugmentConfig | None = None,
        minority: Sequence[int] = (),
        spec: InputSpec = GRAY48,
    ):
        super().__init__()
        self.cfg = cfg = cfg or AugmentConfig()
        self.spec = spec  # the model's input contract: channels and standardisation
        self.register_buffer("minority", torch.tensor(sorted(minority), dtype=torch.long))
        self.jitter = K.ColorJitter(
            brightness=cfg.extra_brightness, contrast=cfg.extra_contrast, p=1.0
        )
        self.camera = None
        if cfg.camera_p > 0:
            p, g = cfg.camera_p, cfg.gamma
            self.camera = nn.Sequential(
                K.RandomContrast(contrast=(1 - cfg.contrast, 1 + cfg.contrast), p=p),
                K.RandomGamma(gamma=(1 / (1 + g), 1 + g), p=p),
                K.RandomGaussianBlur((5, 5), (0.1, max(0.1, cfg.blur_sigma)), p=p),
                K.RandomGaussianNoise(std=cfg.noise_std, p=p),
            )
            if spec.channels == 3 and (cfg.saturation or cfg.hue):  # white balance, cameras' colour
                self.camera.append(K.ColorJitter(saturation=cfg.saturation, hue=cfg.hue, p=p))

    def jitter_matrix(self, n: int, size: int, device) -> torch.Tensor:
        """Forward matrices of the detector / alignment jitter: rotation, scale, shift."""
        cfg = self.cfg
        rot = _uniform(n, -cfg.jitter_rotation, cfg.jitter_rotation, device)
        s = _uniform(n, 1 - cfg.jitter_scale, 1 + cfg.jitter_scale, device)
        t = _uniform((n, 2), -cfg.jitter_shift * size, cfg.jitter_shift * size, device)
        return _translate(t) @ _about_centre(_scale(s, s) @ _rotate(rot), size)

    def base_matrix(self, n: int, size: int, device) -> torch.Tensor:
        """Forward matrices ``(n, 3, 3)`` of crop-with-padding, flip, rotation, affine."""
        cfg = self.cfg
        pad = cfg.crop_padding
        # RandomCrop(48, padding): an integer shift in [-pad, pad], zeros come in
        shift = torch.randint(-pad, pad + 1, (n, 2), device=device).float()
        m = _translate(shift)
        flip = torch.rand(n, device=device) < cfg.hflip_p
        sx = torch.where(flip, -1.0, 1.0)
        m = _about_centre(_scale(sx, torch.ones_like(sx)), size) @ m
        m = _about_centre(_rotate(_uniform(n, -cfg.rotation, cfg.rotation, device)), size) @ m
        s = _uniform(n, cfg.scale_min, cfg.scale_max, device)
        t = _uniform((n, 2), -cfg.translate * size, cfg.translate * size, device)
        return _translate(t) @ _about_centre(_scale(s, s), size) @ m

    def extra_matrix(self, n: int, size: int, device) -> torch.Tensor:
        """Forward matrices of RandomResizedCrop(scale=(min, 1), ratio 3/4..4/3), rotation."""
        cfg = self.cfg
        area = _uniform(n, cfg.extra_crop_min, 1.0, device) * size * size
        ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), device))
        # box sides; torchvision retries boxes that do not fit, clipping keeps the mix close
        w = torch.sqrt(area * ratio).clamp(max=size)
        h = torch.sqrt(area / ratio).clamp(max=size)
        x0 = torch.rand(n, device=device) * (size - w)
        y0 = torch.rand(n, device=device) * (size - h)
        # pixel-centre coordinates: box [x0, x0 + w] -> [0, size]
        kx, ky = size / w, size / h
        m = _translate(torch.stack([(0.5 - x0) * kx - 0.5, (0.5 - y0) * ky - 0.5], 1))
        m = m @ _scale(kx, ky)
        rot = _uniform(n, -cfg.extra_rotation, cfg.extra_rotation, device)
        return _about_centre(_rotate(rot), size) @ m

    @torch.no_grad()
    def forward(self, images: torch.Tensor, ethnicity: torch.Tensor) -> torch.Tensor:
        x = self.spec.channels_first(images).float().div_(255.0)  # kornia's ops want [0, 1]
        cfg = self.cfg
        if cfg.enabled and len(x):
            n, size = len(x), x.shape[-1]
            m = self.base_matrix(n, size, x.device)
            mask = torch.isin(ethnicity, self.minority.to(ethnicity.device))
            k = int(mask.sum())
            if k:  # minority images: the extra geometry after the base geometry
                m[mask] = self.extra_matrix(k, size, x.device) @ m[mask]
            if cfg.jitter_rotation or cfg.jitter_shift or cfg.jitter_scale:
                m = self.jitter_matrix(n, size, x.device) @ m
            x = _warp(x, m)  # one resampling for both lists
            if self.camera is not None:
                x = self.camera(x).clamp_(0.0, 1.0)
            if cfg.jpeg_p > 0:
                x = _jpeg(x, cfg.jpeg_p, cfg.jpeg_quality_min)
            x = _erase(x, cfg.erase_p, (cfg.erase_min, cfg.erase_max), cfg.erase_value)
            if k:
                sub = self.jitter(x[mask])
                x[mask] = _erase(sub, cfg.extra_erase_p, (0.02, 0.33), cfg.erase_value)
            x = x.clamp_(0.0, 1.0)
        return self.spec.standardise(x)


def _uniform(shape, lo: float, hi: float, device) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.rand(shape, device=device) * (hi - lo) + lo


def _eye(n: int, device) -> torch.Tensor:
    return torch.eye(3, device=device).repeat(n, 1, 1)


def _translate(t: torch.Tensor) -> torch.Tensor:
    m = _eye(len(t), t.device)
    m[:, :2, 2] = t
    return m


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    m = _eye(len(sx), sx.device)
    m[:, 0, 0], m[:, 1, 1] = sx, sy
    return m


def _rotate(degrees: torch.Tensor) -> torch.Tensor:
    a = torch.deg2rad(degrees)
    m = _eye(len(a), a.device)
    m[:, 0, 0], m[:, 0, 1] = torch.cos(a), -torch.sin(a)
    m[:, 1, 0], m[:, 1, 1] = torch.sin(a), torch.cos(a)
    return m


def _about_centre(m: torch.Tensor, size: int) -> torch.Tensor:
    """``m`` applied about the image centre ((size - 1) / 2 in pixel-centre coordinates)."""
    c = torch.full((len(m), 2), (size - 1) / 2, device=m.device)
    return _translate(c) @ m @ _translate(-c)


def _warp(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Bilinear warp of ``(B, C, S, S)`` by forward pixel matrices ``m``; outside pixels are 0.

    ``affine_grid`` wants the inverse map in [-1, 1] coordinates (pixel centres at -1..1,
    ``align_corners=True``); building it here is ~1.5x faster than kornia's warp_affine.
    """
    size = x.shape[-1]
    d = _eye(1, x.device)
    d[0, 0, 0] = d[0, 1, 1] = 2 / (size - 1)
    d[0, :2, 2] = -1
    theta = d @ torch.linalg.inv(m) @ torch.linalg.inv(d)
    grid = F.affine_grid(theta[:, :2], list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


def _erase(x: torch.Tensor, p: float, scale: tuple[float, float], value: float) -> torch.Tensor:
    """RandomErasing: with probability ``p`` per image, fill one rectangle with ``value``.

    Area ``scale`` x image, aspect ratio log-uniform in (0.3, 3.3) as torchvision's; a box
    that would not fit is clipped instead of re-drawn. One vectorised mask for the batch
    (kornia's module costs ~6x more here).
    """
    n, size, dev = len(x), x.shape[-1], x.device
    area = _uniform(n, *scale, dev) * size * size
    ratio = torch.exp(_uniform(n, math.log(0.3), math.log(3.3), dev))
    h = torch.sqrt(area * ratio).round().clamp(1, size - 1)
    w = torch.sqrt(area / ratio).round().clamp(1, size - 1)
    top = torch.floor(torch.rand(n, device=dev) * (size - h + 1))
    left = torch.floor(torch.rand(n, device=dev) * (size - w + 1))
    idx = torch.arange(size, device=dev, dtype=x.dtype)
    rows = (idx >= top[:, None]) & (idx < (top + h)[:, None])
    cols = (idx >= left[:, None]) & (idx < (left + w)[:, None])
    on = torch.rand(n, device=dev) < p
    mask = (rows[:, :, None] & cols[:, None, :] & on[:, None, None]).unsqueeze(1)
    return x.masked_fill(mask, value)


def _jpeg(x: torch.Tensor, p: float, quality_min: int) -> torch.Tensor:
    """With probability ``p`` per image, a JPEG round trip (8-bit, quality uniform in
    [quality_min, 95]) of ``(B, C, S, S)`` images in [0, 1] (C = 1 or 3: RGB); one draw
    per image."""
    on = torch.rand(len(x), device=x.device) < p
    q = torch.randint(int(quality_min), 96, (len(x),), device=x.device)
    idx = torch.nonzero(on).flatten().tolist()
    if not idx:
        return x
    u8 = (x[idx].permute(0, 2, 3, 1) * 255 + 0.5).clamp_(0, 255).to(torch.uint8).cpu().numpy()
    colour = u8.shape[-1] == 3
    out = []
    for img, quality in zip(u8, q[idx].tolist(), strict=True):
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if colour else img[..., 0]
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
        back = (
            cv2.imdecode(buf, cv2.IMREAD_COLOR if colour else cv2.IMREAD_GRAYSCALE) if ok else img
        )
        out.append(cv2.cvtColor(back, cv2.COLOR_BGR2RGB) if colour else back[..., None])
    x = x.clone()
    x[idx] = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0
    return x
