"""Evaluation with the task metric: each rank takes its shard of the loader, the metric all-reduces.

The model runs through :func:`densefuse.inference.infer` with the config's ``eval`` section (whole or
slide inference, flip / multi-scale TTA merged by the task's ``merge_tta``), so the trainer's periodic
evaluation and ``densefuse eval`` share one code path. When the batch carries a ``label`` of another size
than the (test-time resized) image, the output is resized to the label's size and the metric runs there.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import pandas as pd
import torch
from torch import nn

from ..inference import infer
from ..tasks import Task, unwrap_outputs
from .runtime import to_device
from .step import autocast


@torch.no_grad()
def evaluate_full(
    model: nn.Module,
    task: Task,
    loader: Iterable[Mapping[str, Any]],
    transform: Callable[[dict], dict],
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
) -> tuple[dict[str, float], dict[str, pd.DataFrame]]:
    """``(summary, tables)`` of the task metric over ``loader`` in eval mode (mode restored after).

    ``summary`` is what ``metric.compute()`` returns, ``tables`` what ``metric.tables()`` returns
    (see :class:`densefuse.tasks.Metric`).
    """
    was_training = model.training
    model.eval()
    metric = task.metric(task.cfg)
    metric.reset()
    try:
        for batch in loader:
            batch = transform(to_device(batch, device))
            with autocast(device, amp_dtype):
                outputs = infer_outputs(model, task, batch)
            metric.update(outputs, batch)
    finally:
        model.train(was_training)
    summary = {k: float(v) for k, v in metric.compute().items()}
    return summary, dict(metric.tables())


def infer_outputs(model: nn.Module, task: Task, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The task's outputs for ``batch`` under ``task.cfg["eval"]`` (see :func:`densefuse.inference.infer`).

    Whole inference without TTA returns the task's own outputs unchanged (every key, e.g. depth's slope
    logits); otherwise ``{"out": ...}`` from :func:`infer` (merged by the task's ``merge_tta``), at the
    label's size when the batch has a ``label`` whose size differs from the image's. ``densefuse eval``,
    the trainer's validation and ``densefuse predict`` all call it.
    """
    eval_cfg = (task.cfg or {}).get("eval") or {}
    tta = eval_cfg.get("tta") or {}
    label = batch.get("label")
    size = tuple(label.shape[-2:]) if isinstance(label, torch.Tensor) else _original_size(batch)
    if size == tuple(batch["image"].shape[-2:]):
        size = None
    if eval_cfg.get("mode", "whole") == "whole" and not tta.get("flip") and not tta.get("scales") and size is None:
        return unwrap_outputs(task.forward(model, batch))
    align = bool(((task.cfg or {}).get("model") or {}).get("align_corners", False))
    return infer(task.forward, model, batch, eval_cfg, merge=task.merge_tta, out_size=size, align_corners=align)


def _original_size(batch: Mapping[str, Any]) -> Optional[tuple[int, int]]:
    """The images' size before the test-time resize (``ori_size``, one (h, w) row per sample), when every
    sample of the batch shares it: a prediction without a label is returned at the image's own size."""
    ori = batch.get("ori_size")
    if not isinstance(ori, torch.Tensor) or ori.ndim != 2 or ori.shape[0] == 0 or not bool((ori == ori[0]).all()):
        return None
    return int(ori[0, 0]), int(ori[0, 1])


def evaluate(
    model: nn.Module,
    task: Task,
    loader: Iterable[Mapping[str, Any]],
    transform: Callable[[dict], dict],
    device: torch.device,
) -> dict[str, float]:
    """The task metric's summary over ``loader`` (see :func:`evaluate_full` for the tables)."""
    return evaluate_full(model, task, loader, transform, device)[0]


def summary_only(metrics: Mapping[str, float]) -> dict[str, float]:
    """The summary as floats, every name kept (``within_11.25`` holds a dot: per-class detail is in the
    tables, never in the summary, since ``Metric.tables`` is part of the protocol)."""
    return {k: float(v) for k, v in metrics.items()}
