"""KITTI depth metrics: the nine numbers per image, then a NaN-mean over images (as GEDepth / BTS)."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from densefuse.tasks import Metric, all_reduce_, unwrap_outputs

#: Output order: the paper's Table 5 (a1 a2 a3 abs_rel rmse log10 rmse_log silog sq_rel).
METRIC_NAMES = ("a1", "a2", "a3", "abs_rel", "rmse", "log10", "rmse_log", "silog", "sq_rel")

#: Eval crops as fractions of the (KB-cropped) ground-truth height and width: rows, cols.
CROPS = {
    "garg": ((0.40810811, 0.99189189), (0.03594771, 0.96405229)),
    "eigen": ((0.3324324, 0.91351351), (0.03594771, 0.96405229)),
}


def crop_mask(size: tuple[int, int], crop: Optional[str], device: Any = None) -> Tensor:
    """Boolean (H, W) mask of the garg / eigen evaluation crop (all True for ``None``)."""
    H, W = size
    mask = torch.zeros(H, W, dtype=torch.bool, device=device)
    if crop is None:
        return mask.fill_(True)
    (t, b), (left, r) = CROPS[crop]
    mask[int(t * H):int(b * H), int(left * W):int(r * W)] = True
    return mask


def image_errors(pred: Tensor, gt: Tensor) -> Tensor:
    """The nine metrics (in :data:`METRIC_NAMES` order) of one image from its valid pixels (1-D
    tensors); all NaN when there is none."""
    if gt.numel() == 0:
        return torch.full((len(METRIC_NAMES),), float("nan"), dtype=torch.float64)
    pred, gt = pred.double(), gt.double()
    thresh = torch.maximum(gt / pred, pred / gt)
    a1, a2, a3 = ((thresh < 1.25 ** k).double().mean() for k in (1, 2, 3))
    diff = gt - pred
    abs_rel = (diff.abs() / gt).mean()
    sq_rel = (diff.square() / gt).mean()
    rmse = diff.square().mean().sqrt()
    rmse_log = (gt.log() - pred.log()).square().mean().sqrt()
    log10 = (gt.log10() - pred.log10()).abs().mean()
    d = pred.log() - gt.log()
    d = torch.nan_to_num(d, nan=0.0)
    silog = (d.square().mean() - d.mean().square()).clamp_min(0).sqrt() * 100
    return torch.stack([a1, a2, a3, abs_rel, rmse, log10, rmse_log, silog, sq_rel])


class DepthMetrics(Metric):
    """Accumulates the nine KITTI metrics over a dataset.

    Per image: valid = ``min_depth < gt < max_depth`` inside the ``crop`` (``"garg"``, ``"eigen"`` or
    ``None``) of the ground truth as given (for KITTI: already KB-cropped to 352x1216); the prediction is
    resized to the ground truth (bilinear, align_corners=True) when sizes differ. The dataset value is
    the mean over images with at least one valid pixel (a NaN-mean, so RMSE is the mean of per-image
    RMSEs). Under torch.distributed the per-image sums and counts are all-reduced.

    ``update(pred, gt)`` takes depth maps in metres, (B,1,H,W) or (B,H,W); ``update(outputs, batch)``
    (as the trainer calls it) takes the model outputs and a batch with ``"depth"``.
    """

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 80.0, crop: Optional[str] = "garg") -> None:
        if crop not in (None, *CROPS):
            raise ValueError(f"crop must be one of garg, eigen, None; got {crop!r}")
        self.min_depth, self.max_depth, self.crop = float(min_depth), float(max_depth), crop
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float64)
        self._counts = torch.zeros(len(METRIC_NAMES), dtype=torch.float64)
        self._rows: list[Tensor] = []

    def update(self, pred: Any, gt: Any) -> None:
        if isinstance(gt, Mapping):
            gt = gt["depth"]
            pred = unwrap_outputs(pred)["out"]
        pred, gt = _bhw(pred).detach(), _bhw(gt).detach()
        if pred.shape[-2:] != gt.shape[-2:]:
            pred = F.interpolate(pred[:, None].float(), size=gt.shape[-2:], mode="bilinear", align_corners=True)[:, 0]
        mask = crop_mask(tuple(gt.shape[-2:]), self.crop, gt.device)
        for p, g in zip(pred, gt):
            valid = (g > self.min_depth) & (g < self.max_depth) & mask
            row = image_errors(p[valid].cpu(), g[valid].cpu())
            self._rows.append(row)
            ok = ~torch.isnan(row)
            self._sums += torch.where(ok, row, torch.zeros_like(row))
            self._counts += ok.double()

    def per_image(self) -> pd.DataFrame:
        """One row per image seen on this rank (NaN rows: images without valid pixels)."""
        data = torch.stack(self._rows).numpy() if self._rows else None
        return pd.DataFrame(data, columns=list(METRIC_NAMES))

    def compute(self) -> dict[str, float]:
        both = torch.stack([self._sums, self._counts])
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            both = both.cuda()  # NCCL reduces CUDA tensors only
        both = all_reduce_(both).cpu()
        means = both[0] / both[1]  # 0/0 = NaN when no image had a valid pixel
        return {name: float(v) for name, v in zip(METRIC_NAMES, means)}


def _bhw(x: Tensor) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"depth maps must have one channel, got shape {tuple(x.shape)}")
        return x[:, 0]
    if x.ndim == 3:
        return x
    if x.ndim == 2:
        return x[None]
    raise ValueError(f"expected depth maps shaped (B,1,H,W) or (B,H,W), got {tuple(x.shape)}")
