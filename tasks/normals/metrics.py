"""Surface-normal metrics: angular error in degrees between predicted and ground-truth normals, over every
valid pixel of the dataset (pooled, as the NYUv2 evaluations of mtan, LibMTL and MTI-Net): mean, median and
the percentage of pixels within 11.25, 22.5 and 30 degrees."""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from densefuse.tasks import Metric, all_reduce_, unwrap_outputs

#: summary names, in output order
METRIC_NAMES = ("mean", "median", "within_11.25", "within_22.5", "within_30")
#: the thresholds of the ``within_*`` metrics, in degrees
THRESHOLDS = (11.25, 22.5, 30.0)
#: width of the histogram bins the median is read from (degrees)
BIN_DEG = 0.01
#: a ground-truth normal shorter than this is "no ground truth" (datasets store invalid pixels as zeros)
MIN_NORM = 0.5


def valid_normals(gt: Tensor, mask: Optional[Tensor] = None) -> Tensor:
    """(B,H,W) bool: pixels whose ground-truth normal (B,3,H,W) is finite and not (near) zero-length, and
    where ``mask`` (B,1,H,W) or (B,H,W), when given, is nonzero."""
    finite = torch.isfinite(gt).all(1)
    valid = finite & (torch.nan_to_num(gt).norm(dim=1) > MIN_NORM)
    if mask is not None:
        m = mask[:, 0] if mask.ndim == 4 else mask
        valid = valid & (m != 0)
    return valid


def angular_errors(pred: Tensor, gt: Tensor) -> Tensor:
    """Angle in degrees between normal vectors (..., 3, ...) along dim 1 (both normalized first)."""
    cos = (F.normalize(pred.double(), dim=1) * F.normalize(gt.double(), dim=1)).sum(1)
    return torch.rad2deg(torch.acos(cos.clamp(-1.0, 1.0)))


class NormalMetrics(Metric):
    """Accumulates angular errors over a dataset.

    The mean and the ``within_*`` percentages are exact (sums and counts); the median is read from a
    histogram of :data:`BIN_DEG` degree bins (bin midpoints of the middle pixel, or the mean of the two
    middle ones for an even count), so it is exact to 0.005 degrees and the state all-reduces as a
    fixed-size tensor under torch.distributed.
    Predictions are resized (bilinear) to the ground truth and normalized. ``update(outputs, batch)`` as
    the trainer calls it takes ``batch["normal"]`` (and ``batch["normal_mask"]`` when present);
    ``update(pred, gt)`` takes two (B,3,H,W) tensors.
    """

    def __init__(self, align_corners: bool = False) -> None:
        self.align_corners = align_corners
        self.bins = int(round(180.0 / BIN_DEG))
        self.reset()

    def reset(self) -> None:
        self._hist = torch.zeros(self.bins, dtype=torch.float64)
        self._sums = torch.zeros(2 + len(THRESHOLDS), dtype=torch.float64)  # count, sum, within counts

    def update(self, pred: Any, gt: Any, mask: Optional[Tensor] = None) -> None:
        if isinstance(gt, Mapping):
            mask = gt.get("normal_mask")
            gt = gt["normal"]
            pred = unwrap_outputs(pred)["out"]
        pred, gt = pred.detach().float(), gt.detach().float()
        if pred.shape[-2:] != gt.shape[-2:]:
            pred = F.interpolate(pred, size=gt.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        valid = valid_normals(gt, mask)
        err = angular_errors(pred.permute(0, 2, 3, 1)[valid][..., None], gt.permute(0, 2, 3, 1)[valid][..., None])
        err = err.reshape(-1).cpu()
        self._sums[0] += err.numel()
        self._sums[1] += err.sum()
        for i, t in enumerate(THRESHOLDS):
            self._sums[2 + i] += (err < t).sum()
        idx = (err / BIN_DEG).long().clamp_(0, self.bins - 1)
        self._hist += torch.bincount(idx, minlength=self.bins).double()

    def compute(self) -> dict[str, float]:
        both = torch.cat([self._sums, self._hist])
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
            both = both.cuda()  # NCCL reduces CUDA tensors only
        both = all_reduce_(both).cpu()
        sums, hist = both[: len(self._sums)], both[len(self._sums):]
        n = float(sums[0])
        if n == 0:
            return {k: math.nan for k in METRIC_NAMES}
        cum = torch.cumsum(hist, 0)
        ranks = [(n + 1) / 2] if n % 2 else [n / 2, n / 2 + 1]  # 1-based ranks of the middle value(s)
        bins = [min(int(torch.searchsorted(cum, torch.tensor(r, dtype=torch.float64))), self.bins - 1) for r in ranks]
        out = {"mean": float(sums[1]) / n, "median": sum((b + 0.5) * BIN_DEG for b in bins) / len(bins)}
        for i in range(len(THRESHOLDS)):
            out[METRIC_NAMES[2 + i]] = float(sums[2 + i]) / n * 100.0
        return out
