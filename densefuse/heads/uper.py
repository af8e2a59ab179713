"""UPerHead (mmseg ``uper_head.py``): PPM on the top level, FPN top-down adds, multi-level fusion.

Both concats go through :class:`Fusion`: concat A = ``[x, up(p1), up(p2), up(p3), up(p6)]`` into
``bottleneck`` and concat B = ``[fpn0, up(fpn1) x2, up(fpn2) x4, up(fpn3) x8]`` into
``fpn_bottleneck``. The top-down path stays a sum, as in mmseg.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ..fusion import resize
from ..layers import ConvBNReLU
from . import register_head
from .base import DecodeHead


class PPM(nn.ModuleList):
    """Pyramid pooling branches: AdaptiveAvgPool2d(s) -> 1x1 ConvBNReLU, one per pool scale."""

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int) -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvBNReLU(in_channels, channels, 1)) for s in pool_scales
        )

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return [branch(x) for branch in self]


@register_head("uper")
class UPerHead(DecodeHead):
    """Unified Perceptual Parsing head with scale-equalized fusion at both concat sites."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        in_index: Sequence[int] = (0, 1, 2, 3),
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, list(in_index), channels, num_classes, **kwargs)
        chans = self.in_channels
        self.psp_modules = PPM(pool_scales, chans[-1], channels)
        self.psp_fusion = self.make_fusion([chans[-1]] + [channels] * len(pool_scales))
        self.lateral_convs = nn.ModuleList(ConvBNReLU(c, channels, 1) for c in chans[:-1])
        self.fpn_convs = nn.ModuleList(ConvBNReLU(channels, channels, 3) for _ in chans[:-1])
        self.fpn_fusion = self.make_fusion([channels] * len(chans))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        inputs = self.select(feats)
        top = inputs[-1]
        psp_out = self.psp_fusion([top, *self.psp_modules(top)], size=top.shape[-2:])
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])] + [psp_out]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        fused = self.fpn_fusion(outs, size=outs[0].shape[-2:])
        return self.cls_seg(fused)
