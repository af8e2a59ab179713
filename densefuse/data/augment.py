"""Batched augmentation for dense tasks, run on the training device after collation.

A batch is a dict of tensors: ``"image"`` (B,3,H,W) on the 0-255 scale plus the task's *dense keys*
(``Task.dense_keys``: ``"label"`` (B,H,W) int64 for seg; ``"depth"``, ``"ground"``, ``"slope"``
(B,1,H,W) for depth; ...). Every geometric op moves every dense key of the batch with that key's
own :class:`~densefuse.tasks.DenseKey`: ``nearest`` keys keep exact input values (labels, sparse depth),
``bilinear`` keys are interpolated (images, continuous maps), and pixels from outside the source
take the key's ``fill`` (the image takes the mean colour, so it is 0 after normalization). A tensor
of the image's height and width that no table entry declares is an error, never silently left behind.

The per-sample forms of the geometric ops (on the CPU workers, before collation) are in
:mod:`densefuse.data.ops`. Random parameters are drawn apart from applying them (``params = op.draw(batch)``,
``op.apply(batch, params)``), so a draw can be replayed on another batch, logged, or inverted: flip
and scale-crop have ``invert`` (flip TTA maps predictions back). :class:`Augment` chains ops and keeps
the parameters of its last call. Parameters are drawn on the CPU by :class:`BatchDraw` (per-sample seeds,
else ``generator`` or torch's global RNG), so runs are reproducible on any device; the pixel work is kornia's.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from kornia.geometry.transform import crop_and_resize
from torch import Tensor, nn

from ..tasks import DenseKey
from .io import IGNORE_INDEX
from .ops import Draw, cast_to

Batch = dict
Params = dict

#: The dense keys of a segmentation batch (labels: nearest, padded with the ignore index).
SEG_KEYS: dict[str, DenseKey] = {"label": DenseKey("nearest", float(IGNORE_INDEX))}

#: Keys holding the input picture itself: bilinear, filled with the image fill (the mean colour).
IMAGE_KEYS = ("image", "raw_image")

RESAMPLE_MODES = ("bilinear", "nearest")


def dense_items(batch: Mapping[str, Any], keys: Mapping[str, DenseKey]) -> Iterator[tuple[str, DenseKey]]:
    """The dense keys present in ``batch`` with their :class:`DenseKey` (image keys excluded).

    A tensor with the image's height and width that ``keys`` does not declare raises ``KeyError``: a
    geometric op would leave it misaligned with the image."""
    hw = tuple(batch["image"].shape[-2:])
    for name, value in batch.items():
        if name in IMAGE_KEYS or not isinstance(value, Tensor):
            continue
        if name in keys:
            spec = keys[name]
            if spec.resample not in RESAMPLE_MODES:
                raise ValueError(f"dense key '{name}': resample must be one of {RESAMPLE_MODES}, got {spec.resample!r}")
            yield name, spec
        elif value.ndim >= 3 and tuple(value.shape[-2:]) == hw:
            raise KeyError(f"batch key '{name}' is a per-pixel map not declared in the dense-key table "
                           f"({', '.join(keys) or 'empty'}); declare it in Task.dense_keys")


def _as_nchw(x: Tensor) -> tuple[Tensor, int]:
    """(B,C,H,W) float view of a dense tensor ((B,H,W) maps get a channel) and its original ndim."""
    y = x.unsqueeze(1) if x.ndim == 3 else x
    return (y if y.dtype in (torch.float32, torch.float64) else y.to(torch.float32)), x.ndim


def _restore(y: Tensor, ndim: int, like: Tensor) -> Tensor:
    return cast_to(y.squeeze(1) if ndim == 3 else y, like.dtype)


def _float_image(x: Tensor) -> Tensor:
    return x if torch.is_floating_point(x) else x.float()


#: batch key of per-sample seeds (B,) int64 that the training loader adds (densefuse.data.loader)
SAMPLE_SEED = "sample_seed"


class BatchDraw:
    """:class:`~densefuse.data.ops.Draw` for a batch: each call gives one value per sample, (B,) CPU tensors.

    With the loader's ``sample_seed`` in ``batch`` each sample draws from its own stream
    (``Draw.seeded(seed, salt)``, ``salt`` naming the op): a sample's parameters depend on its position in
    the global stream only, so N processes with batch b/N draw what one process with batch b draws.
    Without it (a batch made by hand), the values come from ``generator`` (or torch's global RNG)."""

    def __init__(self, batch: Mapping[str, Any], generator: Optional[torch.Generator], salt: str) -> None:
        self.size, self.generator = batch["image"].shape[0], generator
        seeds = batch.get(SAMPLE_SEED)
        self.samples = ([Draw.seeded(int(v), salt) for v in seeds.tolist()]
                        if isinstance(seeds, Tensor) and seeds.numel() == self.size else None)

    def rand(self) -> Tensor:
        """Uniform [0, 1), (B,) float32."""
        if self.samples is None:
            return torch.rand(self.size, generator=self.generator)
        return torch.stack([d.rand() for d in self.samples])

    def uniform(self, lo: float, hi: float) -> Tensor:
        """Uniform [lo, hi), (B,) float32."""
        return self.rand() * (hi - lo) + lo

    def coin(self, p: float) -> Tensor:
        """(B,) bool, each true with probability ``p``."""
        return self.rand() < p


class Op(nn.Module, ABC):
    """One augmentation: ``draw(batch) -> params`` (random, CPU tensors) and ``apply(batch, params)``
    (deterministic). ``forward`` is ``apply(batch, draw(batch))``."""

    @abstractmethod
    def draw(self, batch: Mapping[str, Tensor]) -> Params:
        """Random parameters for ``batch`` (one entry per sample where it varies)."""

    @abstractmethod
    def apply(self, batch: Mapping[str, Tensor], params: Params) -> Batch:
        """``batch`` transformed with ``params`` (no randomness)."""

    def forward(self, batch: Batch) -> Batch:
        return self.apply(batch, self.draw(batch))


class GeometricOp(Op):
    """An op that moves pixels: it carries the dense-key table and the image fill colour."""

    def __init__(self, keys: Optional[Mapping[str, DenseKey]] = None, image_fill: Sequence[float] = (0.0, 0.0, 0.0),
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        self.keys = dict(SEG_KEYS if keys is None else keys)
        self.image_fill = [float(v) for v in image_fill]
        self.generator = generator


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


def _warp(x: Tensor, boxes: Tensor, size: tuple[int, int], resample: str, fill: Tensor) -> Tensor:
    """Sample ``x`` (B,C,H,W float) inside ``boxes``; outside pixels become ``fill`` ((1,C,1,1) or scalar).

    Bilinear: ``warp(x - fill) + fill``, so borders blend towards the fill as constant padding does.
    Nearest: values are copied exactly and a warped validity mask decides where the fill goes."""
    boxes = boxes.to(x.device, x.dtype)
    if resample == "bilinear":
        return crop_and_resize(x - fill, boxes, size, mode="bilinear", align_corners=True) + fill
    ones = torch.ones_like(x[:, :1])
    warped = crop_and_resize(torch.cat([x, ones], 1), boxes, size, mode="nearest", align_corners=True)
    inside = warped[:, -1:] > 0.5
    return torch.where(inside, warped[:, :-1], fill)


def scale_crop(
    batch: Mapping[str, Tensor],
    scale: Tensor,
    offset: Tensor,
    size: Optional[Sequence[int]] = None,
    keys: Optional[Mapping[str, DenseKey]] = None,
    image_fill: Sequence[float] = (0.0, 0.0, 0.0),
) -> Batch:
    """Resize every sample by ``scale[b]`` and cut a ``size`` window at ``offset[b] = (y0, x0)``.

    ``offset`` is in the coordinates of the *scaled* image (as mmseg's RandomCrop after RandomResize).
    The image is bilinear with ``image_fill`` outside (0-255 scale; pass the normalization mean to get 0
    after :func:`normalize`, like mmseg's preprocessor padding); every dense key of ``keys`` (default
    :data:`SEG_KEYS`) moves with its own resampling and fill. Returns float images.
    """
    keys = SEG_KEYS if keys is None else keys
    img = _float_image(batch["image"])
    _, _, H, W = img.shape
    out_size = (int(size[0]), int(size[1])) if size is not None else (H, W)
    scale = scale.to(torch.float32).cpu()
    offset = offset.to(torch.float32).cpu()
    boxes = _boxes(scale, offset[:, 0] / scale, offset[:, 1] / scale, out_size)
    out = dict(batch)
    fill = torch.as_tensor(image_fill, dtype=img.dtype, device=img.device).view(1, -1, 1, 1)
    out["image"] = _warp(img, boxes, out_size, "bilinear", fill)
    if "raw_image" in batch:
        raw = batch["raw_image"]
        out["raw_image"] = _restore(_warp(_float_image(raw), boxes, out_size, "bilinear", fill), 4, raw)
    for name, spec in dense_items(batch, keys):
        x, ndim = _as_nchw(batch[name])
        value = torch.tensor(spec.fill, dtype=x.dtype, device=x.device)
        out[name] = _restore(_warp(x, boxes, out_size, spec.resample, value), ndim, batch[name])
    return out


class RandomScaleCrop(GeometricOp):
    """mmseg ``RandomResize(ratio_range) + RandomCrop + pad`` on a batch, one scale per sample.

    Each sample is scaled by ``r ~ U(scale_range)`` and a ``size`` window (default: the input size)
    is placed uniformly inside the scaled image; when the scaled image is smaller than the window
    it sits at the top-left and the rest is padded (bottom/right, as mmseg pads).
    Parameters: ``{"scale": (B,), "offset": (B,2) (y0, x0), "in_size": (2,)}``.
    """

    def __init__(
        self,
        size: Optional[Sequence[int]] = None,
        scale_range: Sequence[float] = (0.5, 2.0),
        keys: Optional[Mapping[str, DenseKey]] = None,
        image_fill: Sequence[float] = (0.0, 0.0, 0.0),
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__(keys, image_fill, generator)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))

    def draw(self, batch: Mapping[str, Tensor]) -> Params:
        b, _, H, W = batch["image"].shape
        h, w = self.size or (H, W)
        draw = BatchDraw(batch, self.generator, "RandomScaleCrop")
        r = draw.uniform(*self.scale_range)
        room_y = (H * r - h).clamp(min=0)
        room_x = (W * r - w).clamp(min=0)
        off = torch.stack([draw.rand() * room_y, draw.rand() * room_x], 1).floor()
        return {"scale": r, "offset": off, "in_size": torch.tensor([H, W])}

    def apply(self, batch: Mapping[str, Tensor], params: Params) -> Batch:
        H, W = batch["image"].shape[-2:]
        size = self.size or (H, W)
        return scale_crop(batch, params["scale"], params["offset"], size, self.keys, self.image_fill)

    def invert(self, batch: Mapping[str, Tensor], params: Params) -> Batch:
        """Map a batch in output coordinates back onto the input grid (scale ``1/r``, window back in
        place). Pixels the crop never saw take each key's fill."""
        scale = params["scale"].to(torch.float32)
        off = params["offset"].to(torch.float32)
        H, W = (int(v) for v in params["in_size"])
        # the input pixel at (y, x) sits at (y*r - y0, x*r - x0) of the output, so the inverse is a
        # scale-crop by 1/r starting at -offset/r in the output's coordinates scaled by 1/r
        return scale_crop(batch, 1.0 / scale, -off / scale, (H, W), self.keys, self.image_fill)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale_range={self.scale_range}, keys={list(self.keys)}"


# --------------------------------------------------------------------------------------------------
# flip


def hflip(batch: Mapping[str, Tensor], mask: Optional[Tensor] = None,
          keys: Optional[Mapping[str, DenseKey]] = None) -> Batch:
    """Mirror the samples where ``mask`` (B,) is true (all of them when ``mask`` is None): the image
    and every dense key of ``keys`` (default :data:`SEG_KEYS`)."""
    keys = SEG_KEYS if keys is None else keys
    out = dict(batch)
    names = [k for k in IMAGE_KEYS if k in batch] + [k for k, _ in dense_items(batch, keys)]
    for key in names:
        x = batch[key]
        if mask is None:
            out[key] = x.flip(-1)
        else:
            m = mask.to(x.device).view(-1, *([1] * (x.ndim - 1)))
            out[key] = torch.where(m, x.flip(-1), x)
    return out


class RandomHorizontalFlip(GeometricOp):
    """Flip each sample (image and every dense key) with probability ``p``. Parameters: ``{"flip": (B,) bool}``;
    a flip is its own inverse."""

    def __init__(self, p: float = 0.5, keys: Optional[Mapping[str, DenseKey]] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(keys, generator=generator)
        self.p = float(p)

    def draw(self, batch: Mapping[str, Tensor]) -> Params:
        return {"flip": BatchDraw(batch, self.generator, "RandomHorizontalFlip").coin(self.p)}

    def apply(self, batch: Mapping[str, Tensor], params: Params) -> Batch:
        return hflip(batch, params["flip"], self.keys)

    def invert(self, batch: Mapping[str, Tensor], params: Params) -> Batch:
        return hflip(batch, params["flip"], self.keys)

    def extra_repr(self) -> str:
        return f"p={self.p}, keys={list(self.keys)}"


# --------------------------------------------------------------------------------------------------
# photometric distortion (mmseg PhotoMetricDistortion, via kornia.enhance)


class PhotoMetricDistortion(Op):
    """mmseg's ``PhotoMetricDistortion`` on the image only, per sample, on the 0-255 scale.

    Each op fires with probability ``p`` (0.5): brightness (add U(-delta, delta)), contrast
    (multiply by U(contrast_range)) either before or after the colour ops (a coin per sample, like
    mmseg's ``mode``), saturation (scale HSV S by U(saturation_range)) and hue (shift by
    U(-hue_delta, hue_delta) on OpenCV's 0-180 hue circle). Outputs are clipped to [0, 255] after
    each op but, unlike mmseg, not rounded to uint8 in between. Dense keys are untouched.
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

    def draw(self, batch: Mapping[str, Tensor]) -> Params:
        draw = BatchDraw(batch, self.generator, "PhotoMetricDistortion")

        def factor(lo: float, hi: float, identity: float) -> Tensor:
            v = draw.uniform(lo, hi)
            return torch.where(draw.coin(self.p), v, torch.full_like(v, identity))

        return {
            "brightness": factor(-self.brightness_delta / 255.0, self.brightness_delta / 255.0, 0.0),
            "contrast": factor(*self.contrast_range, 1.0),
            "contrast_first": draw.coin(0.5),
            "saturation": factor(*self.saturation_range, 1.0),
            "hue": factor(-self.hue_delta / 180.0, self.hue_delta / 180.0, 0.0) * (2 * math.pi),
        }

    def apply(self, batch: Mapping[str, Tensor], params: Params) -> Batch:
        img = _float_image(batch["image"])
        p = {k: v.to(img.device, img.dtype if v.dtype != torch.bool else torch.bool) for k, v in params.items()}
        one = torch.ones_like(p["contrast"])
        x = (img / 255.0).clamp(0, 1)
        x = adjust_brightness(x, p["brightness"])
        x = adjust_contrast(x, torch.where(p["contrast_first"], p["contrast"], one))
        x = adjust_saturation(x, p["saturation"]).clamp(0, 1)
        x = adjust_hue(x, p["hue"]).clamp(0, 1)
        x = adjust_contrast(x, torch.where(p["contrast_first"], one, p["contrast"]))
        out = dict(batch)
        out["image"] = x * 255.0
        return out

    def extra_repr(self) -> str:
        return (f"brightness_delta={self.brightness_delta}, contrast_range={self.contrast_range}, "
                f"saturation_range={self.saturation_range}, hue_delta={self.hue_delta}, p={self.p}")


# --------------------------------------------------------------------------------------------------
# the chain


class Augment(nn.Module):
    """Ops applied in order, then :class:`Normalize` (when given).

    ``forward(batch)`` draws fresh parameters and keeps them in ``last_params`` (one dict per op);
    ``forward(batch, params)`` replays given parameters, so the same draw can move another batch (a
    prediction, a second view) identically. ``invert(batch, params)`` undoes the invertible geometric
    ops in reverse order (flip, scale-crop) and skips the others (photometric ops have no geometry).
    """

    def __init__(self, ops: Sequence[Op], normalize: Optional[Normalize] = None) -> None:
        super().__init__()
        self.ops = nn.ModuleList(ops)
        self.normalize = normalize
        self.last_params: Optional[list[Params]] = None

    def forward(self, batch: Batch, params: Optional[Sequence[Params]] = None) -> Batch:
        if params is not None and len(params) != len(self.ops):
            raise ValueError(f"{len(params)} parameter sets for {len(self.ops)} ops")
        used: list[Params] = []
        out = dict(batch)
        for i, op in enumerate(self.ops):
            p = op.draw(out) if params is None else params[i]
            out = op.apply(out, p)
            used.append(p)
        self.last_params = used
        return self.normalize(out) if self.normalize is not None else out

    def invert(self, batch: Batch, params: Sequence[Params]) -> Batch:
        out = dict(batch)
        for op, p in reversed(list(zip(self.ops, params))):
            if hasattr(op, "invert"):
                out = op.invert(out, p)
        return out


def build_augmentation(
    mean: Sequence[float],
    std: Sequence[float],
    size: Optional[Sequence[int]] = None,
    scale_range: Optional[Sequence[float]] = (0.5, 2.0),
    flip: bool = True,
    photometric: bool = False,
    keys: Optional[Mapping[str, DenseKey]] = None,
    generator: Optional[torch.Generator] = None,
) -> Augment:
    """The standard training pipeline: [photometric] -> [scale-crop] -> [flip] -> normalize.

    ``keys`` is the task's dense-key table (``Task.dense_keys``; default :data:`SEG_KEYS`). The image is
    padded with ``mean`` (0 after normalization, mmseg's padding). Photometric ops are per-pixel, so
    running them before the geometric ones (instead of after, as in mmseg) only differs in the padded
    area, which this order leaves at the mean colour. ``scale_range=None`` (or ``[1, 1]``) disables the
    scale-crop.
    """
    ops: list[Op] = []
    if photometric:
        ops.append(PhotoMetricDistortion(generator=generator))
    if scale_range is not None and tuple(float(v) for v in scale_range) != (1.0, 1.0):
        ops.append(RandomScaleCrop(size, scale_range, keys, image_fill=mean, generator=generator))
    if flip:
        ops.append(RandomHorizontalFlip(0.5, keys, generator=generator))
    return Augment(ops, Normalize(mean, std))
