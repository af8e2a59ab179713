"""Per-sample ops over a sample's image and its dense keys, and the one random-draw helper.

A sample is a dict: ``"image"`` (C,H,W) plus the task's *dense keys* (``Task.dense_keys``: ``label``
(H,W), ``depth`` / ``ground`` / ``slope`` (1,H,W), ``valid`` ...). Every geometric op here (crop, pad,
resize, flip, rotate) moves the image and every dense key present in the sample, each with the resampling
and fill of its :class:`~densefuse.tasks.DenseKey`: ``nearest`` keys keep exact input values, ``bilinear``
ones are interpolated, pixels from outside the source take the key's fill (the image takes ``image_fill``,
one number or one per channel). Keys that the table does not name pass through untouched. The batched
device-side ops are in :mod:`densefuse.data.augment`; task-only rules (mmseg's cat_max_ratio crop search,
label maps) stay in their task package.

Random parameters come from :class:`Draw`: torch's global CPU RNG by default, which the training loader
seeds per sample from the run's seed and the sample's position in the global stream
(:class:`~densefuse.data.loader.SeededSamples`), or a given generator; ``Draw.seeded`` derives a sample's
own generator from its seed (the batched ops' ``sample_seed``).
"""
from __future__ import annotations

import zlib
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from kornia.geometry.transform import rotate as kornia_rotate
from torch import Tensor

from ..tasks import DenseKey

Sample = dict
#: an image fill: one value, or one per channel
Fill = Union[float, Sequence[float]]

#: resize conventions: ``cv2`` (mmseg / OpenCV: nearest picks ``floor(dst * in / out)``, uint8 images
#: interpolate in fixed point like INTER_LINEAR) and ``float`` (nearest at pixel centres, PyTorch's
#: ``nearest-exact``; bilinear in float32, rounded back to integer dtypes)
RESIZE_STYLES = ("cv2", "float")


class Draw:
    """The random source of one sample's parameters.

    Draws come from ``generator`` when given, else from torch's global CPU RNG: leave it unset in a
    training loader, which seeds that RNG per sample (a generator would be copied into every worker and
    repeat there). Every call consumes one value of the stream, so the order of calls is the stream's
    contract: a transform that keeps its call order keeps its outputs."""

    def __init__(self, generator: Optional[torch.Generator] = None) -> None:
        self.generator = generator

    @classmethod
    def seeded(cls, seed: int, salt: str) -> "Draw":
        """A sample's own stream from its seed, salted with the op's name (``crc32``) so two ops of one
        sample draw unrelated values."""
        return cls(torch.Generator().manual_seed((int(seed) + zlib.crc32(salt.encode())) % 2**63))

    def rand(self) -> Tensor:
        """One uniform [0, 1) value as a 0-d float32 tensor (for batched arithmetic)."""
        return torch.rand((), generator=self.generator)

    def uniform(self, lo: float, hi: float) -> float:
        """Uniform in [lo, hi)."""
        return float(self.rand()) * (hi - lo) + lo

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (both ends included)."""
        return int(torch.randint(lo, hi + 1, (), generator=self.generator))

    def coin(self, p: float = 0.5) -> bool:
        """True with probability ``p``."""
        return float(self.rand()) < p

    def crop_offset(self, size: Sequence[int], crop_size: Sequence[int]) -> tuple[int, int]:
        """(top, left) of a ``crop_size`` window placed uniformly inside ``size`` (0 on a side where the
        window is larger: the padding then goes bottom/right)."""
        top = self.randint(0, max(int(size[0]) - int(crop_size[0]), 0))
        left = self.randint(0, max(int(size[1]) - int(crop_size[1]), 0))
        return top, left


def moved_keys(sample: Mapping, keys: Mapping[str, DenseKey], image_fill: Fill = 0.0) -> list[tuple[str, DenseKey, Fill]]:
    """``(name, DenseKey, fill)`` of the image and of every key of ``keys`` present in ``sample``."""
    out: list[tuple[str, DenseKey, Fill]] = [("image", DenseKey("bilinear", 0.0), image_fill)]
    return out + [(k, spec, spec.fill) for k, spec in keys.items() if k in sample and k != "image"]


def cast_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A resampled float map back to ``dtype``: integer dtypes round and clamp to their range."""
    if dtype.is_floating_point:
        return x.to(dtype)
    return x.round().clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max).to(dtype)


def _canvas(x: Tensor, size: tuple[int, int], fill: Fill) -> Tensor:
    """A tensor shaped like ``x`` but ``size`` in its last two dims, holding ``fill``."""
    shape = (*x.shape[:-2], *size)
    if isinstance(fill, (int, float)):
        return torch.full(shape, fill, dtype=x.dtype)
    return torch.as_tensor(fill, dtype=x.dtype).view(-1, 1, 1).expand(shape).clone()


def crop_tensor(x: Tensor, top: int, left: int, size: Sequence[int], fill: Fill = 0.0) -> Tensor:
    """The ``size`` window of ``x`` at (top, left), a new contiguous tensor; window parts outside ``x``
    (negative offsets, or past the bottom/right edge) hold ``fill``."""
    h, w = int(size[0]), int(size[1])
    H, W = x.shape[-2:]
    if top >= 0 and left >= 0 and top + h <= H and left + w <= W:
        return x[..., top:top + h, left:left + w].clone(memory_format=torch.contiguous_format)
    canvas = _canvas(x, (h, w), fill)
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, H), min(left + w, W)
    if y1 > y0 and x1 > x0:
        canvas[..., y0 - top:y1 - top, x0 - left:x1 - left] = x[..., y0:y1, x0:x1]
    return canvas


def crop(sample: Sample, top: int, left: int, size: Sequence[int], keys: Mapping[str, DenseKey],
         image_fill: Fill = 0.0) -> Sample:
    """The ``size`` window at (top, left) of the image and every dense key; outside parts take each key's
    fill (so a window larger than the sample pads it)."""
    out = dict(sample)
    for name, _, fill in moved_keys(sample, keys, image_fill):
        out[name] = crop_tensor(sample[name], top, left, size, fill)
    return out


def pad(sample: Sample, size: Sequence[int], keys: Mapping[str, DenseKey], image_fill: Fill = 0.0) -> Sample:
    """Pad the bottom/right of the image and every dense key to at least ``size`` (mmseg's padding)."""
    H, W = sample["image"].shape[-2:]
    return crop(sample, 0, 0, (max(H, int(size[0])), max(W, int(size[1]))), keys, image_fill)


def nearest_index(in_len: int, out_len: int, start: int = 0, stop: Optional[int] = None) -> Tensor:
    """Source indices of output positions ``start:stop`` of a nearest resize from ``in_len`` to ``out_len``:
    ``min(floor(dst * (in / out)), in - 1)`` in float32, the arithmetic of PyTorch's (and cv2's) nearest."""
    stop = out_len if stop is None else stop
    if in_len == out_len:
        return torch.arange(start, stop)
    scale = torch.tensor(in_len, dtype=torch.float32) / torch.tensor(out_len, dtype=torch.float32)
    idx = (torch.arange(start, stop, dtype=torch.float32) * scale).floor_().long()
    return idx.clamp_(max=in_len - 1)


def _bilinear_uint8(image: Tensor, size: tuple[int, int], cache: Optional[dict] = None) -> Tensor:
    """Bilinear resize of a (C,H,W) image; a uint8 result keeps channels-last strides (no copy back).

    With ``cache`` (a dict), a uint8 result is written into a buffer kept there and reused by the next call
    (a fresh multi-megabyte output costs more in page faults than the resize): copy what you keep of it."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    x = image[None]
    if x.dtype != torch.uint8:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0]
    x = x.contiguous(memory_format=torch.channels_last)
    if cache is None:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0]
    c, (h, w) = x.shape[1], (int(size[0]), int(size[1]))
    flat = cache.get("resized")
    if flat is None or flat.numel() < c * h * w:
        flat = cache["resized"] = torch.empty(c * h * w, dtype=torch.uint8)
    out = flat[: c * h * w].view(1, h, w, c).permute(0, 3, 1, 2)  # channels-last (1, C, h, w)
    torch.ops.aten.upsample_bilinear2d.out(x, [h, w], False, None, None, out=out)
    return out[0]


def resize_tensor(x: Tensor, size: Sequence[int], resample: str, style: str = "float",
                  box: Optional[tuple[int, int, int, int]] = None, cache: Optional[dict] = None) -> Tensor:
    """``x`` resized to ``size`` in its last two dims with ``resample`` (``bilinear`` | ``nearest``) under a
    :data:`RESIZE_STYLES` convention, then cut to ``box`` = (y1, y2, x1, x2) when given.

    ``cv2``: nearest gathers only the box (every value an input value, any dtype); bilinear keeps uint8 in
    PyTorch's fixed-point channels-last kernel (within 1 of the float result, like cv2's INTER_LINEAR) and
    returns a view (of the ``cache`` buffer when given: copy what you keep). ``float``: the whole map is
    interpolated in float32 (``nearest-exact`` or ``bilinear``, ``align_corners=False``) and cast back."""
    if style not in RESIZE_STYLES:
        raise ValueError(f"resize style must be one of {RESIZE_STYLES}, got {style!r}")
    if resample not in ("bilinear", "nearest"):
        raise ValueError(f"resample must be 'bilinear' or 'nearest', got {resample!r}")
    h, w = int(size[0]), int(size[1])
    y1, y2, x1, x2 = box if box is not None else (0, h, 0, w)
    if style == "cv2" and resample == "nearest":
        H, W = x.shape[-2:]
        if (H, W) == (h, w):
            return x[..., y1:y2, x1:x2].contiguous()
        rows = x.index_select(-2, nearest_index(H, h, y1, y2))
        # gather with an expanded index: 5x faster than index_select along the last dim on the CPU
        return torch.gather(rows, -1, nearest_index(W, w, x1, x2).expand(*rows.shape[:-1], -1))
    if style == "cv2":
        return _bilinear_uint8(x, (h, w), cache)[..., y1:y2, x1:x2]
    mode = {"nearest": "nearest-exact", "bilinear": "bilinear"}[resample]
    extra = {} if mode == "nearest-exact" else {"align_corners": False}
    src = x.float().reshape(1, -1, *x.shape[-2:])  # (H,W) and (C,H,W) maps alike
    out = F.interpolate(src, size=(h, w), mode=mode, **extra).reshape(*x.shape[:-2], h, w)
    out = cast_to(out, x.dtype)
    return out if box is None else out[..., y1:y2, x1:x2]


def resize(sample: Sample, size: Sequence[int], keys: Mapping[str, DenseKey], style: str = "float") -> Sample:
    """The image (bilinear) and every dense key (its own resampling) resized to ``size``; values are
    never rescaled (a resized depth map keeps its metres)."""
    out = dict(sample)
    for name, spec, _ in moved_keys(sample, keys):
        out[name] = resize_tensor(sample[name], size, spec.resample, style)
    return out


def hflip(sample: Sample, keys: Mapping[str, DenseKey]) -> Sample:
    """The image and every dense key mirrored left-right."""
    out = dict(sample)
    for name, _, _ in moved_keys(sample, keys):
        out[name] = sample[name].flip(-1)
    return out


def rotate(sample: Sample, degrees: float, keys: Mapping[str, DenseKey], image_fill: Fill = 0.0) -> Sample:
    """Rotate about the image centre (counter-clockwise for positive ``degrees``); corners get each key's
    fill. Nearest keys keep their values."""
    out = dict(sample)
    angle = torch.tensor([float(degrees)])
    for name, spec, fill in moved_keys(sample, keys, image_fill):
        x = sample[name]
        shift = fill if isinstance(fill, (int, float)) else torch.as_tensor(fill, dtype=torch.float32).view(-1, 1, 1)
        src = x.float()[None] - shift  # rotate around the fill value, so the zero padding becomes the fill
        mode = "nearest" if spec.resample == "nearest" else "bilinear"
        y = kornia_rotate(src, angle, mode=mode, padding_mode="zeros", align_corners=True) + shift
        out[name] = cast_to(y[0], x.dtype)
    return out
