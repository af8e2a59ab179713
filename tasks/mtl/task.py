"""The composite task ``densefuse train --task mtl``: one shared encoder, a decoder + predictor per sub-task
(``mtl.tasks``, out of seg / depth / normals), each sub-task's own loss, metric, pictures and output files, and a
loss weighting over the per-task losses.

The sub-tasks are the installed ``seg``, ``depth`` and ``normals`` tasks (:func:`densefuse.tasks.get_task`), each
given a config view of its own (``task: <name>``, its section from ``mtl.sections.<name>``): the composite adds
no loss or metric of its own. A sample whose ``has_<task>`` is False, or whose map of that task holds no valid
pixel, is left out of that task's loss and metric; a batch where no sample has a task's label gives that task
no loss at all (the weighting skips it).

The primary metric (best checkpoint) is the first sub-task's primary metric, prefixed (``seg/mIoU`` for the
default ``mtl.tasks: [seg, depth, normals]``), in that metric's direction. Δm is not used for it: it needs the
single-task baselines, which only ``densefuse compare`` trains.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from densefuse.config import plain
from densefuse.config.sections import CoreConfig
from densefuse.data import Augment, Normalize, RandomScaleCrop
from densefuse.tasks import DenseKey, Metric, Task, get_task, task_class, unwrap_outputs

from .config import (
    DATASET_CLASSES,
    SUBTASKS,
    MTLConfig,
    mtl_section,
    subtask_section,
    validate_mtl,
    weighting_from,
)
from .datasets import TASK_KEYS, CityscapesMTL, NYUv2, SyntheticScene
from .model import MTLModel, output_channels

#: the batch keys of the joint datasets, moved by augmentation without blending (labels, sparse depth, unit
#: normals); their fills mean "no ground truth"
MTL_KEYS = {"label": DenseKey("nearest", 255), "depth": DenseKey("nearest", 0.0), "normal": DenseKey("nearest", 0.0)}
#: channels of each sub-task's share of :meth:`MTLTask.predict`'s tensor (class map, depth, unit normals)
PREDICTION_CHANNELS = {"seg": 1, "depth": 1, "normals": 3}
#: the metrics Δm averages per sub-task, with their directions (as the multi-task papers report them)
DELTA_METRICS = {
    "seg": {"mIoU": "max", "aAcc": "max"},
    "depth": {"abs_rel": "min", "rmse": "min"},
    "normals": {"mean": "min", "median": "min", "within_11.25": "max", "within_22.5": "max", "within_30": "max"},
}


def has_valid(task: str, batch: Mapping[str, Tensor]) -> Tensor:
    """(B,) bool: samples with the task's label (``has_<task>``, True when absent) and at least one valid
    pixel in it."""
    key = TASK_KEYS[task]
    x = batch[key]
    b = x.shape[0]
    if task == "seg":
        valid = (x != MTL_KEYS["label"].fill).reshape(b, -1).any(1)
    elif task == "depth":
        valid = (x > 0).reshape(b, -1).any(1)
    else:
        from densefuse_tasks.normals import valid_normals

        valid = valid_normals(x, batch.get("normal_mask")).reshape(b, -1).any(1)
    flag = batch.get(f"has_{task}")
    if isinstance(flag, Tensor):
        valid = valid & flag.to(valid.device).bool().reshape(-1)
    return valid


def _select(batch: Mapping[str, Any], keep: Tensor) -> dict[str, Any]:
    """The samples ``keep`` (B,) of every batch tensor that has the batch dimension."""
    b = keep.shape[0]
    return {k: v[keep.to(v.device)] if isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == b else v
            for k, v in batch.items()}


class RandomDepthScaleCrop(RandomScaleCrop):
    """:class:`~densefuse.data.RandomScaleCrop` that divides depth by the zoom, as mtan's NYUv2 augmentation:
    an image enlarged r times looks like the scene seen r times closer."""

    def apply(self, batch: Mapping[str, Tensor], params: dict) -> dict:
        out = super().apply(batch, params)
        if "depth" in out:
            out["depth"] = out["depth"] / params["scale"].to(out["depth"]).view(-1, 1, 1, 1)
        return out

    def invert(self, batch: Mapping[str, Tensor], params: dict) -> dict:
        out = super().invert(batch, params)
        if "depth" in out:
            out["depth"] = out["depth"] * params["scale"].to(out["depth"]).view(-1, 1, 1, 1)
        return out


class MTLMetric(Metric):
    """Every sub-task's metric, fed only the samples that have its label; ``compute`` prefixes the names
    (``seg/mIoU``, ``depth/abs_rel``, ``normals/mean``)."""

    def __init__(self, task: "MTLTask", metrics: Mapping[str, Any]) -> None:
        self.task, self.metrics = task, dict(metrics)

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()

    def update(self, outputs: Any, batch: Mapping[str, Tensor]) -> None:
        parts = self.task.split(outputs)
        for t, m in self.metrics.items():
            keep = has_valid(t, batch)
            if bool(keep.any()):
                m.update(_select({"out": parts[t]}, keep), _select(batch, keep))

    def compute(self) -> dict[str, float]:
        return {f"{t}/{k}": float(v) for t, m in self.metrics.items() for k, v in m.compute().items()}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {f"{t}_{k}": v for t, m in self.metrics.items() for k, v in m.tables().items()}


class MTLTask(Task):
    """Several dense tasks on one encoder (see the module docstring). Config section ``mtl``
    (:mod:`densefuse_tasks.mtl.config`)."""

    name = "mtl"
    default_config = "mtl/synthetic_hrnet_r18"
    #: the default config's first sub-task; an instance takes its own config's first sub-task
    primary_metric = "seg/mIoU"
    metric_direction = "max"
    #: ``densefuse compare`` shows every metric the runs recorded (each config has its own sub-tasks)
    table_metrics = "all"
    dense_keys = MTL_KEYS
    config_class = MTLConfig

    def __init__(self, cfg: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(cfg)
        section = mtl_section(self.cfg)
        self.tasks = [str(t) for t in section["tasks"]] if isinstance(section["tasks"], (list, tuple)) else []
        self._subtasks: dict[str, Task] = {}
        self._weighting: Optional[nn.Module] = None
        if self.tasks and self.tasks[0] in SUBTASKS:
            first = task_class(self.tasks[0])
            self.primary_metric = f"{self.tasks[0]}/{first.primary_metric}"
            self.metric_direction = first.metric_direction

    # ------------------------------------------------------------------ config and sub-tasks
    def validate_config(self, cfg: Mapping[str, Any]) -> None:
        """The ``mtl`` section, the heads, the sub-tasks' sections, ``model.type: mtl`` and the dataset's labels."""
        validate_mtl(cfg)

    def subtask(self, name: str) -> Task:
        """The sub-task ``name``, configured with a view of this config: ``task: name`` and its own section."""
        if name not in self._subtasks:
            # the sub-task's own config class over the shared sections (already validated as part of this config)
            shared = {k: v for k, v in plain(self.cfg).items() if k in CoreConfig.defaults()}
            own = {name: plain(subtask_section(mtl_section(self.cfg), name))}
            sub = task_class(name).config_class.build({**shared, "task": name, **own})
            self._subtasks[name] = get_task(name, sub)
        return self._subtasks[name]

    def directions(self) -> dict[str, dict[str, str]]:
        """Per sub-task, the metrics Δm averages and whether larger (``max``) or smaller (``min``) is better."""
        out = {}
        for t in self.tasks:
            sub = self.subtask(t)
            out[t] = dict(DELTA_METRICS.get(t) or {sub.primary_metric: sub.metric_direction})
        return out

    # ------------------------------------------------------------------ data
    def build_dataset(self, cfg: Mapping[str, Any], split: str) -> Dataset:
        """The joint dataset of ``data.type`` (synthetic, nyuv2, cityscapes) with the labels of ``mtl.tasks``."""
        tasks = list(mtl_section(cfg)["tasks"])
        data = cfg["data"]
        kwargs = dict(data.get("kwargs") or {})
        if data["type"] == "synthetic":
            train = split == data["train_split"]
            n = kwargs.get("num_train", 256) if train else kwargs.get("num_val", 32)
            return SyntheticScene(n, kwargs.get("size", [96, 128]), kwargs.get("seed", 0), split, tasks,
                                  kwargs.get("focal", 0.9), kwargs.get("drop"))
        if data["type"] == "nyuv2":
            return NYUv2(data["root"], split, tasks, kwargs.get("size", [288, 384]),
                         bool(kwargs.get("partial_labels", False)))
        return CityscapesMTL(data["root"], split, tasks, bool(kwargs.get("partial_labels", False)))

    def build_transform(self, cfg: Mapping[str, Any], train: bool) -> Callable[[dict], dict]:
        """Train: [scale-crop to ``data.crop_size``, depth divided by the zoom] -> [flip, negating ``n_x``] ->
        normalize; labels, depth and normals move by nearest resampling. Eval: normalize."""
        from densefuse_tasks.normals import RandomNormalFlip

        data = cfg["data"]
        norm = Normalize(data["mean"], data["std"])
        if not train:
            return norm
        aug = data["augment"]
        ops: list = [RandomDepthScaleCrop(data["crop_size"], aug["scale_range"], self.dense_keys, image_fill=data["mean"])]
        if aug["flip"]:
            ops.append(RandomNormalFlip(0.5, self.dense_keys))
        return Augment(ops, norm)

    # ------------------------------------------------------------------ model
    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        """:class:`MTLModel`; the task keeps its loss weighting (a submodule: trained and checkpointed with it)."""
        from densefuse.model import build_model

        model = build_model(cfg)
        self._weighting = model.loss_weighting
        return model

    def channels(self) -> dict[str, int]:
        return output_channels(self.tasks, int(self.cfg["model"]["num_classes"]))

    def split(self, outputs: Any) -> dict[str, Tensor]:
        """Each sub-task's share of the model output (or of a merged TTA output)."""
        out = unwrap_outputs(outputs)["out"]
        chans = self.channels()
        parts = torch.split(out, [chans[t] for t in self.tasks], dim=1)
        return dict(zip(self.tasks, parts))

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Any:
        """``model(image)``, the normals share normalized again (the bilinear resize shortens unit vectors)."""
        parts = self.split(model(batch["image"]))
        if "normals" in parts:
            parts["normals"] = F.normalize(parts["normals"], dim=1, eps=1e-6)
        return {"out": torch.cat([parts[t] for t in self.tasks], dim=1)}

    def merge_tta(self, outputs: Sequence[Any], flipped: Sequence[bool]) -> dict[str, Tensor]:
        """Each sub-task merges its share of the views its own way (seg: mean probability, depth: mean,
        normals: mirrored views' ``n_x`` negated, mean, renormalized)."""
        shares = [self.split(o) for o in outputs]
        merged = []
        for t in self.tasks:
            views = [{"out": s[t]} for s in shares]
            sub = self.subtask(t)
            got = sub.merge_tta(views, flipped)
            merged.append(unwrap_outputs(got)["out"])
        return {"out": torch.cat(merged, dim=1)}

    # ------------------------------------------------------------------ loss, metric, outputs
    def weighting(self) -> nn.Module:
        """The model's loss weighting (built with it), or a fresh one for a loss taken without the model."""
        if self._weighting is None:
            self._weighting = weighting_from(mtl_section(self.cfg), self.tasks)
        return self._weighting

    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """The weighting over each sub-task's own loss on the samples that have its label; a task no sample
        of the batch has a label for adds nothing. Logs ``loss_<task>``, ``weight_<task>`` and the sub-tasks'
        named parts as ``<task>/<part>``."""
        parts = self.split(outputs)
        losses: dict[str, Optional[Tensor]] = {}
        logs: dict[str, float] = {}
        for t in self.tasks:
            keep = has_valid(t, batch)
            if not bool(keep.any()):
                losses[t] = None
                continue
            loss, sub_logs = self.subtask(t).loss(_select({"out": parts[t]}, keep), _select(batch, keep))
            losses[t] = loss
            logs.update({f"{t}/{k}": float(v) for k, v in sub_logs.items()})
        if all(v is None for v in losses.values()):
            return unwrap_outputs(outputs)["out"].sum() * 0.0, logs
        total, weight_logs = self.weighting()(losses)
        return total, {**weight_logs, **logs}

    def metric(self, cfg: Mapping[str, Any]) -> MTLMetric:
        return MTLMetric(self, {t: self.subtask(t).metric(self.subtask(t).cfg) for t in self.tasks})

    def predict(self, outputs: Any) -> Tensor:
        """(B, C, H, W) float: per sub-task in ``mtl.tasks`` order its prediction (seg: the class id, one
        channel; depth: metres, one channel; normals: the unit normal, three channels)."""
        parts = self.split(outputs)
        preds = []
        for t in self.tasks:
            p = self.subtask(t).predict({"out": parts[t]}).float()
            preds.append(p[:, None] if p.ndim == 3 else p)
        return torch.cat(preds, dim=1)

    def split_prediction(self, prediction: Tensor) -> dict[str, Tensor]:
        """The sub-tasks' predictions in each one's own form (seg: int64 class map without channel dim)."""
        chans = [PREDICTION_CHANNELS[t] for t in self.tasks]
        parts = dict(zip(self.tasks, torch.split(prediction, chans, dim=-3)))
        if "seg" in parts:
            parts["seg"] = parts["seg"].squeeze(-3).round().long()
        return parts

    def visualize(self, batch: Mapping[str, Tensor], prediction: Tensor) -> Tensor:
        """Each sub-task's pictures (prediction above its ground truth), stacked in ``mtl.tasks`` order."""
        parts = self.split_prediction(prediction)
        return torch.cat([self.subtask(t).visualize(batch, parts[t]).cpu() for t in self.tasks], dim=-2)

    def save_prediction(self, prediction: Tensor, stem: Union[str, Path], image: Optional[Tensor] = None) -> list[Path]:
        """Each sub-task writes its own files into a subfolder named after it: ``seg/<name>.png``,
        ``depth/<name>.png``, ``normals/<name>.png`` ... (see each task's ``save_prediction``)."""
        stem = Path(stem)
        written: list[Path] = []
        for t, p in self.split_prediction(prediction).items():
            target = stem.parent / t / stem.name
            target.parent.mkdir(parents=True, exist_ok=True)
            written += self.subtask(t).save_prediction(p, target, image=image)
        return written

    # ------------------------------------------------------------------ densefuse compare
    def compare_members(self, cfg: CoreConfig) -> list[CoreConfig]:
        """What ``densefuse compare`` trains for this config: the multi-task model and, for each sub-task, its
        single-task baseline (the same config with ``mtl.tasks: [<task>]``: same encoder, head, data, seeds;
        its plain loss, ``mtl.weighting: equal``, as the multi-task papers' single-task baselines), named
        ``<name>-single_<task>``."""
        members = [cfg]
        for t in self.tasks:
            single = copy.deepcopy(cfg)
            section = single["mtl"]
            section["tasks"], section["weighting"] = [t], "equal"
            section["weights"] = section["uncertainty_kinds"] = None
            for key in ("heads", "sections"):
                if section.get(key):
                    section[key] = {k: v for k, v in section[key].items() if k == t} or None
            single["name"] = f"{cfg['name']}-single_{t}"
            members.append(single)
        return members

    def compare_tables(self, runs: pd.DataFrame, configs: Sequence[Mapping[str, Any]]) -> dict[str, pd.DataFrame]:
        """Δm of each multi-task config against its single-task baselines, paired by seed, per equalizer mode:
        ``delta_m`` (one row per mode and seed) and ``delta_m_summary`` (mean ± std over seeds per mode)."""
        from .delta import paired_delta_m

        by_name = {str(c["name"]): c for c in configs}
        tables: dict[str, list[pd.DataFrame]] = {"delta_m": [], "delta_m_summary": []}
        for name, cfg in by_name.items():
            tasks = list(mtl_section(cfg)["tasks"])
            if len(tasks) < 2:
                continue
            singles = {t: f"{name}-single_{t}" for t in tasks}
            if not all(s in by_name for s in singles.values()):
                continue
            directions = MTLTask(cfg).directions()
            rows = []
            for model, t, config in [("mtl", t, name) for t in tasks] + [("single", t, singles[t]) for t in tasks]:
                g = runs[runs["config"] == config]
                for _, r in g.iterrows():
                    for metric in directions[t]:
                        col = f"{t}/{metric}"
                        if col in r and pd.notna(r[col]):
                            rows.append({"mode": r["mode"], "seed": int(r["seed"]), "model": model, "task": t,
                                         "metric": metric, "value": float(r[col])})
            per_seed, summary = paired_delta_m(pd.DataFrame(rows), directions, by=["mode"])
            tables["delta_m"].append(per_seed.assign(config=name))
            tables["delta_m_summary"].append(summary.assign(config=name))
        return {k: pd.concat(v, ignore_index=True) for k, v in tables.items() if v}


__all__ = ["DATASET_CLASSES", "DELTA_METRICS", "MTLMetric", "MTLModel", "MTLTask", "RandomDepthScaleCrop",
           "has_valid"]
