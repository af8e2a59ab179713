"""Semantic segmentation task: datasets, loss, metric and visuals for ``densefuse --task seg``."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from densefuse.config import check_kwargs
from densefuse.data import IGNORE_INDEX, SEG_KEYS, Normalize, RandomCropPad, build_augmentation
from densefuse.errors import ConfigError, did_you_mean
from densefuse.tasks import Task, unwrap_outputs

from .config import SegConfig, SegSection
from .datasets import ADE20K, Cityscapes, PascalVOC, SegDataset, SyntheticSeg, reduce_zero_label
from .loss import SegLoss, aux_weight_from_config, seg_cross_entropy
from .metrics import SegMetrics
from .palettes import class_names_for, palette_for
from .pipeline import VALID_KEY, build_device_transform, build_test_pipeline, build_train_pipeline
from .visualize import legend, overlay, palette_png, present_classes, save_png

#: At most this many classes in a picture's legend (the last entry counts the rest).
LEGEND_SLOTS = 12

#: ``data.type`` -> accepted ``data.kwargs``
DATASET_KWARGS: dict[str, tuple[str, ...]] = {
    "synthetic": ("num_train", "num_val", "size", "num_classes", "seed"),
    "ade20k": ("reduce_zero_label",),
    "voc": (),
    "cityscapes": (),
}


#: datasets whose images differ in size (so mmseg's keep-ratio test Resize gives unequal sizes)
VARIABLE_SIZE = ("ade20k", "voc")


def dataset_classes(data: Mapping[str, Any]) -> int:
    """How many classes the dataset of ``cfg.data`` has, known without reading any file."""
    kind = data["type"]
    if kind == "synthetic":
        return int((data.get("kwargs") or {}).get("num_classes", 6))
    return len({"ade20k": ADE20K, "voc": PascalVOC, "cityscapes": Cityscapes}[kind].classes)


def check_dataset_config(cfg: Mapping[str, Any]) -> None:
    """``data.type``, its ``data.kwargs`` and ``data.root``, and ``eval.batch_size`` against ``data.pipeline``:
    what a user wrote, checked at config load. (``model.num_classes`` against the dataset is checked when the
    dataset is built, which ``densefuse train`` does before the run directory exists.)"""
    data = cfg["data"]
    kind = data["type"]
    if kind not in DATASET_KWARGS:
        raise ConfigError(f"unknown data.type '{kind}' for the seg task{did_you_mean(str(kind), DATASET_KWARGS)}; "
                          f"available: {', '.join(DATASET_KWARGS)}")
    check_kwargs("data.kwargs", dict(data.get("kwargs") or {}), DATASET_KWARGS[kind], owner=f"data.type '{kind}'")
    if kind != "synthetic" and not data.get("root"):
        raise ConfigError(f"data.root must be set for data.type '{kind}' (the dataset's folder in its official layout)")
    batch = cfg["eval"]["batch_size"]
    if data["pipeline"] == "mmseg" and batch > 1 and kind in VARIABLE_SIZE:
        raise ConfigError(f"eval.batch_size={batch} with data.pipeline: mmseg on data.type '{kind}': the test-time "
                          f"Resize keeps each image's own aspect ratio, and {kind}'s images differ in size, so they do "
                          f"not stack into batches; use eval.batch_size=1")


def seg_test_pipeline(cfg: Mapping[str, Any]) -> Optional[Callable[[dict], dict]]:
    """The evaluation samples' own transform: mmseg's keep-ratio test Resize with ``data.pipeline: mmseg``
    (see :func:`~densefuse_tasks.seg.pipeline.build_test_pipeline`), none with ``batch``."""
    return build_test_pipeline(cfg) if cfg["data"]["pipeline"] == "mmseg" else None


def build_seg_dataset(cfg: Mapping[str, Any], split: str) -> Dataset:
    """The dataset named by ``cfg.data.type`` for ``split`` with its per-sample transform.

    ``data.pipeline: batch``: training splits get a RandomCropPad to ``cfg.data.crop_size`` (image padded
    with the mean colour, label with 255); the scale-crop runs batched on the device. ``data.pipeline:
    mmseg``: training splits get mmseg's RandomResize / RandomCrop(cat_max_ratio) / flip / pad per sample
    (:func:`~densefuse_tasks.seg.pipeline.build_train_pipeline`, photometric left to the device) and
    evaluation splits the test-time keep-ratio Resize of the image only (the label keeps its size).
    """
    data = cfg["data"]
    kind = data["type"]
    want, have = cfg["model"]["num_classes"], dataset_classes(data)
    if want != have:
        raise ConfigError(f"model.num_classes is {want} but the {kind} dataset has {have} classes; "
                          f"set model.num_classes={have}")
    kwargs = dict(data.get("kwargs") or {})
    train = split == data["train_split"]
    crop = data["crop_size"]
    transform: Optional[Callable[[dict], dict]]
    if data["pipeline"] == "mmseg":
        transform = build_train_pipeline(cfg, photometric=False) if train else seg_test_pipeline(cfg)
    else:
        transform = (RandomCropPad(crop, SEG_KEYS, fill=[round(float(m)) for m in data["mean"]])
                     if train else None)
    if kind == "synthetic":
        n = kwargs.get("num_train", 512) if train else kwargs.get("num_val", 64)
        ds: Dataset = SyntheticSeg(n, kwargs.get("size", crop), kwargs.get("num_classes", 6),
                                   kwargs.get("seed", 0), split, transform)
    else:
        if kind == "ade20k":
            ds = ADE20K(data["root"], split, kwargs.get("reduce_zero_label", True), transform)
        elif kind == "voc":
            ds = PascalVOC(data["root"], split, transform)
        else:
            ds = Cityscapes(data["root"], split, transform)
    return ds


class SegTask(Task):
    """Semantic segmentation (labels int64 (B,H,W), 255 ignored; metric mIoU, larger is better).

    Settings: :class:`~densefuse_tasks.seg.config.SegConfig` (the ``seg:`` section, the mmseg pipeline's ``data``
    keys).
    """

    name = "seg"
    default_config = "seg/synthetic_upernet_r18"
    primary_metric = "mIoU"
    metric_direction = "max"
    dense_keys = {**SEG_KEYS, **VALID_KEY}
    config_class = SegConfig

    def build_dataset(self, cfg: Mapping[str, Any], split: str) -> Dataset:
        return build_seg_dataset(cfg, split)

    def test_pipeline(self, cfg: Mapping[str, Any]) -> Optional[Callable[[dict], dict]]:
        return seg_test_pipeline(cfg)

    def validate_config(self, cfg: Any) -> None:
        """The dataset's keys (``data.type``, ``data.kwargs``, ``data.root``, classes), before any work starts."""
        check_dataset_config(cfg)

    def _settings(self) -> SegSection:
        """The ``seg:`` section of the task's config (its defaults for a task made without one)."""
        return self.cfg["seg"] if "seg" in self.cfg else SegSection()

    def build_transform(self, cfg: Mapping[str, Any], train: bool) -> Callable[[dict], dict]:
        """The device half of the pipeline. ``data.pipeline: batch``: train: [photometric] -> random
        scale-crop to ``data.crop_size`` -> [flip] -> normalize, moving the image and every dense key of
        :attr:`dense_keys`. ``mmseg``: train: batched PhotoMetricDistortion -> normalize -> padded pixels
        to 0 (the geometry ran per sample in the dataset). Eval: normalize. The uint8 image is kept as
        ``raw_image`` for pictures."""
        data = cfg["data"]
        if not train:
            return Normalize(data["mean"], data["std"])
        if data["pipeline"] == "mmseg":
            return build_device_transform(cfg)
        aug = data["augment"]
        return build_augmentation(data["mean"], data["std"], size=data["crop_size"], scale_range=aug["scale_range"],
                                  flip=aug["flip"], photometric=aug["photometric"], keys=self.dense_keys)

    def _align_corners(self) -> bool:
        return bool((self.cfg.get("model") or {}).get("align_corners", False))

    @cached_property
    def _loss(self) -> SegLoss:
        return SegLoss(aux_weight_from_config(self.cfg), IGNORE_INDEX,
                       avg_non_ignore=self._settings().avg_non_ignore, align_corners=self._align_corners())

    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """``loss_ce + loss_weight * loss_aux`` (weight from ``model.auxiliary_head.loss_weight``, 0.4);
        CE averaged over all pixels as mmseg does (see :mod:`densefuse_tasks.seg.loss`)."""
        return self._loss(outputs, batch)

    def metric(self, cfg: Mapping[str, Any]) -> SegMetrics:
        n = cfg["model"]["num_classes"]
        return SegMetrics(n, IGNORE_INDEX, class_names_for(n, cfg["data"]["type"]),
                          align_corners=bool(cfg["model"].get("align_corners", False)))

    def predict(self, outputs: Any) -> Tensor:
        """Class map (B,H,W) int64 from the logits."""
        return unwrap_outputs(outputs)["out"].argmax(1)

    def merge_tta(self, outputs: Sequence[Any], flipped: Sequence[bool]) -> dict[str, Tensor]:
        """Merge test-time views (already flipped back; class scores do not change under a mirror, so
        ``flipped`` is not needed) into one output, as mmseg's ``SegTTAModel``: each view's logits are
        resized bilinearly to the first view's size, turned into softmax probabilities and averaged.
        Returns ``{"out": log(mean probability)}``: log probabilities are logits of the same
        distribution, so argmax, metric and softmax all still work."""
        if not outputs:
            raise ValueError("merge_tta needs at least one view")
        logits = [unwrap_outputs(o)["out"].float() for o in outputs]
        target = tuple(logits[0].shape[-2:])
        total = None
        for x in logits:
            if tuple(x.shape[-2:]) != target:
                x = nn.functional.interpolate(x, size=target, mode="bilinear", align_corners=self._align_corners())
            p = x.softmax(1)
            total = p if total is None else total + p
        assert total is not None
        return {"out": (total / len(logits)).clamp_min(1e-12).log()}

    def _palette(self, n: int) -> list[tuple[int, int, int]]:
        dataset = str((self.cfg.get("data") or {}).get("type", ""))
        return list(palette_for(max(n, 1), dataset))

    def _names(self, n: int) -> list[str]:
        dataset = str((self.cfg.get("data") or {}).get("type", ""))
        return list(class_names_for(n, dataset))

    def _num_classes(self, *maps: Optional[Tensor]) -> int:
        n = int((self.cfg.get("model") or {}).get("num_classes", 0) or 0)
        seen = present_classes(*maps)
        return max(n, (max(seen) + 1) if seen else 1)

    def visualize(self, batch: Mapping[str, Tensor], prediction: Tensor, alpha: Optional[float] = None) -> Tensor:
        """uint8 (B,3,H',W) pictures: the input blended with the palette colours of ``prediction``, below
        it the same for the ground truth when the batch has ``label``, and a legend of the classes
        shown, most frequent first (the same strip for every sample of the batch; its height depends
        only on the width and the number of classes, so pictures of one size stack into a grid)."""
        if prediction.ndim == 4:
            prediction = prediction.argmax(1)
        alpha = float(self._settings().overlay_alpha) if alpha is None else alpha
        raw = batch.get("raw_image")
        if raw is None:
            img = batch["image"]
            raw = img if img.dtype == torch.uint8 else torch.full_like(img, 128, dtype=torch.uint8)
        label = batch.get("label")
        if label is not None and label.shape[-2:] != prediction.shape[-2:]:
            label = nn.functional.interpolate(label[:, None].float(), size=prediction.shape[-2:], mode="nearest")[:, 0].long()
        n = self._num_classes(prediction, label)
        pal = self._palette(n)
        rows = [overlay(raw, prediction, pal, alpha)]
        if label is not None:
            rows.append(overlay(raw, label.to(prediction.device), pal, alpha))
        strip = legend(present_classes(prediction, label), self._names(n), pal, prediction.shape[-1],
                       slots=min(n, LEGEND_SLOTS))
        rows.append(strip.to(prediction.device).unsqueeze(0).expand(prediction.shape[0], -1, -1, -1))
        return torch.cat(rows, dim=-2)

    def save_prediction(self, prediction: Tensor, stem: Union[str, Path], image: Optional[Tensor] = None) -> list[Path]:
        """Write one sample's class map (H,W) as ``<stem>.png``, a palette PNG whose pixel values are the
        class ids (viewers show the dataset colours), and with ``image`` (3,H,W uint8) a coloured
        overlay with legend as ``<stem>_vis.png``. Returns the written paths."""
        stem = Path(stem)
        classes = prediction.argmax(0) if prediction.ndim == 3 else prediction
        classes = classes.detach().cpu().long()
        n = self._num_classes(classes)
        pal = self._palette(n)
        out = stem.with_name(stem.name + ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        palette_png(classes, pal).save(out)
        paths = [out]
        if image is not None:
            pic = self.visualize({"raw_image": image[None].cpu(), "image": image[None].cpu()}, classes[None])[0]
            paths.append(save_png(pic, stem.with_name(stem.name + "_vis.png")))
        return paths


__all__ = [
    "ADE20K",
    "Cityscapes",
    "PascalVOC",
    "SegDataset",
    "SegLoss",
    "SegMetrics",
    "SegTask",
    "SyntheticSeg",
    "build_seg_dataset",
    "reduce_zero_label",
    "seg_cross_entropy",
]
