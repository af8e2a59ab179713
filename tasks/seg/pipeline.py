"""mmseg-faithful per-sample geometry for segmentation: the training and test pipelines of the paper's configs.

Training (mmseg ``configs/_base_/datasets/{ade20k,pascal_voc12_aug,cityscapes}.py``)::

    RandomResize(scale, ratio_range=(0.5, 2.0), keep_ratio=True)   on the whole image
    RandomCrop(crop_size, cat_max_ratio=0.75)                       up to 10 re-draws, 255 excluded
    RandomFlip(0.5)
    PhotoMetricDistortion                                           (here, or batched on the device)
    pad bottom/right to crop_size: image 0 after normalization, label 255

All geometry is decided per sample (on the DataLoader workers). Images are resized bilinearly
(``align_corners=False``, no antialiasing, uint8 fixed point like cv2's INTER_LINEAR), labels with nearest.

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
import torch.nn.functional as F
from torch import Tensor, nn

from densefuse.data import IGNORE_INDEX, Augment, Normalize, PhotoMetricDistortion
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


def _resized(image: Tensor, size: tuple[int, int], cache: Optional[dict] = None) -> Tensor:
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


def resize_image(image: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize (``align_corners=False``, no antialiasing: cv2's INTER_LINEAR) of a (C,H,W) image.
    uint8 runs PyTorch's fixed-point channels-last kernel (like cv2, within 1 of the float result)."""
    return _resized(image, size).contiguous()


def nearest_index(in_len: int, out_len: int, start: int = 0, stop: Optional[int] = None) -> Tensor:
    """Source indices of output positions ``start:stop`` of a nearest resize from ``in_len`` to ``out_len``:
    ``min(floor(dst * (in / out)), in - 1)`` in float32, the arithmetic of PyTorch's (and cv2's) nearest."""
    stop = out_len if stop is None else stop
    if in_len == out_len:
        return torch.arange(start, stop)
    scale = torch.tensor(in_len, dtype=torch.float32) / torch.tensor(out_len, dtype=torch.float32)
    idx = (torch.arange(start, stop, dtype=torch.float32) * scale).floor_().long()
    return idx.clamp_(max=in_len - 1)


def resize_label(label: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize (``floor(dst * in / out)``, as cv2's INTER_NEAREST) of a (H,W) label: values are kept."""
    return resize_crop_label(label, size, (0, int(size[0]), 0, int(size[1])))


def resize_crop_image(image: Tensor, size: tuple[int, int], box: tuple[int, int, int, int]) -> Tensor:
    """``resize_image(image, size)[..., y1:y2, x1:x2]``."""
    y1, y2, x1, x2 = box
    return _resized(image, size)[..., y1:y2, x1:x2].contiguous()


def resize_crop_label(label: Tensor, size: tuple[int, int], box: tuple[int, int, int, int]) -> Tensor:
    """``resize_label(label, size)[y1:y2, x1:x2]``, gathering only the crop: every value is an input value."""
    y1, y2, x1, x2 = box
    h, w = label.shape[-2:]
    if (h, w) == tuple(size):
        return label[..., y1:y2, x1:x2].contiguous()
    rows = nearest_index(h, int(size[0]), y1, y2)
    cols = nearest_index(w, int(size[1]), x1, x2)
    return label.index_select(-2, rows).index_select(-1, cols)


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


def _randint(hi: int, generator: Optional[torch.Generator]) -> int:
    """Uniform integer in [0, hi]."""
    return int(torch.randint(0, hi + 1, (1,), generator=generator))


def _uniform(lo: float, hi: float, generator: Optional[torch.Generator]) -> float:
    return float(torch.rand(1, generator=generator)) * (hi - lo) + lo


def _dominated(label: Tensor, ignore_index: int, cat_max_ratio: float) -> bool:
    """mmseg's rejection test: fewer than two classes, or one class with >= cat_max_ratio of the non-ignored pixels."""
    counts = torch.bincount(label.reshape(-1), minlength=256)
    if ignore_index < counts.numel():
        counts[ignore_index] = 0
    counts = counts[counts > 0]
    return counts.numel() <= 1 or float(counts.max()) / float(counts.sum()) >= cat_max_ratio


def _coin(generator: Optional[torch.Generator]) -> bool:
    return float(torch.rand(1, generator=generator)) < 0.5


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
    g = generator

    def uniform(lo: float, hi: float) -> float:
        return _uniform(lo, hi, g)

    def contrast(x: Tensor) -> Tensor:
        return _trunc(x.mul_(uniform(*contrast_range))) if _coin(g) else x

    if _coin(g):
        x = _trunc(x.add_(uniform(-brightness_delta, brightness_delta)))
    contrast_first = _coin(g)
    if contrast_first:
        x = contrast(x)
    if _coin(g):
        alpha = uniform(*saturation_range)
        v, m = _channel_max_min(x, cache)
        k = torch.sub(v, m, out=_buffer(cache, "k", v.shape)).clamp_(min=1e-6)
        torch.div(v, k, out=k).clamp_(max=alpha)  # where V == min, V - x is 0 and k does not matter
        x = _trunc(x.sub_(v).mul_(k).add_(v))  # V - k (V - x)
    if _coin(g):
        shift = int(torch.randint(-hue_delta, hue_delta + 1, (1,), generator=g))
        x = _trunc(hue_shift(x, shift / 30.0, cache).add_(1e-3))  # OpenCV hue units (2 degrees) -> sextants (60)
    if not contrast_first:
        x = contrast(x)
    return x.to(torch.uint8)


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

    The hexcone HSV of kornia / OpenCV without the round trip: with V = max, C = max - min and the hue h in
    sextants (0..6), channel ``n`` (R 5, G 3, B 1) is ``V - C clamp(min(k, 4 - k), 0, 1)``, ``k = (n + h) mod 6``.
    Equal to kornia's ``hsv_to_rgb(rgb_to_hsv(x))`` with the hue shifted, up to float rounding.
    """
    r, g, b = x[0:1], x[1:2], x[2:3]
    shape = r.shape
    v, m = _channel_max_min(x, cache)
    c = torch.sub(v, m, out=_buffer(cache, "c", shape))
    inv = torch.clamp(c, min=1e-6, out=_buffer(cache, "inv", shape)).reciprocal_()
    h, k, t = (_buffer(cache, n, shape) for n in ("h", "k", "t"))
    mask = _buffer(cache, "mask", shape, torch.bool)
    # hue in sextants; ties pick R, then G (the first maximum, as kornia's argmax)
    torch.sub(r, g, out=h).mul_(inv).add_(4.0)
    torch.sub(b, r, out=k).mul_(inv).add_(2.0)
    torch.where(torch.eq(v, g, out=mask), k, h, out=h)
    torch.sub(g, b, out=k).mul_(inv)
    torch.where(torch.eq(v, r, out=mask), k, h, out=h)
    h.add_(sextants)
    for i, n in enumerate((5.0, 3.0, 1.0)):
        torch.remainder(torch.add(h, n, out=k), 6.0, out=k)
        torch.minimum(k, torch.neg(k, out=t).add_(4.0), out=t).clamp_(0.0, 1.0).mul_(c)
        torch.sub(v, t, out=x[i:i + 1])
    return x


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
        self.photometric = bool(photometric)
        self._scratch: dict[str, Tensor] = {}  # photometric buffers, reused per process (not pickled)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_scratch": {}}

    def draw_size(self, h: int, w: int) -> tuple[int, int]:
        """RandomResize: the resized (h, w) for an h x w image."""
        if self.ratio_range is None:
            target = self.scale
        else:
            r = _uniform(*self.ratio_range, self.generator)
            target = (int(self.scale[0] * r), int(self.scale[1] * r))
        return keep_ratio_size(h, w, target)

    def _box(self, size: tuple[int, int]) -> tuple[int, int, int, int]:
        ch, cw = self.crop_size
        y1 = _randint(max(size[0] - ch, 0), self.generator)
        x1 = _randint(max(size[1] - cw, 0), self.generator)
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
                crop = resize_crop_label(label, size, box)
                if not _dominated(crop, self.ignore_index, self.cat_max_ratio):
                    break
                box = self._box(size)
                crop = None
        flip = float(torch.rand(1, generator=self.generator)) < self.flip_prob
        return Geometry(size, box, flip, self.crop_size, (h, w)), crop

    def apply(self, sample: Mapping[str, Any], geo: Geometry, label_crop: Optional[Tensor] = None) -> dict:
        """Apply a drawn :class:`Geometry` (and the photometric distortion, when enabled) to a sample.
        ``label_crop`` (the label's crop at ``geo``, from :meth:`draw`'s checks) saves gathering it again."""
        out = dict(sample)
        # the crop is a view into the reused resize buffer until the photometric op or the padding copies it
        image = _resized(sample["image"], geo.size, self._scratch)[..., geo.box[0]:geo.box[1], geo.box[2]:geo.box[3]]
        label = label_crop
        if label is None and "label" in sample:
            label = resize_crop_label(sample["label"], geo.size, geo.box)
        if geo.flip:
            image = image.flip(-1)
            label = label.flip(-1) if label is not None else None
        if self.photometric:
            image = photometric_distortion(image, self.generator, cache=self._scratch)
        ch, cw = self.crop_size
        h, w = image.shape[-2:]
        valid = torch.zeros((1, ch, cw), dtype=torch.bool)
        valid[:, :h, :w] = True
        if (h, w) != (ch, cw):
            padded = torch.empty((image.shape[0], ch, cw), dtype=image.dtype)
            padded.copy_(torch.tensor(self.pad_fill, dtype=image.dtype).view(-1, 1, 1).expand_as(padded))
            padded[:, :h, :w] = image
            image = padded
            if label is not None:
                lab = torch.full((ch, cw), self.ignore_index, dtype=label.dtype)
                lab[:h, :w] = label
                label = lab
        fresh = self.photometric or (h, w) != (ch, cw)  # else a view into the resize buffer or the input
        out["image"] = image.contiguous() if fresh else image.clone(memory_format=torch.contiguous_format)
        if label is not None:
            out["label"] = label.contiguous()
        out["valid"] = valid
        return out

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
                out["image"] = resize_crop_image(image, size, (0, size[0], 0, size[1]))
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
