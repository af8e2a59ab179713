"""Surface-normal losses over valid pixels: L1 between unit vectors or cosine (1 - cos angle)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from densefuse.tasks import unwrap_outputs

from .metrics import valid_normals

#: ``normals.loss`` values
LOSSES = ("l1", "cosine")


def normal_loss(pred: Tensor, gt: Tensor, kind: str = "l1", mask: Optional[Tensor] = None,
                align_corners: bool = False) -> Tensor:
    """Loss of predicted normals (B,3,h,w) against ground truth (B,3,H,W) over its valid pixels.

    Both are normalized per pixel (the prediction after a bilinear resize to the ground truth). ``l1``:
    the mean absolute difference over the valid pixels' 3 components (InvPT/MTI-Net's normal loss);
    ``cosine``: the mean of ``1 - <pred, gt>`` over valid pixels (mtan/LibMTL's). A batch without a
    valid pixel gives 0 with a gradient path, so a sample lacking normals adds nothing.
    """
    if pred.shape[-2:] != gt.shape[-2:]:
        pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=align_corners)
    valid = valid_normals(gt, mask)
    if not bool(valid.any()):
        return pred.sum() * 0.0
    p = F.normalize(pred.permute(0, 2, 3, 1)[valid], dim=-1)
    g = F.normalize(gt.permute(0, 2, 3, 1)[valid].to(p.dtype), dim=-1)
    if kind == "l1":
        return (p - g).abs().mean()
    if kind == "cosine":
        return (1.0 - (p * g).sum(-1)).mean()
    raise ValueError(f"unknown normal loss '{kind}' (use {', '.join(LOSSES)})")


class NormalLoss(nn.Module):
    """``loss_normal`` of the task's outputs against ``batch["normal"]`` (and ``batch["normal_mask"]``)."""

    def __init__(self, kind: str = "l1", align_corners: bool = False) -> None:
        super().__init__()
        if kind not in LOSSES:
            raise ValueError(f"unknown normal loss '{kind}' (use {', '.join(LOSSES)})")
        self.kind, self.align_corners = kind, align_corners

    def forward(self, outputs: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        loss = normal_loss(unwrap_outputs(outputs)["out"], batch["normal"], self.kind, batch.get("normal_mask"),
                           self.align_corners)
        return loss, {"loss_normal": float(loss.detach())}
