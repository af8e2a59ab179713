"""Inference strategies: whole image, sliding window (batched windows), flip and multi-scale TTA.

One entry point, :func:`infer`, used for evaluation and prediction alike. The model is only ever called
through the task's ``forward(model, batch)``; test-time views are combined by the task's ``merge`` (mmseg
averages softmax probabilities for segmentation; the default here is the plain mean of the outputs).

The ``eval`` config keys it reads (:class:`densefuse.config.sections.EvalSection`; a plain dict is checked once)::

    eval:
      mode: whole            # whole | slide
      crop_size: [512, 512]  # slide window (h, w)
      stride: [341, 341]     # slide stride (h, w)
      slide_batch: 8         # windows per forward call
      tta:
        flip: false          # add horizontally flipped views
        scales: null         # e.g. [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] (mmseg's ratios), relative to the input
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config.schema import build_section
from .config.sections import EvalSection
from .tasks import unwrap_outputs

Forward = Callable[[nn.Module, Mapping[str, Any]], Any]
#: Combines the views' outputs, given with whether each view was mirrored (``Task.merge_tta``'s
#: signature); returns a tensor or a dict of outputs.
Merge = Callable[[list[Tensor], list[bool]], Any]

#: mmseg's multi-scale TTA ratios (``tta_pipeline`` of the dataset configs).
MMSEG_TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def mean_merge(outputs: list[Tensor], flipped: Sequence[bool]) -> Tensor:
    """Default TTA merge: the mean of the views' outputs (mirrored or not)."""
    return torch.stack(outputs).mean(0)


def softmax_mean_merge(outputs: list[Tensor], flipped: Sequence[bool]) -> Tensor:
    """mmseg's segmentation TTA merge: the mean of the softmax probabilities (``seg_tta.py``)."""
    return torch.stack([o.softmax(1) for o in outputs]).mean(0)


def _spatial_keys(batch: Mapping[str, Any]) -> list[str]:
    """Batch keys holding per-pixel tensors aligned with ``image`` (image, labels, depth, ground, ...)."""
    size = batch["image"].shape[-2:]
    return [k for k, v in batch.items() if isinstance(v, Tensor) and v.ndim >= 3 and v.shape[-2:] == size]


def _out(forward: Forward, model: nn.Module, batch: Mapping[str, Any], key: str) -> Tensor:
    return unwrap_outputs(forward(model, batch))[key]


def _resize(x: Tensor, size: Sequence[int], align_corners: bool) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=align_corners)


def slide_windows(height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """mmseg's ``slide_inference`` grid: ``(y1, y2, x1, x2)`` windows, the last ones flush with the border."""
    ch, cw = crop
    sh, sw = stride
    h_grids = max(height - ch + sh - 1, 0) // sh + 1
    w_grids = max(width - cw + sw - 1, 0) // sw + 1
    out = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * sh, j * sw
            y2, x2 = min(y1 + ch, height), min(x1 + cw, width)
            out.append((max(y2 - ch, 0), y2, max(x2 - cw, 0), x2))
    return out


def whole_inference(forward: Forward, model: nn.Module, batch: Mapping[str, Any], key: str = "out",
                    align_corners: bool = False) -> Tensor:
    """One forward pass on the whole batch; the output is resized to the input size."""
    return _resize(_out(forward, model, batch, key), batch["image"].shape[-2:], align_corners)


def slide_inference(forward: Forward, model: nn.Module, batch: Mapping[str, Any], crop: tuple[int, int],
                    stride: tuple[int, int], window_batch: int = 8, key: str = "out",
                    align_corners: bool = False) -> Tensor:
    """Sliding-window inference as mmseg's: every window's output (resized to the window) is summed into place
    and divided by the number of windows covering each pixel. Windows of all images run ``window_batch`` at
    a time; every per-pixel batch key is cropped with the image."""
    image = batch["image"]
    n, _, h, w = image.shape
    wins = slide_windows(h, w, crop, stride)
    keys = _spatial_keys(batch)
    jobs = [(b, win) for win in wins for b in range(n)]
    total: Optional[Tensor] = None
    count = image.new_zeros((n, 1, h, w))
    for start in range(0, len(jobs), window_batch):
        chunk = jobs[start:start + window_batch]
        sub: dict[str, Any] = {k: v for k, v in batch.items() if k not in keys and not isinstance(v, Tensor)}
        for k in keys:
            sub[k] = torch.stack([batch[k][b, ..., y1:y2, x1:x2] for b, (y1, y2, x1, x2) in chunk])
        out = _out(forward, model, sub, key)
        out = _resize(out, sub["image"].shape[-2:], align_corners)
        if total is None:
            total = out.new_zeros((n, out.shape[1], h, w))
        for o, (b, (y1, y2, x1, x2)) in zip(out, chunk):
            total[b, :, y1:y2, x1:x2] += o
            count[b, :, y1:y2, x1:x2] += 1
    assert total is not None
    return total / count


def _scaled(batch: Mapping[str, Any], ratio: float, flip: bool) -> dict[str, Any]:
    """A TTA view: every per-pixel key resized by ``ratio`` (bilinear for float, nearest otherwise), flipped."""
    h, w = batch["image"].shape[-2:]
    size = (max(int(h * ratio + 0.5), 1), max(int(w * ratio + 0.5), 1))
    out = dict(batch)
    for k in _spatial_keys(batch):
        v = batch[k]
        if size != (h, w):
            x = v if v.ndim == 4 else v.unsqueeze(1)
            if x.is_floating_point():
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            else:
                x = F.interpolate(x.float(), size=size, mode="nearest").to(v.dtype)
            v = x if v.ndim == 4 else x.squeeze(1)
        out[k] = v.flip(-1) if flip else v
    return out


def infer(forward: Forward, model: nn.Module, batch: Mapping[str, Any], eval_cfg: Optional[Mapping[str, Any]] = None,
          merge: Optional[Merge] = None, key: str = "out", out_size: Optional[Sequence[int]] = None,
          align_corners: bool = False) -> dict[str, Tensor]:
    """Model outputs for ``batch`` under the config's strategy: ``{key: (B, C, H, W)}`` at the input size
    (or ``out_size``, e.g. the original label size, resized bilinearly as mmseg's postprocess).

    ``eval.mode`` picks whole or slide inference; ``eval.tta`` adds flipped and rescaled views (each view's
    output is resized back and un-flipped), combined by ``merge(views, flipped)`` (default :func:`mean_merge`;
    usually the task's ``merge_tta``, which may return a dict of outputs). Flipped views flip every
    per-pixel batch key of the image's size (labels, ``ground``, ``valid``). Without TTA the outputs are
    returned as computed (no merge).
    """
    cfg = build_section(EvalSection, eval_cfg, "eval.")
    size = tuple(batch["image"].shape[-2:])

    def run(view: Mapping[str, Any]) -> Tensor:
        if cfg["mode"] == "slide":
            return slide_inference(forward, model, view, cfg["crop_size"], cfg["stride"], cfg["slide_batch"], key,
                                   align_corners)
        return whole_inference(forward, model, view, key, align_corners)

    tta = cfg["tta"]
    scales = list(tta["scales"]) if tta["scales"] else [1.0]
    flips = [False, True] if tta["flip"] else [False]
    if len(scales) == 1 and scales[0] == 1.0 and flips == [False]:
        out = run(batch)
    else:
        views, flipped = [], []
        for r in scales:
            for flip in flips:
                o = run(_scaled(batch, float(r), flip))
                o = o.flip(-1) if flip else o
                views.append(_resize(o, size, align_corners))
                flipped.append(flip)
        merged = (merge or mean_merge)(views, flipped)
        out = unwrap_outputs(merged)[key] if isinstance(merged, Mapping) else merged
    if out_size is not None:
        out = _resize(out, out_size, align_corners)
    return {key: out}
