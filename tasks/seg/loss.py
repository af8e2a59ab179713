"""Segmentation loss: pixel cross-entropy with mmseg's averaging, plus the weighted auxiliary term.

mmseg (``CrossEntropyLoss(avg_non_ignore=False)``, the default in every standard config) computes
per-pixel CE with ``ignore_index=255`` (ignored pixels contribute 0) and then takes the mean over
**all** pixels, ignored ones included: ``sum(ce) / (B*H*W)``. PyTorch's ``reduction="mean"`` divides
by the number of *non-ignored* pixels instead, which gives larger losses (and gradients) on images
with much padding or many boundary pixels. ``avg_non_ignore=True`` selects PyTorch's behaviour
(mmseg issue #886, PR #1409).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch.nn.functional as F
from torch import Tensor

from densefuse.data import IGNORE_INDEX
from densefuse.tasks import unwrap_outputs


def seg_cross_entropy(
    logits: Tensor,
    target: Tensor,
    ignore_index: int = IGNORE_INDEX,
    avg_non_ignore: bool = False,
    align_corners: bool = False,
) -> Tensor:
    """Cross-entropy of ``logits`` (B,C,h,w) against ``target`` (B,H,W) int64.

    Logits are resized bilinearly to the label size first when they differ (mmseg ``loss_by_feat``).
    Averaging: see the module docstring (``avg_non_ignore=False`` = mmseg default = sum / all pixels).
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=align_corners)
    ce = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="none")
    if avg_non_ignore:
        return ce.sum() / (target != ignore_index).sum().clamp(min=1)
    return ce.sum() / ce.numel()


class SegLoss:
    """``loss(outputs, batch) -> (total, parts)``: ``loss_ce`` on ``outputs["out"]`` plus
    ``aux_weight * loss_aux`` on ``outputs["aux"]`` when present (train mode with an auxiliary head).

    ``outputs`` may be a plain tensor (segmentation_models_pytorch models).
    """

    def __init__(self, aux_weight: float = 0.4, ignore_index: int = IGNORE_INDEX,
                 avg_non_ignore: bool = False, align_corners: bool = False) -> None:
        self.aux_weight = float(aux_weight)
        self.ignore_index = ignore_index
        self.avg_non_ignore = avg_non_ignore
        self.align_corners = align_corners

    def __call__(self, outputs: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        out = unwrap_outputs(outputs)
        target = batch["label"]
        kw = dict(ignore_index=self.ignore_index, avg_non_ignore=self.avg_non_ignore, align_corners=self.align_corners)
        loss_ce = seg_cross_entropy(out["out"], target, **kw)
        total = loss_ce
        parts = {"loss_ce": float(loss_ce.detach())}
        aux = out.get("aux")
        if aux is not None:
            loss_aux = seg_cross_entropy(aux, target, **kw)
            total = total + self.aux_weight * loss_aux
            parts["loss_aux"] = float(loss_aux.detach())
        return total, parts


def aux_weight_from_config(cfg: Mapping[str, Any], default: float = 0.4) -> float:
    """``model.auxiliary_head.loss_weight`` (0.4, mmseg's value, when unset)."""
    model = cfg.get("model") or {}
    aux = model.get("auxiliary_head") or {}
    weight = aux.get("loss_weight", default) if isinstance(aux, Mapping) else default
    return float(weight if weight is not None else default)


__all__ = ["SegLoss", "aux_weight_from_config", "seg_cross_entropy"]
