"""mmseg-faithful per-sample geometry for segmentation: the training and test pipelines of the paper's configs.

Training (mmseg ``configs/_base_/datasets/{ade20k,pascal_voc12_aug,cityscapes}.py``)::

    RandomResize(scale, ratio_range=(0.5, 2.0), keep_ratio=True)   on the whole image
    RandomCrop(crop_size, cat_max_ratio=0.75)                       up to 10 re-draws, 255 excluded
    RandomFlip(0.5)
    PhotoMetricDistortion                                           (here, or batched on the device)
    pad bottom/right to crop_size: image 0 after normalization, label 255

All geometry is decided per sample (on the DataLoader workers) and done by :mod:`densefuse.data.ops` in its
``cv2`` resize style: images bilinear (``align_corners=False``, no antialiasing, uint8 fixed point like cv2's
INTER_LINEAR), labels nearest, each crop gathered from the resized label without resizing all of it; random
choices come from :class:`~densefuse.data.ops.Draw`. What is mmseg's alone lives here: the keep-ratio rule,
the cat_max_ratio crop search, the photometric distortion on uint8 values.

Test: ``Resize(scale, keep_ratio=True)`` of the image only; the label stays at its original size and the
metric runs there (the prediction is resized to it, as mmseg's postprocess does).

Every training sample carries ``valid`` (1, H, W) bool: False on padding. The image is padded with
``pad_fill`` (the rounded mean colour); :func:`zero_padding` sets the padded pixels to exactly 0 after
normalization, and calibration uses ``valid`` to leave padding out of the statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from densefuse.data import IGNORE_INDEX, Augment, Normalize, PhotoMetricDistortion
from densefuse.data.ops import Draw, hflip, pad, resize_tensor
from densefuse.tasks import DenseKey

#: The validity mask of padded training crops: moved with nearest resampling, padding is invalid.
VALID_KEY: dict[str, DenseKey] = {"valid": DenseKey("nearest", 0.0)}

#: mmseg's reference scales (``RandomResize`` / test ``Resize``) per dataset: (long, short) bounds.
DATASET_SCALES: dict[str, tuple[int, int]] = {
    "ade20k": (2048, 512),
    "voc": (2048, 512),
    "cityscapes": (2048, 1024),
}

def keep_ratio_size(h: int, w: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv ``rescale_size`` with keep_ratio: factor ``min(max(scale)/max(h, w), min(scale)/min(h, w))``,
    new size ``int(x * f + 0.5)``. A 375x500 VOC image at (2048, 512) becomes 512x683 (f = 1.365)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)


@dataclass
class Geometry:
    """The random geometry of one training sample (replayable: apply it to any per-pixel key)."""

    size: tuple[int, int]             # image size after RandomResize
    box: tuple[int, int, int, int]    # crop (y1, y2, x1, x2) in the resized image
    flip: bool
    crop_size: tuple[int, int]
    src_size: tuple[int, int]         # the original image size

    @property
    def scale(self) -> float:
        """The keep-ratio resize factor (height ratio)."""
        return self.size[0] / self.src_size[0]

    @property
    def padded(self) -> bool:
        return (self.box[1] - self.box[0], self.box[3] - self.box[2]) != self.crop_size


def _dominated(label: Tensor, ignore_index: int, cat_max_ratio: float) -> bool:
    """mmseg's rejection test: fewer than two classes, or one class with >= cat_max_ratio of the non-ignored pixels."""
    counts = torch.bincount(label.reshape(-1), minlength=256)
    if ignore_index < counts.numel():
        counts[ignore_index] = 0
    counts = counts[counts > 0]
    return counts.numel() <= 1 or float(counts.max()) / float(counts.sum()) >= cat_max_ratio


def _trunc(x: Tensor) -> Tensor:
    """mmseg's ``np.clip(x, 0, 255).astype(np.uint8)`` after every op, kept in float."""
    return x.clamp_(0, 255).floor_()


def photometric_distortion(image: Tensor, generator: Optional[torch.Generator] = None,
                           brightness_delta: float = 32.0, contrast_range: tuple[float, float] = (0.5, 1.5),
                           saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18,
                           cache: Optional[dict] = None) -> Tensor:
    """mmseg's ``PhotoMetricDistortion`` on one uint8 (3,H,W) RGB image, on the CPU worker.

    The same order and coins as mmseg: brightness (+U(-32, 32)), a coin for contrast (xU(0.5, 1.5)) first or
    last, saturation (HSV S x U(0.5, 1.5)), hue (H + randint(-18, 18) on OpenCV's 0-180 circle); every op fires
    with probability 0.5 and truncates to uint8 values. Saturation uses the exact RGB form of an HSV S scale
    with H and V fixed, ``c' = V - k (V - c)`` (k = the factor, capped where S would pass 1), and the hue op
    the RGB form of an H shift (:func:`hue_shift`), both in float where cv2 quantises H and S to uint8.
    ``cache`` (a dict) keeps the float scratch buffers from one call to the next (the pipeline passes its own).
    """
    x = _buffer(cache, "x", image.shape).copy_(image)
    draw = Draw(generator)

    def contrast(x: Tensor) -> Tensor:
        return _trunc(x.mul_(draw.uniform(*contrast_range))) if draw.coin() else x

    if draw.coin():
        x = _trunc(x.add_(draw.uniform(-brightness_delta, brightness_delta)))
    contrast_first = draw.coin()
    if contrast_first:
        x = contrast(x)
    if draw.coin():
        alpha = draw.uniform(*saturation_range)
        v, m = _channel_max_min(x, cache)
        k = torch.sub(v, m, out=_buffer(cache, "k", v.shape)).clamp_(min=1e-6)
        torch.div(v, k, out=k).clamp_(max=alpha)  # where V == min, V - x is 0 and k does not matter
        x = _trunc(x.sub_(v).mul_(k).add_(v))  # V - k (V - x)
    if draw.coin():
        shift = draw.randint(-hue_delta, hue_delta)
        x = _trunc(hue_shift(x, shift / 30.0, cache).add_(1e-3))  # OpenCV hue units (2 degrees) -> sextants (60)
    if not contrast_first:
        x = contrast(x)
    return _to_uint8(x, cache)


def _to_uint8(x: Tensor, cache: Optional[dict] = None) -> Tensor:
    """Integer-valued float pixels as uint8, through int32: float32 -> uint8 directly is 4x slower on the CPU."""
    return _buffer(cache, "i32", x.shape, torch.int32).copy_(x).to(torch.uint8)


def _buffer(cache: Optional[dict], name: str, shape: torch.Size, dtype: torch.dtype = torch.float32) -> Tensor:
    """A scratch tensor, reused across calls when ``cache`` is given: fresh multi-megabyte buffers cost
    page faults on every sample, more than the arithmetic done in them."""
    if cache is None:
        return torch.empty(shape, dtype=dtype)
    t = cache.get(name)
    if t is None or t.shape != shape or t.dtype != dtype:
        t = cache[name] = torch.empty(shape, dtype=dtype)
    return t


def _channel_max_min(x: Tensor, cache: Optional[dict] = None) -> tuple[Tensor, Tensor]:
    """Per-pixel max and min over the 3 channels of a (3,H,W) tensor, as (1,H,W) (elementwise, no reduction)."""
    r, g, b = x[0:1], x[1:2], x[2:3]
    v, m = _buffer(cache, "v", r.shape), _buffer(cache, "m", r.shape)
    torch.maximum(torch.maximum(r, g, out=v), b, out=v)
    torch.minimum(torch.minimum(r, g, out=m), b, out=m)
    return v, m


def hue_shift(x: Tensor, sextants: float, cache: Optional[dict] = None) -> Tensor:
    """Rotate the HSV hue of a float (3,H,W) RGB image by ``sextants`` x 60 degrees, keeping V and S; in place
    (returns ``x``). ``cache``: a dict that keeps the scratch buffers between calls.

    The hexcone HSV of kornia / OpenCV without the round trip: with V = max, m = min, C = V - m and the hue h
    in sextants, channel ``n`` (R 5, G 3, B 1) is ``V - C f(n + h)`` with ``f(k) = clamp(min(k, 4 - k), 0, 1)``
    taken 6-periodic, and ``f(k + 3) = 1 - f(k)``. With h wrapped to [0, 6): R = V - C f(h - 1),
    G = m + C f(h), B = m + C f(h - 2), every argument in [-2, 6), where the one-band formula is f.
    Equal to kornia's ``hsv_to_rgb(rgb_to_hsv(x))`` with the hue shifted, up to float rounding. Written
    with arithmetic only: on the CPU a boolean ``where`` and ``remainder`` over a 512x512 plane cost 0.9 and
    0.35 ms, a multiply or add 0.03 ms.
    """
    r, g, b = x[0:1], x[1:2], x[2:3]
    shape = r.shape
    v, m = _channel_max_min(x, cache)
    c = torch.sub(v, m, out=_buffer(cache, "c", shape))
    inv = torch.clamp(c, min=1e-6, out=_buffer(cache, "inv", shape)).reciprocal_()
    h, k, t = (_buffer(cache, n, shape) for n in ("h", "k", "t"))
    # the hue in sextants, by the first maximum (R, then G, then B, as kornia's argmax); the branch is picked
    # by a 0/1 weight that is 1 where the channel equals V (within 1e-6) and 0 elsewhere
    torch.sub(r, g, out=h).mul_(inv).add_(4.0)
    torch.sub(b, r, out=k).mul_(inv).add_(2.0)
    h.lerp_(k, _is_max(v, g, t))
    torch.sub(g, b, out=k).mul_(inv)
    h.lerp_(k, _is_max(v, r, t))
    h.add_(sextants)  # in [-1.6, 5.6]; + 6 where negative
    h.add_(torch.mul(h, -1e30, out=t).clamp_(0.0, 1.0), alpha=6.0)
    for i, (base, sign, offset) in enumerate(((v, -1.0, -1.0), (m, 1.0, 0.0), (m, 1.0, -2.0))):
        torch.add(h, offset, out=k)
        torch.neg(h, out=t).add_(4.0 - offset)  # 4 - k
        torch.minimum(k, t, out=t).clamp_(0.0, 1.0).mul_(c)
        torch.add(base, t, alpha=sign, out=x[i:i + 1])
    return x


def _is_max(v: Tensor, channel: Tensor, out: Tensor) -> Tensor:
    """1.0 where ``channel`` equals the maximum ``v`` (within 1e-6), else 0.0 (``v >= channel`` everywhere)."""
    return torch.sub(channel, v, out=out).mul_(1e6).add_(1.0).clamp_(0.0, 1.0)


class SegTrainPipeline:
    """RandomResize -> RandomCrop(cat_max_ratio) -> RandomFlip -> [PhotoMetricDistortion] -> pad, per sample.

    Takes ``{"image": uint8 (3,H,W), "label": int64 (H,W), ...}`` and returns the crop with ``image`` uint8
    (3, *crop_size), ``label`` (*crop_size) and ``valid`` bool (1, *crop_size). Other keys pass through.

    Args:
        crop_size: (h, w) of the training crop.
        scale: RandomResize reference scale (long, short), e.g. (2048, 512) for ADE20K / VOC.
        ratio_range: the reference scale is multiplied by r ~ U(ratio_range) (``int`` of each side, as mmcv).
        cat_max_ratio: re-draw the crop (up to ``max_tries`` times) while one class covers at least this
            share of the non-ignored pixels; 1.0 disables it. The last draw is kept, as mmseg does.
        flip_prob: horizontal flip probability.
        photometric: apply mmseg's PhotoMetricDistortion here (on the CPU, rounded back to uint8); leave it
            False to run the batched version on the training device instead.
        pad_fill: image fill for padding (per channel, uint8); label padding is ``ignore_index``.
        generator: optional torch.Generator (leave unset in training: the loader seeds torch's global RNG
            per sample from the seed and the sample's stream position).
    """

    #: takes uint8 labels and keeps their dtype (the readers skip the int64 conversion of the full label)
    uint8_labels = True

    def __init__(
        self,
        crop_size: Sequence[int],
        scale: Sequence[int] = (2048, 512),
        ratio_range: Optional[Sequence[float]] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = False,
        pad_fill: Sequence[int] = (124, 116, 104),
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.scale = (int(scale[0]), int(scale[1]))
        self.ratio_range = None if ratio_range is None else (float(ratio_range[0]), float(ratio_range[1]))
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.ignore_index = int(ignore_index)
        self.max_tries = int(max_tries)
        self.pad_fill = tuple(int(v) for v in pad_fill)
        self.generator = generator
        self.keys = {"label": DenseKey("nearest", float(self.ignore_index)), **VALID_KEY}
        self.photometric = bool(photometric)
        self._scratch: dict[str, Tensor] = {}  # photometric buffers, reused per process (not pickled)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_scratch": {}}

    def draw_size(self, h: int, w: int) -> tuple[int, int]:
        """RandomResize: the resized (h, w) for an h x w image."""
        if self.ratio_range is None:
            target = self.scale
        else:
            r = Draw(self.generator).uniform(*self.ratio_range)
            target = (int(self.scale[0] * r), int(self.scale[1] * r))
        return keep_ratio_size(h, w, target)

    def _box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        ch, cw = self.crop_size
        y1, x1 = Draw(self.generator).crop_offset(size, self.crop_size)
        return y1, min(y1 + ch, size[0]), x1, min(x1 + cw, size[1])

    def draw(self, label: Tensor) -> Geometry:
        """All random choices for one sample whose (original-size) label is ``label``."""
        return self._draw(label)[0]

    def _draw(self, label: Tensor) -> tuple[Geometry, Optional[Tensor]]:
        """The geometry and, when cat_max_ratio needed it, the label crop (reused by :meth:`apply`).
        Each try gathers only its crop of the resized label (nearest), never the whole resized label."""
        h, w = label.shape[-2:]
        crop = None
        size = self.draw_size(h, w)
        box = self._box(size)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                crop = resize_tensor(label, size, "nearest", "cv2", box)
                if not _dominated(crop, self.ignore_index, self.cat_max_ratio):
                    break
                box = self._box(size)
                crop = None
        flip = Draw(self.generator).coin(self.flip_prob)
        return Geometry(size, box, flip, self.crop_size, (h, w)), crop

    def apply(self, sample: Mapping[str, Any], geo: Geometry, label_crop: Optional[Tensor] = None) -> dict:
        """Apply a drawn :class:`Geometry` (and the photometric distortion, when enabled) to a sample.
        ``label_crop`` (the label's crop at ``geo``, from :meth:`draw`'s checks) saves gathering it again."""
        # the crop is a view into the reused resize buffer until the photometric op or the padding copies it
        moved = {"image": resize_tensor(sample["image"], geo.size, "bilinear", "cv2", geo.box, self._scratch)}
        if label_crop is not None:
            moved["label"] = label_crop
        elif "label" in sample:
            moved["label"] = resize_tensor(sample["label"], geo.size, "nearest", "cv2", geo.box)
        if geo.flip:
            moved = hflip(moved, self.keys)
        if self.photometric:
            moved["image"] = photometric_distortion(moved["image"], self.generator, cache=self._scratch)
        moved["valid"] = torch.ones((1, *moved["image"].shape[-2:]), dtype=torch.bool)
        return {**sample, **pad(moved, self.crop_size, self.keys, self.pad_fill)}

    def __call__(self, sample: Mapping[str, Any]) -> dict:
        return self.apply(sample, *self._draw(sample["label"]))

    def __repr__(self) -> str:
        return (f"SegTrainPipeline(crop_size={self.crop_size}, scale={self.scale}, ratio_range={self.ratio_range}, "
                f"cat_max_ratio={self.cat_max_ratio}, flip_prob={self.flip_prob}, "
                f"photometric={self.photometric})")


class SegTestPipeline:
    """Test-time ``Resize(scale, keep_ratio=True)`` of the image only. The label keeps its original size
    (``label``), the resized size is in ``image``; ``ori_size`` (h, w) tells the evaluator where to resize
    the prediction. ``scale=None`` keeps the image as it is."""

    uint8_labels = True

    def __init__(self, scale: Optional[Sequence[int]] = (2048, 512)) -> None:
        self.scale = None if not scale else (int(scale[0]), int(scale[1]))

    def __call__(self, sample: Mapping[str, Any]) -> dict:
        out = dict(sample)
        image = sample["image"]
        h, w = image.shape[-2:]
        out["ori_size"] = torch.tensor([h, w])
        if self.scale is not None:
            size = keep_ratio_size(h, w, self.scale)
            if size != (h, w):
                out["image"] = resize_tensor(image, size, "bilinear", "cv2").contiguous()
        return out

    def __repr__(self) -> str:
        return f"SegTestPipeline(scale={self.scale})"


def zero_padding(batch: Mapping[str, Any]) -> dict:
    """After normalization: padded pixels (``valid`` False) set to exactly 0, mmseg's image padding."""
    if "valid" not in batch:
        return dict(batch)
    out = dict(batch)
    out["image"] = batch["image"] * batch["valid"].to(batch["image"].dtype)
    return out


class DeviceTransform(nn.Module):
    """The batched half of the mmseg training pipeline, on the training device: PhotoMetricDistortion (per
    sample, kornia), Normalize, then padded pixels set to 0 (:func:`zero_padding`). Keeps ``raw_image``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], photometric: bool = True) -> None:
        super().__init__()
        self.augment = Augment([PhotoMetricDistortion()] if photometric else [], Normalize(mean, std))

    def forward(self, batch: Mapping[str, Any]) -> dict:
        return zero_padding(self.augment(dict(batch)))


def build_device_transform(cfg: Mapping[str, Any]) -> DeviceTransform:
    """:class:`DeviceTransform` from ``cfg.data`` (mean, std, augment.photometric)."""
    data = cfg["data"]
    return DeviceTransform(data["mean"], data["std"], data["augment"]["photometric"])


def _dataset_scale(data: Mapping[str, Any], key: str) -> Optional[tuple[int, int]]:
    """``data.scale`` / ``data.test_scale`` as (long, short): null is the dataset's mmseg scale, [] none."""
    value = data[key]
    if value is None:
        return DATASET_SCALES.get(data["type"])
    if len(value) == 0:
        return None
    return int(value[0]), int(value[1])


def build_train_pipeline(cfg: Mapping[str, Any], photometric: Optional[bool] = None) -> SegTrainPipeline:
    """The training pipeline from ``cfg.data``: crop_size, scale, ratio_range, cat_max_ratio, augment.flip,
    augment.photometric (unless ``photometric`` is given: pass False when the device runs it batched)."""
    data = cfg["data"]
    crop = data["crop_size"]
    scale = _dataset_scale(data, "scale") or (max(crop), min(crop))
    aug = data["augment"]
    if photometric is None:
        photometric = aug["photometric"]
    fill = [int(math.floor(float(m) + 0.5)) for m in data["mean"]]
    return SegTrainPipeline(crop, scale, data["ratio_range"], data["cat_max_ratio"], 0.5 if aug["flip"] else 0.0,
                            photometric, fill)


def build_test_pipeline(cfg: Mapping[str, Any]) -> SegTestPipeline:
    """The test pipeline from ``cfg.data.test_scale`` (null: the dataset's mmseg scale; []: no resize)."""
    return SegTestPipeline(_dataset_scale(cfg["data"], "test_scale"))
