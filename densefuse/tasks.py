"""Task plugins: what a dense-prediction task adds to the core (datasets, loss, metric, visuals).

Tasks register under the entry-point group ``densefuse.tasks`` (``seg`` ships in the ``tasks/``
folder of the repository, installed as the package ``densefuse_tasks``). The core never imports a task directly: it asks :func:`get_task`.
A third task is a new package with an entry point; nothing in ``densefuse/`` changes.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from .config.sections import CoreConfig
from .registry import TASK_GROUP, TASKS

ENTRY_POINT_GROUP = TASK_GROUP


@dataclass(frozen=True)
class DenseKey:
    """How augmentation moves one dense (per-pixel) batch key.

    ``resample`` is ``"bilinear"`` (images, continuous maps such as a ground-depth embedding) or
    ``"nearest"`` (labels, sparse depth: values must never be blended); ``fill`` is the value of pixels
    that come from outside the source image (padding, rotation corners).
    """

    resample: str = "bilinear"
    fill: float = 0.0


class Metric(ABC):
    """Accumulates over a whole dataset; ``compute`` all-reduces under torch.distributed.

    Every task's metric derives from this class: the evaluation calls exactly these members.
    ``update`` may also accept other argument forms (e.g. ``(prediction, target)`` tensors) for direct use.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget everything accumulated (the evaluation starts each pass with it)."""

    @abstractmethod
    def update(self, outputs: Any, batch: Mapping[str, Tensor]) -> None:
        """Accumulate one batch: the model ``outputs`` (as ``Task.forward`` returns them, merged over
        test-time views) against the targets in ``batch``."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """The summary over everything seen on every rank: flat ``name -> float``, the task's
        ``primary_metric`` among them (written to ``metrics.csv``)."""

    def tables(self) -> dict[str, pd.DataFrame]:
        """Named tables of detail (e.g. ``{"per_class": ...}``, written as ``<name>.csv``); default none.
        Called after :meth:`compute`, whose all-reduced state it may read."""
        return {}


class Task(ABC):
    """Base class of a task plugin. Subclasses set ``name``, ``default_config`` and ``primary_metric``.

    Batches are dicts of tensors: at least ``"image"`` (B,3,H,W float, normalized) plus the targets the
    task needs (``"label"`` (B,H,W) int64 for seg, ``"depth"`` (B,1,H,W) float metres for depth).
    """

    name: str = ""
    default_config: str = ""
    primary_metric: str = ""
    #: ``"max"`` when a larger primary metric is better (mIoU), ``"min"`` when smaller is (abs_rel)
    metric_direction: str = "max"
    #: the dense keys of this task's batches besides ``"image"``, with how augmentation moves them
    dense_keys: Mapping[str, DenseKey] = {}
    #: the schema of this task's configs: :class:`~densefuse.config.sections.CoreConfig` or a subclass adding the
    #: task's own section (``cfg.<task name>``) and the keys it reads in core sections (``tasks/seg/config.py``)
    config_class: type[CoreConfig] = CoreConfig
    #: summary metrics of the task's rows in ``densefuse compare`` tables; empty: the primary metric alone;
    #: ``"all"``: every summary metric (a task whose metric names depend on its config, e.g. mtl's)
    table_metrics: Union[Sequence[str], str] = ()
    #: whether :meth:`predict_sample` reads ``densefuse predict --calib`` (refused for other tasks)
    predict_calib: bool = False

    def __init__(self, cfg: Optional[Mapping[str, Any]] = None) -> None:
        #: the validated run config (see densefuse.config; the defaults when none is given)
        self.cfg = cfg if cfg is not None else self.config_class()

    @abstractmethod
    def build_dataset(self, cfg: Mapping[str, Any], split: str) -> Dataset:
        """The dataset of ``split`` (``cfg.data.train_split`` / ``cfg.data.val_split``)."""

    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        from .model import build_model

        return build_model(cfg)

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Any:
        """Call the model on a batch: the one place a model is called (training, evaluation,
        calibration, prediction). Tasks whose model takes more than the image override it."""
        return model(batch["image"])

    def validate_config(self, cfg: Any) -> None:
        """Check what the declared rules cannot (dataset kwargs, combinations of keys); raise
        :class:`~densefuse.errors.ConfigError`. Runs once, when the config is loaded: builders never repeat it."""
        return None

    def is_better(self, value: float, best: Optional[float]) -> bool:
        """Whether ``value`` of the primary metric beats ``best`` in this task's direction."""
        if best is None:
            return True
        return value > best if self.metric_direction == "max" else value < best

    @abstractmethod
    def build_transform(self, cfg: Mapping[str, Any], train: bool) -> Callable[[dict], dict]:
        """Batch transform run on the training device after collation: for ``train`` the random
        augmentation (kornia), then conversion of the uint8 image to the normalized float input."""

    def test_pipeline(self, cfg: Mapping[str, Any]) -> Optional[Callable[[dict], dict]]:
        """The per-sample test-time transform of an evaluation sample (seg: mmseg's keep-ratio Resize,
        which records ``ori_size``), or None. The evaluation dataset and ``densefuse predict`` both apply
        it, so a prediction runs the pipeline its evaluation ran."""
        return None

    @abstractmethod
    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Total loss and a dict of its named parts (floats, for logging)."""

    @abstractmethod
    def metric(self, cfg: Mapping[str, Any]) -> Metric:
        """A fresh metric accumulator for one evaluation."""

    @abstractmethod
    def predict(self, outputs: Any) -> Tensor:
        """Turn model outputs into predictions (class map, depth map)."""

    def compare_members(self, cfg: Any) -> list[Any]:
        """The configs ``densefuse compare`` trains for ``cfg`` (each under every mode and seed): ``cfg`` itself;
        a composite task adds its baselines (mtl: one single-task config per sub-task)."""
        return [cfg]

    def compare_tables(self, runs: Any, configs: Sequence[Any]) -> dict[str, Any]:
        """Extra tables of ``densefuse compare`` (name -> DataFrame) over ``runs`` (one row per run and metric)
        of this task's ``configs``: none by default; mtl adds its delta-m tables."""
        return {}

    def visualize(self, batch: Mapping[str, Tensor], prediction: Tensor) -> Tensor:
        """(B,3,kH,W) uint8 pictures of the predictions for the work dir: k >= 1 rows of the input's width
        (e.g. prediction, ground truth, legend); the trainer stacks the inputs above them."""
        return batch["raw_image"] if "raw_image" in batch else batch["image"]

    def merge_tta(self, outputs: Sequence[Any], flipped: Sequence[bool]) -> dict[str, Tensor]:
        """Merge test-time views into one output. ``outputs`` are the views' outputs (tensors or output
        dicts), already resized to one size and with their pixels mapped back to the original frame;
        ``flipped[i]`` says whether view ``i`` was mirrored (a task whose outputs are vectors, like surface
        normals, also un-mirrors their values). No view is a ValueError. Default: the mean of every key all
        views have."""
        outs = [unwrap_outputs(o) for o in outputs]
        if not outs:
            raise ValueError("merge_tta needs at least one view")
        return {k: torch.stack([o[k] for o in outs]).mean(0) for k in outs[0] if all(k in o for o in outs)}

    def predict_sample(self, image: Tensor, path: Union[str, Path], calib: Optional[Union[str, Path]] = None) -> dict:
        """What ``densefuse predict`` feeds the test pipeline for the image read from ``path`` (unbatched
        tensors). Default: the image alone; a task whose model takes more (depth: a ground embedding from
        the camera, ``calib`` when :attr:`predict_calib`) adds it here."""
        return {"image": image}

    def save_prediction(self, prediction: Tensor, stem: Union[str, Path], image: Optional[Tensor] = None) -> list[Path]:
        """Write one sample's prediction (as :meth:`predict` returns it, without the batch dimension) to
        files named from ``stem`` (its folder created when missing) and return their paths; ``image`` is
        the input picture (3,H,W uint8) for tasks that draw on it. Default: ``<stem>.npy`` with the prediction as a NumPy array; tasks write their
        formats (seg: a palette PNG of class ids, depth: KITTI's 16-bit PNG)."""
        stem = Path(stem)
        out = stem.with_name(stem.name + ".npy")
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, prediction.detach().cpu().numpy())
        return [out]


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator for tasks defined in code (tests, notebooks); installed tasks use entry points."""

    def deco(cls: type[Task]) -> type[Task]:
        return TASKS.register(name, cls)  # the registry sets cls.name

    return deco


def available_tasks() -> list[str]:
    """Names of every task: registered in code or installed under the entry-point group."""
    return TASKS.names()


def get_task(name: str, cfg: Optional[Mapping[str, Any]] = None) -> Task:
    """Instantiate the task called ``name``; an unknown name is a :class:`~densefuse.errors.ConfigError`."""
    return task_class(name)(cfg)


def task_class(name: str) -> type[Task]:
    """The class of the task called ``name`` (not instantiated); an unknown name is a ConfigError."""
    return TASKS.get(name, key="task")


def unwrap_outputs(outputs: Any) -> dict[str, Tensor]:
    """Model outputs as a dict with at least ``"out"`` (plain tensors from smp models included)."""
    if isinstance(outputs, Tensor):
        return {"out": outputs}
    if isinstance(outputs, Mapping):
        return dict(outputs)
    raise TypeError(f"unsupported model output type {type(outputs).__name__}")


def all_reduce_(t: Tensor) -> Tensor:
    """Sum ``t`` over ranks in place when torch.distributed is initialized."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return t
