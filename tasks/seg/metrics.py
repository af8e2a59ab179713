"""mIoU / mAcc / aAcc from a dataset-level confusion matrix (mmseg ``IoUMetric`` semantics).

Pixels labelled ``ignore_index`` are skipped. Counts are summed over the whole dataset (and over
ranks under torch.distributed) and the ratios are taken once at the end, not averaged per image.
Per class: ``IoU = I / (pred + gt - I)``, ``Acc = I / gt``. A class absent from the ground truth but
predicted has IoU 0; a class absent from both has NaN and is left out of the mean (``nanmean``),
likewise for ``Acc`` of a class absent from the ground truth. Values are percentages (x100, as mmseg
reports them), not rounded.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from densefuse.data import IGNORE_INDEX
from densefuse.tasks import Metric, all_reduce_, unwrap_outputs


class SegMetrics(Metric):
    """Accumulates a (C, C) confusion matrix (rows: ground truth, columns: prediction).

    ``update`` takes either ``(logits (B,C,h,w) or predictions (B,H,W), target (B,H,W))`` or the
    task metric protocol's ``(model outputs, batch)``: a mapping second argument is read as a batch
    (``batch["label"]``) and the first as model outputs (``outputs["out"]`` or a plain tensor).
    Logits of another size than the target are resized bilinearly first (mmseg resizes logits to
    the original label size before the argmax).
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX,
                 class_names: Optional[Sequence[str]] = None, align_corners: bool = False) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        names = list(class_names) if class_names is not None else [f"class{i}" for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        self.class_names = names
        self.align_corners = align_corners
        self.confusion: Optional[Tensor] = None
        self._reduced: Optional[Tensor] = None

    def reset(self) -> None:
        self.confusion = None
        self._reduced = None

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        if isinstance(target, Mapping):
            target = target["label"]
            pred = unwrap_outputs(pred)["out"]
        if not isinstance(pred, Tensor):
            pred = unwrap_outputs(pred)["out"]
        if target.ndim == 2:
            target = target.unsqueeze(0)
        if pred.ndim == 4:
            if pred.shape[-2:] != target.shape[-2:]:
                pred = F.interpolate(pred.float(), size=target.shape[-2:], mode="bilinear", align_corners=self.align_corners)
            pred = pred.argmax(1)
        elif pred.ndim == 2:
            pred = pred.unsqueeze(0)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match target shape {tuple(target.shape)}")
        c = self.num_classes
        target = target.to(pred.device)
        keep = target != self.ignore_index
        t, p = target[keep].long(), pred[keep].long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
            raise ValueError(f"target values must be in [0, {c}) or {self.ignore_index}")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= c):
            raise ValueError(f"predicted classes must be in [0, {c})")
        counts = torch.bincount(t * c + p, minlength=c * c).view(c, c)
        self._reduced = None
        if self.confusion is None:
            self.confusion = torch.zeros(c, c, dtype=torch.int64, device=counts.device)
        self.confusion += counts

    def total(self) -> Tensor:
        """The confusion matrix summed over ranks (a copy; the local one is left alone).

        The all-reduce runs once per accumulated state: ``compute()`` and ``tables()`` after it reuse
        the reduced matrix, so rank 0 may ask for the tables alone without a collective."""
        if self._reduced is not None:
            return self._reduced.clone()
        if self.confusion is None:
            conf = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
                conf = conf.cuda()  # every rank must join the all-reduce, on the backend's device
        else:
            conf = self.confusion.clone()
        self._reduced = all_reduce_(conf).cpu()
        return self._reduced.clone()

    @staticmethod
    def _per_class(conf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        conf = conf.double()
        inter = conf.diag()
        gt = conf.sum(1)
        pred = conf.sum(0)
        union = gt + pred - inter
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, inter / union.clamp(min=1), nan)
        acc = torch.where(gt > 0, inter / gt.clamp(min=1), nan)
        return iou, acc, gt

    def compute(self) -> dict[str, float]:
        """The summary: ``mIoU``, ``mAcc``, ``aAcc`` in percent (NaN when undefined)."""
        conf = self.total()
        iou, acc, gt = self._per_class(conf)
        total = float(gt.sum())
        return {
            "mIoU": _nanmean(iou) * 100,
            "mAcc": _nanmean(acc) * 100,
            "aAcc": float(conf.diag().sum()) / total * 100 if total > 0 else math.nan,
        }

    def tables(self) -> dict[str, pd.DataFrame]:
        """``{"per_class": DataFrame(class, IoU, Acc)}``, one row per class, in percent."""
        iou, acc, _ = self._per_class(self.total())
        return {"per_class": pd.DataFrame({
            "class": [n.strip() for n in self.class_names],
            "IoU": (iou * 100).tolist(),
            "Acc": (acc * 100).tolist(),
        })}


def _nanmean(x: Tensor) -> float:
    valid = ~torch.isnan(x)
    return float(x[valid].mean()) if bool(valid.any()) else math.nan
