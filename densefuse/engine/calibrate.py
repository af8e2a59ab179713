"""Calibration outside a training run (``densefuse calibrate`` and ``inspect``): the model of a config on
its device, the training images that calibrate it, and the passes over them with the trainer's progress
bar. The batches are the trainer's own (:func:`densefuse.engine.trainer.calibration_batches`), so a
standalone calibration measures what a training run's calibration measures.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Iterator, Mapping, Optional

import pandas as pd
import torch
from torch import nn
from torch.utils.data import Dataset

from ..calibration import calibrate, measure
from ..tasks import Task, get_task
from .runtime import resolve_device
from .trainer import calibration_batches, with_progress


def show_progress(progress: Optional[bool]) -> bool:
    """``--progress/--no-progress``: a bar when asked, else only on a terminal (quiet in CI and pipes)."""
    return sys.stderr.isatty() if progress is None else progress


class CalibrationRun:
    """The model of ``cfg`` (torch seeded with the config's seed: a reproducible initial model) on its
    device and the training split that calibrates it; ``num_images`` defaults to ``calibration.num_images``
    (null: every image)."""

    def __init__(self, cfg: Mapping[str, Any], num_images: Optional[int] = None, progress: Optional[bool] = None) -> None:
        torch.manual_seed(cfg["seed"])
        self.cfg = cfg
        self.task: Task = get_task(cfg["task"], cfg)
        self.device = resolve_device(cfg["device"])
        self.model: nn.Module = self.task.build_model(cfg).to(self.device)
        self.dataset: Dataset = self.task.build_dataset(cfg, cfg["data"]["train_split"])
        self.num_images = int(num_images or cfg["calibration"]["num_images"] or len(self.dataset))
        self.progress = show_progress(progress)

    def batches(self, seed: int, desc: str) -> Callable[[], Iterator[Mapping[str, Any]]]:
        """A function returning one pass over the images in ``seed``'s order (chained fusion sites take one
        pass each), counted by a progress bar ``desc (pass k)`` when progress is on."""
        passes = [0]

        def one_pass() -> Iterator[Mapping[str, Any]]:
            passes[0] += 1
            stream = calibration_batches(self.task, self.cfg, self.dataset, self.device, seed)
            return with_progress(stream, self.num_images, f"{desc} (pass {passes[0]})") if self.progress else stream

        return one_pass

    def calibrate(self) -> pd.DataFrame:
        """Measure and freeze every fusion site on the images in the config seed's order: the stats table."""
        return calibrate(self.model, self.batches(self.cfg["seed"], "calibrate"), num_images=self.num_images,
                         forward=self.task.forward)

    def measure(self) -> pd.DataFrame:
        """Observe every site on other images than the calibration's (the next seed's order)."""
        return measure(self.model, self.batches(self.cfg["seed"] + 1, "measure"), num_images=self.num_images,
                       forward=self.task.forward)
