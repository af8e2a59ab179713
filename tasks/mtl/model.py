"""The multi-task model: one timm encoder shared by every task, one decoder + predictor per task.

Every decoder is a registered head (``hrnet``, ``uper``, ``aspp``, ...) and fuses through
:class:`densefuse.fusion.Fusion`, so one :func:`densefuse.calibrate` call reaches every site of every
decoder (the sites of all decoders are traced together, in dependency order). The loss weighting is a
submodule: its learned log-variances are trained with the model and, like DWA's history, saved and restored
with the model's state dict, so a resumed run continues exactly.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densefuse.encoders import TimmEncoder
from densefuse.model import build_head
from densefuse.registry import MODELS, PREDICTORS

from .. import normals as _normals  # noqa: F401  (registers the ``normals`` predictor)
from .config import head_spec, mtl_section, subtask_section, weighting_from
from .weighting import LossWeighting


@PREDICTORS.register("depth")
class DepthPredictor(nn.Module):
    """1x1 conv to one channel, then ``min_depth + softplus``: positive depth in metres from any decoder."""

    def __init__(self, in_channels: int, min_depth: float = 1e-3) -> None:
        super().__init__()
        self.conv_depth = nn.Conv2d(in_channels, 1, 1)
        self.min_depth = float(min_depth)

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(self.conv_depth(x)) + self.min_depth


class MTLModel(nn.Module):
    """``encoder -> {task: predictor(decoder(features))}``; ``forward`` returns ``{"out": cat[...]}``, every
    task's output resized to the input and concatenated along channels in ``tasks`` order (``channels`` gives
    each task's share). One tensor keeps whole/slide inference and flip/multi-scale TTA of the core working
    unchanged; the task splits it again."""

    def __init__(self, encoder: nn.Module, decoders: Mapping[str, nn.Module], predictors: Mapping[str, nn.Module],
                 channels: Mapping[str, int], weighting: LossWeighting, align_corners: bool = False) -> None:
        super().__init__()
        self.tasks = list(decoders)
        self.encoder = encoder
        self.decoders = nn.ModuleDict(decoders)
        self.predictors = nn.ModuleDict(predictors)
        self.channels = dict(channels)
        self.loss_weighting = weighting
        self.align_corners = align_corners

    def task_outputs(self, x: Tensor) -> dict[str, Tensor]:
        """Each task's output at the input size."""
        feats = self.encoder(x)
        size = x.shape[-2:]
        return {t: F.interpolate(self.predictors[t](self.decoders[t](feats)), size=size, mode="bilinear",
                                 align_corners=self.align_corners) for t in self.tasks}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outs = self.task_outputs(x)
        return {"out": torch.cat([outs[t] for t in self.tasks], dim=1)}


def output_channels(tasks: Sequence[str], num_classes: int) -> dict[str, int]:
    """Channels of each task's share of the model output: seg its classes, depth 1, normals 3."""
    per = {"seg": int(num_classes), "depth": 1, "normals": 3}
    return {t: per[t] for t in tasks}


@MODELS.register("mtl")
def build_mtl_model(cfg: Mapping[str, Any]) -> MTLModel:
    """The multi-task model of a resolved config: ``model.encoder``, ``model.equalizer``, ``mtl.heads`` and the
    weighting of ``mtl.weighting``; registered as ``model.type: mtl``."""
    from densefuse.config import check_kwargs

    m = cfg["model"]
    section = mtl_section(cfg)
    tasks = list(section["tasks"])
    enc = dict(m["encoder"])
    kwargs = dict(enc.pop("kwargs", None) or {})
    check_kwargs("model.encoder", enc, ["name", "out_indices", "output_stride", "pretrained"])
    encoder = TimmEncoder(enc["name"], enc.get("out_indices"), enc.get("output_stride"), enc.get("pretrained"),
                          **kwargs)
    eq = m.get("equalizer") or {}
    common = {"align_corners": m["align_corners"], "eq_mode": eq.get("mode", "explicit"), "eq_eps": eq.get("eps", 1e-5)}
    decoders, predictors = {}, {}
    for t in tasks:
        spec = head_spec(section, t)
        if t == "depth" and spec["predictor"] == "depth" and "min_depth" not in spec:
            spec["min_depth"] = float(subtask_section(section, "depth")["min_depth"])
        decoders[t], predictors[t] = build_head(spec, f"mtl.heads.{t}", encoder.channels, m["num_classes"], common)
    return MTLModel(encoder, decoders, predictors, output_channels(tasks, m["num_classes"]),
                    weighting_from(section, tasks), m["align_corners"])
