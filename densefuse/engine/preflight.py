"""Preflight of the evaluation path: before training starts, run the evaluation once on the validation
samples that are hardest for it, so a setting or model that cannot evaluate fails in seconds, not at the
first validation hours later.

The hardest samples are found from the image headers (no pixel decoding): the largest image and the one
whose sides are divisible by the smallest power of two (odd sizes are where patch embeddings, window
attention and strided stages round or pad). They go through exactly the code of the real evaluation: the
validation dataset's own pipeline (test Resize), its collation into a batch of ``eval.batch_size``
(images of different sizes must stack), the task's eval transform and :func:`.evaluate.evaluate_full`
(whole or slide inference, TTA, the metric). The equalizers, not calibrated yet, are switched off for it
and restored; every RNG state is restored, so a run trains exactly as it would without the check.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from ..data.loader import build_loader
from ..errors import ConfigError, DensefuseError
from ..tasks import Task
from .evaluate import evaluate_full
from .runtime import capture_rng, restore_rng


def sample_images(dataset: Dataset) -> Optional[list[Path]]:
    """The image file of every sample of a file-backed dataset (seg's ``samples``, KITTI's ``items``:
    the image path first), or None for a dataset without files (synthetic data: one size)."""
    for attr in ("samples", "items"):
        rows = getattr(dataset, attr, None)
        if isinstance(rows, Sequence) and len(rows) == len(dataset):  # type: ignore[arg-type]
            return [Path(r[0]) for r in rows]
    return None


def _twos(n: int) -> int:
    """How many times 2 divides ``n``."""
    return (n & -n).bit_length() - 1 if n > 0 else 0


def hardest_samples(dataset: Dataset) -> tuple[list[int], dict[int, tuple[int, int]]]:
    """(indices of the largest and the oddest-sized sample, their header sizes ``(h, w)``); index 0 for
    datasets without files."""
    from ..data.io import image_size

    files = sample_images(dataset)
    if not files:
        return ([0] if len(dataset) else []), {}  # type: ignore[arg-type]
    sizes = [image_size(f) for f in files]
    largest = max(range(len(sizes)), key=lambda i: (sizes[i][0] * sizes[i][1], -i))
    oddest = min(range(len(sizes)), key=lambda i: (min(_twos(sizes[i][0]), _twos(sizes[i][1])),
                                                   -sizes[i][0] * sizes[i][1], i))
    picked = list(dict.fromkeys([largest, oddest]))
    return picked, {i: sizes[i] for i in picked}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def preflight_evaluation(model: nn.Module, task: Task, dataset: Dataset, cfg: Mapping[str, Any],
                         device: torch.device, amp_dtype: Optional[torch.dtype] = None) -> None:
    """Run the evaluation path once on :func:`hardest_samples` of ``dataset``; a failure is one
    :class:`ConfigError` line naming the samples, their sizes and the ``eval`` settings."""
    from ..calibration import equalizers

    indices, sizes = hardest_samples(dataset)
    if not indices:
        return
    ev = cfg["eval"]
    batch = min(int(ev["batch_size"]), len(indices))
    files = sample_images(dataset)
    where = ", ".join(f"{files[i].name if files else f'sample {i}'}"
                      + (f" ({sizes[i][0]}x{sizes[i][1]})" if i in sizes else "") for i in indices)
    settings = f"eval.mode {ev['mode']}, eval.batch_size {ev['batch_size']}, eval.tta {dict(ev['tta'])}"
    rng = capture_rng()
    modes = [(eq, eq.mode) for _, eq in equalizers(model) if not eq.is_folded]
    try:
        for eq, _ in modes:
            eq.set_mode("off")  # not calibrated yet; the shapes do not depend on it
        loader = build_loader(Subset(dataset, indices), batch, train=False, num_workers=0, seed=int(cfg["seed"]))
        evaluate_full(model, task, loader, task.build_transform(cfg, train=False), device, amp_dtype)
    except (DensefuseError, KeyboardInterrupt):
        raise
    except Exception as e:  # noqa: BLE001 - whatever the evaluation raises, said in one line before training
        reason = f"{type(e).__name__}: {_first_line(e)}"
        if "stack expects each tensor to be equal size" in reason or "equal size" in reason:
            raise ConfigError(
                f"evaluation would fail at the first validation: eval.batch_size={ev['batch_size']} cannot stack "
                f"the validation images of data.type '{cfg['data']['type']}' ({where}), which differ in size; "
                f"use eval.batch_size=1") from None
        raise ConfigError(f"evaluation would fail at the first validation (checked before training on {where}; "
                          f"{settings}): {reason}") from None
    finally:
        for eq, mode in modes:
            eq.set_mode(mode)
        restore_rng(rng)
