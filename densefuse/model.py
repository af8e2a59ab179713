"""Encoder + decode head (+ auxiliary head) as one module, built from a config."""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .config import check_kwargs
from .encoders import TimmEncoder
from .errors import ConfigError, did_you_mean
from .heads import HEADS


class EncoderDecoder(nn.Module):
    """``encoder -> decode_head`` (and ``auxiliary_head`` in training).

    ``forward(x)`` returns ``{"out": logits}`` resized (bilinear) to the input size, plus ``"aux"``
    in train mode when there is an auxiliary head. The task's loss weights ``"aux"`` by
    ``model.auxiliary_head.loss_weight`` from the config.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decode_head: nn.Module,
        auxiliary_head: Optional[nn.Module] = None,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.encoder(x)
        size = x.shape[-2:]
        out = {"out": self._up(self.decode_head(feats), size)}
        if self.training and self.auxiliary_head is not None:
            out["aux"] = self._up(self.auxiliary_head(feats), size)
        return out

    def _up(self, y: Tensor, size: Any) -> Tensor:
        return F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners)


def _build_head(spec: Mapping[str, Any], section: str, in_channels: list[int], num_classes: int, common: dict) -> nn.Module:
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind not in HEADS:
        raise ConfigError(f"unknown head type '{section}.type: {kind}'{did_you_mean(str(kind), HEADS)}; "
                          f"available: {', '.join(sorted(HEADS))}")
    cls = HEADS[kind]
    accepted = _accepted_kwargs(cls) - {"in_channels", "num_classes", "align_corners", "eq_mode", "eq_eps"}
    check_kwargs(section, spec, accepted)
    return cls(in_channels=in_channels, num_classes=num_classes, **common, **spec)


def _accepted_kwargs(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        if "__init__" in vars(klass):
            names |= {p for p in inspect.signature(klass.__init__).parameters if p not in ("self", "args", "kwargs")}
    return names


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the model described by ``cfg.model``.

    ``model.type: encoder_decoder`` (timm encoder + densefuse heads) or ``smp`` (a
    segmentation_models_pytorch model with equalizers attached by :func:`densefuse.smp.equalize`).
    """
    m = cfg["model"]
    eq = m.get("equalizer") or {}
    if m["type"] == "smp":
        from .smp import build_smp_model

        return build_smp_model(cfg)
    if m["type"] != "encoder_decoder":
        raise ConfigError(f"unknown model.type '{m['type']}' (use encoder_decoder or smp)")
    enc = dict(m["encoder"])
    kwargs = dict(enc.pop("kwargs", None) or {})
    check_kwargs("model.encoder", enc, ["name", "out_indices", "output_stride", "pretrained"])
    encoder = TimmEncoder(enc["name"], enc.get("out_indices", (1, 2, 3, 4)), enc.get("output_stride"),
                          enc.get("pretrained"), **kwargs)
    common = {"align_corners": m["align_corners"], "eq_mode": eq.get("mode", "explicit"), "eq_eps": eq.get("eps", 1e-5)}
    decode_head = _build_head(m["decode_head"], "model.decode_head", encoder.channels, m["num_classes"], common)
    aux = None
    if m.get("auxiliary_head"):
        spec = dict(m["auxiliary_head"])
        spec.pop("loss_weight", None)  # read by the task's loss
        aux = _build_head(spec, "model.auxiliary_head", encoder.channels, m["num_classes"], common)
    return EncoderDecoder(encoder, decode_head, aux, m["align_corners"])
