"""Batched augmentation for dense tasks, run on the training device after collation (kornia style).

Every transform takes and returns a dict batch::

    {"image": uint8 or float (B,3,H,W) on the 0-255 scale, "label": int64 (B,H,W), "depth": float (B,1,H,W), ...}

``label`` and ``depth`` are optional; other keys pass through untouched. Geometric transforms move
all dense keys together: images are resampled bilinearly, labels and depth with nearest neighbour,
so every output label/depth value is an exact input value. Outside the image, labels are padded
with ``ignore_index`` (255) and depth with 0 ("invalid"). Each transform is a functional op plus a
small ``nn.Module`` that draws the random parameters (from ``generator`` if given, else torch's
global RNG, always on the CPU so runs are reproducible on any device). Compose them with
``nn.Sequential`` or use :func:`build_augmentation`.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from kornia.geometry.transform import crop_and_resize
from torch import Tensor, nn

from .io import IGNORE_INDEX

Batch = dict


def _float_image(x: Tensor) -> Tensor:
    return x.float() if not torch.is_floating_point(x) else x


def _uniform(n: int, lo: float, hi: float, generator: Optional[torch.Generator]) -> Tensor:
    return torch.rand(n, generator=generator) * (hi - lo) + lo


def _coin(n: int, p: float, generator: Optional[torch.Generator]) -> Tensor:
    return torch.rand(n, generator=generator) < p


# --------------------------------------------------------------------------------------------------
# normalization


def normalize(batch: Mapping[str, Tensor], mean: Sequence[float], std: Sequence[float], keep_raw: bool = True) -> Batch:
    """``image -> (image - mean) / std`` with mean/std on the 0-255 scale (mmseg's data preprocessor).

    With ``keep_raw`` the un-normalized image is kept as uint8 under ``"raw_image"`` (for visuals),
    unless the batch already has one.
    """
    out = dict(batch)
    img = batch["image"]
    if keep_raw and "raw_image" not in out:
        out["raw_image"] = img if img.dtype == torch.uint8 else img.detach().round().clamp(0, 255).to(torch.uint8)
    x = _float_image(img)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    out["image"] = (x - m) / s
    return out


class Normalize(nn.Module):
    """Module form of :func:`normalize`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], keep_raw: bool = True) -> None:
        super().__init__()
        self.mean, self.std, self.keep_raw = list(mean), list(std), keep_raw

    def forward(self, batch: Batch) -> Batch:
        return normalize(batch, self.mean, self.std, self.keep_raw)

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}"


# --------------------------------------------------------------------------------------------------
# scale + crop (mmseg RandomResize(ratio_range) + RandomCrop + pad, batched)


def _boxes(scale: Tensor, y0: Tensor, x0: Tensor, size: tuple[int, int]) -> Tensor:
    """kornia corner boxes (B,4,2) sampling an output of ``size`` from source pixels scaled by ``scale``.

    The source region starts at (y0, x0) (pixel edges) and spans ``size / scale`` pixels. Corners are
    the centres of the first/last output pixels mapped back to the source, so with
    ``align_corners=True`` the sampling equals an ``align_corners=False`` resize (identity at scale 1).
    """
    h, w = size
    step = 1.0 / scale  # source pixels per output pixel
    left = x0 + 0.5 * step - 0.5
    right = x0 + (w - 0.5) * step - 0.5
    top = y0 + 0.5 * step - 0.5
    bottom = y0 + (h - 0.5) * step - 0.5
    return torch.stack(
        [torch.stack([left, top], -1), torch.stack([right, top], -1),
         torch.stack([right, bottom], -1), torch.stack([left, bottom], -1)], dim=1
    )


def scale_crop(
    batch: Mapping[str, Tensor],
    scale: Tensor,
    offset: Tensor,
    size: Optional[Sequence[int]] = None,
    ignore_index: int = IGNORE_INDEX,
    fill: Sequence[float] = (0.0, 0.0, 0.0),
) -> Batch:
    """Resize every sample by ``scale[b]`` and cut a ``size`` window at ``offset[b] = (y0, x0)``.

    ``offset`` is in the coordinates of the *scaled* image (as mmseg's RandomCrop after RandomResize).
    Where the window leaves the image, the image is ``fill`` (0-255 scale; pass the normalization mean
    to get 0 after :func:`normalize`, like mmseg's preprocessor padding), labels ``ignore_index`` and
    depth 0. Images are bilinear; labels and depth nearest (values stay exact). Returns float images.
    """
    img = _float_image(batch["image"])
    b, _, H, W = img.shape
    out_size = (int(size[0]), int(size[1])) if size is not None else (H, W)
    dev = img.device
    scale = scale.to(torch.float32).cpu()
    offset = offset.to(torch.float32).cpu()
    boxes = _boxes(scale, offset[:, 0] / scale, offset[:, 1] / scale, out_size).to(dev)
    out = dict(batch)
    f = torch.as_tensor(fill, dtype=img.dtype, device=dev).view(1, -1, 1, 1)
    out["image"] = crop_and_resize(img - f, boxes.to(img.dtype), out_size, mode="bilinear", align_corners=True) + f
    nearest = []
    if "label" in batch:
        # shift by one so the zero padding marks "outside"; float32 holds every label value exactly
        nearest.append((batch["label"].unsqueeze(1).to(torch.float32) + 1.0))
    if "depth" in batch:
        nearest.append(batch["depth"].to(torch.float32))
    if nearest:
        warped = crop_and_resize(torch.cat(nearest, 1), boxes.float(), out_size, mode="nearest", align_corners=True)
        k = 0
        if "label" in batch:
            lab = warped[:, 0].round().to(torch.int64)
            out["label"] = torch.where(lab == 0, torch.full_like(lab, ignore_index), lab - 1)
            k = 1
        if "depth" in batch:
            out["depth"] = warped[:, k:].to(batch["depth"].dtype)
    return out


class RandomScaleCrop(nn.Module):
    """mmseg ``RandomResize(ratio_range) + RandomCrop + pad`` on a batch, one scale per sample.

    Each sample is scaled by ``r ~ U(scale_range)`` and a ``size`` window (default: the input size)
    is placed uniformly inside the scaled image; when the scaled image is smaller than the window
    it sits at the top-left and the rest is padded (bottom/right, as mmseg pads).
    """

    def __init__(
        self,
        size: Optional[Sequence[int]] = None,
        scale_range: Sequence[float] = (0.5, 2.0),
        ignore_index: int = IGNORE_INDEX,
        fill: Sequence[float] = (0.0, 0.0, 0.0),
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.ignore_index = ignore_index
        self.fill = list(fill)
        self.generator = generator

    def forward(self, batch: Batch) -> Batch:
        b, _, H, W = batch["image"].shape
        h, w = self.size or (H, W)
        r = _uniform(b, *self.scale_range, self.generator)
        room_y = (H * r - h).clamp(min=0)
        room_x = (W * r - w).clamp(min=0)
        off = torch.stack([torch.rand(b, generator=self.generator) * room_y,
                           torch.rand(b, generator=self.generator) * room_x], 1).floor()
        return scale_crop(batch, r, off, (h, w), self.ignore_index, self.fill)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale_range={self.scale_range}, ignore_index={self.ignore_index}"


# --------------------------------------------------------------------------------------------------
# flip


def hflip(batch: Mapping[str, Tensor], mask: Optional[Tensor] = None) -> Batch:
    """Mirror the samples where ``mask`` (B,) is true (all of them when ``mask`` is None)."""
    out = dict(batch)
    for key in ("image", "label", "depth", "raw_image"):
        if key not in batch:
            continue
        x = batch[key]
        if mask is None:
            out[key] = x.flip(-1)
        else:
            m = mask.to(x.device).view(-1, *([1] * (x.ndim - 1)))
            out[key] = torch.where(m, x.flip(-1), x)
    return out


class RandomHorizontalFlip(nn.Module):
    """Flip each sample (image, label, depth together) with probability ``p``."""

    def __init__(self, p: float = 0.5, generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, batch: Batch) -> Batch:
        return hflip(batch, _coin(batch["image"].shape[0], self.p, self.generator))

    def extra_repr(self) -> str:
        return f"p={self.p}"


# --------------------------------------------------------------------------------------------------
# photometric distortion (mmseg PhotoMetricDistortion, via kornia.enhance)


class PhotoMetricDistortion(nn.Module):
    """mmseg's ``PhotoMetricDistortion`` on the image only, per sample, on the 0-255 scale.

    Each op fires with probability ``p`` (0.5): brightness (add U(-delta, delta)), contrast
    (multiply by U(contrast_range)) either before or after the colour ops (a coin per sample, like
    mmseg's ``mode``), saturation (scale HSV S by U(saturation_range)) and hue (shift by
    U(-hue_delta, hue_delta) on OpenCV's 0-180 hue circle). Outputs are clipped to [0, 255] after
    each op but, unlike mmseg, not rounded to uint8 in between.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: float = 18.0,
        p: float = 0.5,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = (float(contrast_range[0]), float(contrast_range[1]))
        self.saturation_range = (float(saturation_range[0]), float(saturation_range[1]))
        self.hue_delta = float(hue_delta)
        self.p = p
        self.generator = generator

    def forward(self, batch: Batch) -> Batch:
        img = _float_image(batch["image"])
        b, g = img.shape[0], self.generator

        def factor(lo: float, hi: float, identity: float) -> Tensor:
            v = _uniform(b, lo, hi, g)
            return torch.where(_coin(b, self.p, g), v, torch.full_like(v, identity)).to(img.device, img.dtype)

        bright = factor(-self.brightness_delta / 255.0, self.brightness_delta / 255.0, 0.0)
        contrast = factor(*self.contrast_range, 1.0)
        contrast_first = _coin(b, 0.5, g).to(img.device)
        sat = factor(*self.saturation_range, 1.0)
        hue = factor(-self.hue_delta / 180.0, self.hue_delta / 180.0, 0.0) * (2 * math.pi)
        one = torch.ones_like(contrast)

        x = (img / 255.0).clamp(0, 1)
        x = adjust_brightness(x, bright)
        x = adjust_contrast(x, torch.where(contrast_first, contrast, one))
        x = adjust_saturation(x, sat).clamp(0, 1)
        x = adjust_hue(x, hue).clamp(0, 1)
        x = adjust_contrast(x, torch.where(contrast_first, one, contrast))
        out = dict(batch)
        out["image"] = x * 255.0
        return out

    def extra_repr(self) -> str:
        return (f"brightness_delta={self.brightness_delta}, contrast_range={self.contrast_range}, "
                f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta}, p={self.p}")


# --------------------------------------------------------------------------------------------------


def build_augmentation(
    mean: Sequence[float],
    std: Sequence[float],
    size: Optional[Sequence[int]] = None,
    scale_range: Optional[Sequence[float]] = (0.5, 2.0),
    flip: bool = True,
    photometric: bool = False,
    ignore_index: int = IGNORE_INDEX,
    generator: Optional[torch.Generator] = None,
) -> nn.Sequential:
    """The standard training pipeline: [photometric] -> [scale-crop] -> [flip] -> normalize.

    Photometric ops are per-pixel, so running them before the geometric ones (instead of after, as
    in mmseg) only differs in the padded area, which this order leaves at the mean colour (0 after
    normalization, mmseg's padding). ``scale_range=None`` (or ``[1, 1]``) disables the scale-crop.
    """
    ops: list[nn.Module] = []
    if photometric:
        ops.append(PhotoMetricDistortion(generator=generator))
    if scale_range is not None and tuple(scale_range) != (1.0, 1.0):
        ops.append(RandomScaleCrop(size, scale_range, ignore_index, fill=mean, generator=generator))
    if flip:
        ops.append(RandomHorizontalFlip(0.5, generator=generator))
    ops.append(Normalize(mean, std))
    return nn.Sequential(*ops)
