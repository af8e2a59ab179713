"""Losses of the depth task: GEDepth's SILog and the adaptive mode's slope cross-entropy."""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densefuse.tasks import unwrap_outputs


def silog_loss(pred: Tensor, gt: Tensor, variance_focus: float = 0.85, eps: float = 1e-3) -> Tensor:
    """SILog as GEDepth's ``SigLoss``: over pixels with ``gt > 0`` (pooled over the batch),
    ``g = log(pred + eps) - log(gt + eps)`` and ``sqrt(var(g) + (1 - variance_focus) * mean(g)^2)`` with
    the unbiased variance; no x10 scaling. A batch without valid pixels gives 0 (with a gradient path)."""
    if pred.shape[-2:] != gt.shape[-2:]:
        pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=True)
    valid = gt > 0
    if int(valid.sum()) < 2:
        return pred.sum() * 0.0
    g = torch.log(pred[valid] + eps) - torch.log(gt[valid] + eps)
    return torch.sqrt(torch.var(g) + (1.0 - variance_focus) * g.mean().square())


class DepthLoss(nn.Module):
    """``loss_depth = SILog(out, depth)`` plus, when the outputs have ``slope_logits`` (adaptive mode),
    ``loss_slope = slope_weight * CE(slope_logits, slope, ignore_index=255)`` (GEDepth's 0.08)."""

    def __init__(self, slope_weight: float = 0.08, variance_focus: float = 0.85, ignore_index: int = 255) -> None:
        super().__init__()
        self.slope_weight, self.variance_focus, self.ignore_index = float(slope_weight), variance_focus, ignore_index

    def forward(self, outputs: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        out = unwrap_outputs(outputs)
        loss = silog_loss(out["out"], batch["depth"], self.variance_focus)
        parts = {"loss_depth": float(loss.detach())}
        logits = out.get("slope_logits")
        if logits is not None and "slope" in batch:
            target = batch["slope"].long()
            target = target[:, 0] if target.ndim == 4 else target
            if logits.shape[-2:] != target.shape[-2:]:
                logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
            if bool((target != self.ignore_index).any()):
                ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
            else:
                ce = logits.sum() * 0.0
            slope = self.slope_weight * ce
            parts["loss_slope"] = float(slope.detach())
            loss = loss + slope
        return loss, parts
