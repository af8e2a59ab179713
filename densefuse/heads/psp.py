"""PSPHead (mmseg ``psp_head.py``): pyramid pooling on one level, fused with the level itself."""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from . import register_head
from .base import DecodeHead
from .uper import PPM


@register_head("psp")
class PSPHead(DecodeHead):
    """Concat ``[x, up(p1), up(p2), up(p3), up(p6)]`` -> 3x3 ``bottleneck`` (a :class:`Fusion`) -> ``cls_seg``."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        in_index: int = -1,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, in_index, channels, num_classes, **kwargs)
        self.psp_modules = PPM(pool_scales, self.in_channels, channels)
        self.bottleneck = self.make_fusion([self.in_channels] + [channels] * len(pool_scales))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = self.select(feats)
        return self.cls_seg(self.bottleneck([x, *self.psp_modules(x)], size=x.shape[-2:]))
