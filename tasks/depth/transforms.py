"""Per-sample geometric and photometric ops for depth samples, run on the CPU data workers.

A sample is a dict: ``"image"`` uint8 (3,H,W) plus dense keys (``depth`` / ``ground`` / ``slope``, each
(1,H,W)) that every geometric op moves together, each with the resampling and fill of its
:class:`~densefuse.tasks.DenseKey` (depth and slope nearest, so values are never blended; the ground
embedding bilinear). Values are never rescaled: a resized depth map keeps its metres (GEDepth), so the
ground embedding stays valid without touching the camera intrinsics. Other keys pass through.
Random parameters come from torch's global RNG (seeded per sample from the run's seed and the sample's
stream position by the training loader) or a given generator.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from kornia.geometry.transform import rotate as kornia_rotate
from torch import Tensor

from densefuse.tasks import DenseKey

Sample = dict
IMAGE_KEY = DenseKey("bilinear", 0.0)


def _keys(sample: Mapping, keys: Mapping[str, DenseKey]) -> list[tuple[str, DenseKey]]:
    return [("image", IMAGE_KEY)] + [(k, spec) for k, spec in keys.items() if k in sample]


def _resample(x: Tensor, size: Sequence[int], spec: DenseKey) -> Tensor:
    src = x.float()[None]
    if spec.resample == "nearest":
        out = F.interpolate(src, size=tuple(size), mode="nearest-exact")
    else:
        out = F.interpolate(src, size=tuple(size), mode="bilinear", align_corners=False)
    return _cast(out[0], x.dtype)


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    if dtype.is_floating_point:
        return x.to(dtype)
    return x.round().clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)


def _uniform(lo: float, hi: float, generator: Optional[torch.Generator]) -> float:
    return float(torch.rand((), generator=generator)) * (hi - lo) + lo


def _coin(p: float, generator: Optional[torch.Generator]) -> bool:
    return bool(torch.rand((), generator=generator) < p)


def crop(sample: Sample, top: int, left: int, size: Sequence[int], keys: Mapping[str, DenseKey]) -> Sample:
    """Window ``size`` at (top, left); parts outside the source are filled with each key's fill."""
    h, w = int(size[0]), int(size[1])
    out = dict(sample)
    for k, spec in _keys(sample, keys):
        x = sample[k]
        H, W = x.shape[-2:]
        canvas = torch.full((x.shape[0], h, w), spec.fill, dtype=x.dtype)
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + h, H), min(left + w, W)
        if y1 > y0 and x1 > x0:
            canvas[:, y0 - top:y1 - top, x0 - left:x1 - left] = x[:, y0:y1, x0:x1]
        out[k] = canvas
    return out


def kb_crop(sample: Sample, keys: Mapping[str, DenseKey], size: Sequence[int] = (352, 1216)) -> Sample:
    """KITTI benchmark crop: the bottom ``352`` rows, the centred ``1216`` columns."""
    H, W = sample["image"].shape[-2:]
    return crop(sample, H - int(size[0]), (W - int(size[1])) // 2, size, keys)


def resize(sample: Sample, size: Sequence[int], keys: Mapping[str, DenseKey]) -> Sample:
    out = dict(sample)
    for k, spec in _keys(sample, keys):
        out[k] = _resample(sample[k], size, spec)
    return out


def hflip(sample: Sample, keys: Mapping[str, DenseKey]) -> Sample:
    out = dict(sample)
    for k, _ in _keys(sample, keys):
        out[k] = sample[k].flip(-1)
    return out


def rotate(sample: Sample, degrees: float, keys: Mapping[str, DenseKey]) -> Sample:
    """Rotate about the image centre (counter-clockwise for positive ``degrees``); corners get each
    key's fill."""
    out = dict(sample)
    angle = torch.tensor([float(degrees)])
    for k, spec in _keys(sample, keys):
        x = sample[k]
        src = x.float()[None] - spec.fill  # rotate around the fill value, so the zero padding becomes the fill
        mode = "nearest" if spec.resample == "nearest" else "bilinear"
        y = kornia_rotate(src, angle, mode=mode, padding_mode="zeros", align_corners=True) + spec.fill
        out[k] = _cast(y[0], x.dtype)
    return out


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
        g, keys = self.generator, self.keys
        H, W = sample["image"].shape[-2:]
        if self.scale_range is not None:
            r = _uniform(*self.scale_range, g)
            sample = resize(sample, (max(1, round(H * r)), max(1, round(W * r))), keys)
            h, w = sample["image"].shape[-2:]
            if h < H or w < W:
                top = -int(torch.randint(0, max(H - h, 0) + 1, (), generator=g))
                left = -int(torch.randint(0, max(W - w, 0) + 1, (), generator=g))
                sample = crop(sample, top, left, (max(H, h), max(W, w)), keys)
        if self.rotate_deg > 0 and _coin(0.5, g):
            sample = rotate(sample, _uniform(-self.rotate_deg, self.rotate_deg, g), keys)
        if self.flip and _coin(0.5, g):
            sample = hflip(sample, keys)
        h, w = sample["image"].shape[-2:]
        ch, cw = self.crop_size
        top = int(torch.randint(0, max(h - ch, 0) + 1, (), generator=g))
        left = int(torch.randint(0, max(w - cw, 0) + 1, (), generator=g))
        sample = crop(sample, top, left, self.crop_size, keys)
        if self.photometric and _coin(0.5, g):
            sample = color_jitter(sample, _uniform(0.9, 1.1, g), _uniform(0.9, 1.1, g),
                                  [_uniform(0.9, 1.1, g) for _ in range(3)])
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
