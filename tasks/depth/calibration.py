"""Calibration of chained fusion sites in dependency order.

The DenseDepth decoder chains its four up-fusions: each site's first branch is the previous site's
output. A single calibration pass with every equalizer inactive measures the downstream sites on
features that change as soon as the upstream sites equalize (in the synthetic default, the last site's
upsampled branch then enters its conv at variance ~14 instead of 1). :func:`calibrate_in_order`
measures one site per pass, in forward order, with the sites before it already equalizing, so every
concat subject enters its fusion conv at mean 0 / variance 1 in the real forward.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import pandas as pd
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from densefuse.equalizer import equalizers
from densefuse.errors import CalibrationError


def _take(batches: Iterable[Any], num_images: Optional[int]) -> list[Any]:
    out, seen = [], 0
    for b in batches:
        out.append(b)
        seen += (b["image"] if isinstance(b, dict) else b).shape[0]
        if num_images is not None and seen >= num_images:
            break
    if not out:
        raise CalibrationError("calibration got no images (empty dataset or loader)")
    return out


def calibrate_in_order(model: nn.Module, batches: Iterable[Any], num_images: Optional[int] = None,
                       forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> pd.DataFrame:
    """Calibrate every scale equalizer of ``model`` one site per pass, in module order (the forward
    order of :class:`~densefuse_tasks.depth.heads.DenseDepthHead`), each measured with the sites before
    it equalizing. BatchNorm runs in train mode; BN buffers and train/eval modes are restored after.
    Sites in mode ``fold`` are measured like ``explicit`` (the same forward in the interior) and left
    for :func:`densefuse.fold`. Returns one row per (site, branch) with the frozen mean and std."""
    eqs = list(equalizers(model))
    if not eqs:
        raise CalibrationError("the model has no scale equalizers")
    if any(bool(eq.folded) for _, eq in eqs):
        raise CalibrationError("the model is already folded; calibrating again would fold twice")
    data = _take(batches, num_images)
    call = forward or (lambda m, b: m(b["image"] if isinstance(b, dict) else b))
    modes = [eq.mode for _, eq in eqs]
    training = [(m, m.training) for m in model.modules()]
    bn_state = [(m, {k: v.clone() for k, v in m._buffers.items() if v is not None})
                for m in model.modules() if isinstance(m, _BatchNorm)]
    rows = []
    try:
        for _, eq in eqs:
            eq.mode = "off"
        model.train()
        with torch.no_grad():
            for step, ((name, eq), mode) in enumerate(zip(eqs, modes)):
                eq.reset_stats()
                eq.observing = True
                try:
                    for b in data:
                        call(model, b)
                finally:
                    eq.observing = False
                n, mean, var = eq.measured()
                eq.finish_calibration((n, mean, var))
                eq.mode = "off" if mode == "off" else "explicit"
                for i, g in enumerate(eq.groups):
                    rows.append({"site": name[: -len(".equalizer")] if name.endswith(".equalizer") else name,
                                 "branch": i, "channels": g, "pass": step + 1, "mean": float(mean[i]),
                                 "std": math.sqrt(float(var[i])), "frozen_mean": float(eq.mean[i]),
                                 "frozen_std": float(eq.std[i]), "mode": mode})
    finally:
        for (_, eq), mode in zip(eqs, modes):
            eq.mode = mode
        for m, bufs in bn_state:
            for k, v in bufs.items():
                m._buffers[k].copy_(v)
        for m, was in training:
            m.training = was
    return pd.DataFrame(rows)
