"""Per-sample geometric and photometric ops for depth samples, run on the CPU data workers.

A sample is a dict: ``"image"`` uint8 (3,H,W) plus dense keys (``depth`` / ``ground`` / ``slope``, each
(1,H,W)) that every geometric op moves together, each with the resampling and fill of its
:class:`~densefuse.tasks.DenseKey` (depth and slope nearest, so values are never blended; the ground
embedding bilinear). Values are never rescaled: a resized depth map keeps its metres (GEDepth), so the
ground embedding stays valid without touching the camera intrinsics. Other keys pass through.
The geometric ops are :mod:`densefuse.data.ops` (``crop``, ``resize`` in its ``float`` style, ``hflip``,
``rotate``); random parameters come from its :class:`~densefuse.data.ops.Draw`: torch's global RNG (seeded
per sample from the run's seed and the sample's stream position by the training loader) or a given generator.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch

from densefuse.data.ops import Draw, crop, hflip, resize, rotate
from densefuse.tasks import DenseKey

Sample = dict


def kb_crop(sample: Sample, keys: Mapping[str, DenseKey], size: Sequence[int] = (352, 1216)) -> Sample:
    """KITTI benchmark crop: the bottom ``352`` rows, the centred ``1216`` columns."""
    H, W = sample["image"].shape[-2:]
    return crop(sample, H - int(size[0]), (W - int(size[1])) // 2, size, keys)


def color_jitter(sample: Sample, gamma: float, brightness: float, colors: Sequence[float]) -> Sample:
    """``(img/255)**gamma * brightness * colour[c]``, clipped (BTS / GEDepth's colour augmentation, applied
    on the 0..1 scale; GEDepth applies the gamma on 0..255, which saturates)."""
    out = dict(sample)
    x = sample["image"].float() / 255.0
    x = x.pow(gamma) * brightness * torch.tensor(list(colors), dtype=x.dtype).view(-1, 1, 1)
    out["image"] = (x.clamp(0, 1) * 255).round().to(sample["image"].dtype)
    return out


class TrainPipeline:
    """GEDepth's train pipeline after loading (and KB crop): random resize by ``U(scale_range)`` (keep
    ratio, values not rescaled), pad back to the pre-resize size when smaller (random offset), rotate
    ``U(-rotate_deg, rotate_deg)`` with p=0.5, horizontal flip with p=0.5, random crop ``crop_size``,
    colour jitter with p=0.5 (gamma, brightness, per-channel colour each ``U(0.9, 1.1)``).
    """

    def __init__(self, crop_size: Sequence[int], keys: Mapping[str, DenseKey],
                 scale_range: Optional[Sequence[float]] = (0.5, 2.0), rotate_deg: float = 2.5, flip: bool = True,
                 photometric: bool = True, generator: Optional[torch.Generator] = None) -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.keys = dict(keys)
        self.scale_range = tuple(float(s) for s in scale_range) if scale_range else None
        self.rotate_deg, self.flip, self.photometric = float(rotate_deg), bool(flip), bool(photometric)
        self.generator = generator

    def __call__(self, sample: Sample) -> Sample:
        draw, keys = Draw(self.generator), self.keys
        H, W = sample["image"].shape[-2:]
        if self.scale_range is not None:
            r = draw.uniform(*self.scale_range)
            sample = resize(sample, (max(1, round(H * r)), max(1, round(W * r))), keys)
            h, w = sample["image"].shape[-2:]
            if h < H or w < W:
                top, left = draw.randint(0, max(H - h, 0)), draw.randint(0, max(W - w, 0))
                sample = crop(sample, -top, -left, (max(H, h), max(W, w)), keys)
        if self.rotate_deg > 0 and draw.coin(0.5):
            sample = rotate(sample, draw.uniform(-self.rotate_deg, self.rotate_deg), keys)
        if self.flip and draw.coin(0.5):
            sample = hflip(sample, keys)
        top, left = draw.crop_offset(sample["image"].shape[-2:], self.crop_size)
        sample = crop(sample, top, left, self.crop_size, keys)
        if self.photometric and draw.coin(0.5):
            sample = color_jitter(sample, draw.uniform(0.9, 1.1), draw.uniform(0.9, 1.1),
                                  [draw.uniform(0.9, 1.1) for _ in range(3)])
        return sample


class Compose:
    """Apply the given ops in order (``None`` entries are skipped); picklable for DataLoader workers."""

    def __init__(self, *ops: Optional[Callable[[Sample], Sample]]) -> None:
        self.ops = [op for op in ops if op is not None]

    def __call__(self, sample: Sample) -> Sample:
        for op in self.ops:
            sample = op(sample)
        return sample


class KBCrop:
    """:func:`kb_crop` as an op (``size`` defaults to KITTI's 352x1216)."""

    def __init__(self, keys: Mapping[str, DenseKey], size: Sequence[int] = (352, 1216)) -> None:
        self.keys, self.size = dict(keys), (int(size[0]), int(size[1]))

    def __call__(self, sample: Sample) -> Sample:
        return kb_crop(sample, self.keys, self.size)
