"""Semantic segmentation task: datasets, loss, metric and visuals for ``densefuse --task seg``."""
from __future__ import annotations

from functools import cached_property
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from densefuse.config import check_kwargs
from densefuse.data import IGNORE_INDEX, Normalize, RandomCropPad, build_augmentation
from densefuse.errors import ConfigError, did_you_mean
from densefuse.tasks import Task, unwrap_outputs

from .datasets import ADE20K, Cityscapes, PascalVOC, SegDataset, SyntheticSeg, reduce_zero_label
from .loss import SegLoss, aux_weight_from_config, seg_cross_entropy
from .metrics import SegMetrics
from .palettes import class_names_for, palette_for

#: ``data.type`` -> accepted ``data.kwargs``
DATASET_KWARGS: dict[str, tuple[str, ...]] = {
    "synthetic": ("num_train", "num_val", "size", "num_classes", "seed"),
    "ade20k": ("reduce_zero_label",),
    "voc": (),
    "cityscapes": (),
}


def build_seg_dataset(cfg: Mapping[str, Any], split: str) -> Dataset:
    """The dataset named by ``cfg.data.type`` for ``split``; training splits get a RandomCropPad to
    ``cfg.data.crop_size`` (image padded with the mean colour, label with 255)."""
    data = cfg["data"]
    kind = data["type"]
    if kind not in DATASET_KWARGS:
        raise ConfigError(f"unknown data.type '{kind}'{did_you_mean(str(kind), DATASET_KWARGS)}; "
                          f"available: {', '.join(DATASET_KWARGS)}")
    kwargs = dict(data.get("kwargs") or {})
    check_kwargs("data.kwargs", kwargs, DATASET_KWARGS[kind])
    train = split == data["train_split"]
    crop = data["crop_size"]
    transform = (RandomCropPad(crop, IGNORE_INDEX, fill=[round(float(m)) for m in data["mean"]])
                 if train else None)
    if kind == "synthetic":
        n = kwargs.get("num_train", 512) if train else kwargs.get("num_val", 64)
        ds: Dataset = SyntheticSeg(n, kwargs.get("size", crop), kwargs.get("num_classes", 6),
                                   kwargs.get("seed", 0), split, transform)
    else:
        if not data.get("root"):
            raise ConfigError(f"data.root must be set for data.type '{kind}'")
        if kind == "ade20k":
            ds = ADE20K(data["root"], split, kwargs.get("reduce_zero_label", True), transform)
        elif kind == "voc":
            ds = PascalVOC(data["root"], split, transform)
        else:
            ds = Cityscapes(data["root"], split, transform)
    want = cfg["model"]["num_classes"]
    if ds.num_classes != want:  # type: ignore[attr-defined]
        raise ConfigError(f"model.num_classes is {want} but the {kind} dataset has "
                          f"{ds.num_classes} classes")  # type: ignore[attr-defined]
    return ds


class SegTask(Task):
    """Semantic segmentation (labels int64 (B,H,W), 255 ignored; metric mIoU)."""

    name = "seg"
    default_config = "seg/synthetic_upernet_r18"
    primary_metric = "mIoU"

    def build_dataset(self, cfg: Mapping[str, Any], split: str) -> Dataset:
        return build_seg_dataset(cfg, split)

    def build_transform(self, cfg: Mapping[str, Any], train: bool) -> Callable[[dict], dict]:
        """Train: [photometric] -> random scale-crop to ``data.crop_size`` -> [flip] -> normalize;
        eval: normalize. The uint8 image (after augmentation) is kept as ``raw_image``."""
        data = cfg["data"]
        if not train:
            return Normalize(data["mean"], data["std"])
        aug = data.get("augment") or {}  # keys already validated by densefuse.config
        scale = aug.get("scale_range", (0.5, 2.0))
        if scale is not None and (len(scale) != 2 or not 0 < float(scale[0]) <= float(scale[1])):
            raise ConfigError(f"data.augment.scale_range must be [low, high] with 0 < low <= high, got {scale}")
        return build_augmentation(data["mean"], data["std"], size=data["crop_size"], scale_range=scale,
                                  flip=bool(aug.get("flip", True)), photometric=bool(aug.get("photometric", False)))

    def _align_corners(self) -> bool:
        return bool((self.cfg.get("model") or {}).get("align_corners", False))

    @cached_property
    def _loss(self) -> SegLoss:
        return SegLoss(aux_weight_from_config(self.cfg), IGNORE_INDEX, align_corners=self._align_corners())

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

    def visualize(self, batch: Mapping[str, Tensor], prediction: Tensor, alpha: float = 0.5) -> Tensor:
        """The input blended with the palette colours of ``prediction``: uint8 (B,3,H,W)."""
        if prediction.ndim == 4:
            prediction = prediction.argmax(1)
        raw = batch.get("raw_image")
        if raw is None:
            img = batch["image"]
            raw = img if img.dtype == torch.uint8 else torch.full_like(img, 128, dtype=torch.uint8)
        n = int((self.cfg.get("model") or {}).get("num_classes", 0)) or int(prediction.max()) + 1
        dataset = str((self.cfg.get("data") or {}).get("type", ""))
        pal = torch.tensor(palette_for(max(n, int(prediction.max()) + 1), dataset), dtype=torch.float32,
                           device=prediction.device)
        colour = pal[prediction.long()].permute(0, 3, 1, 2)
        raw = raw.to(prediction.device).float()
        if raw.shape[-2:] != colour.shape[-2:]:
            raw = nn.functional.interpolate(raw, size=colour.shape[-2:], mode="bilinear", align_corners=False)
        return (raw * (1 - alpha) + colour * alpha).round().clamp(0, 255).to(torch.uint8)


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
