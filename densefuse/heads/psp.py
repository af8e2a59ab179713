"""PSPHead (mmseg ``psp_head.py``): pyramid pooling on one level, fused with the level itself."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor

from ..layers import PPM
from ..registry import HEADS
from .base import DecodeHead


@HEADS.register("psp")
class PSPHead(DecodeHead):
    """Concat ``[x, up(p1), up(p2), up(p3), up(p6)]`` -> 3x3 ``bottleneck`` (a :class:`Fusion`).

    Upsampled branches (for ``branch``): the pooled ones.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_index: int = -1,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, in_index, channels, **kwargs)
        self.psp_modules = PPM(pool_scales, self.in_channels, channels, norm=self.branch_norm())
        self.bottleneck = self.make_fusion([self.in_channels] + [channels] * len(pool_scales))
        self.psp_post_norms = self.post_norms(len(pool_scales), channels)

    @classmethod
    def min_batch_size(cls, spec: Mapping[str, Any]) -> tuple[int, str]:
        return cls._pooled_bn(spec, "pool-scale-1 branch") if 1 in spec.get("pool_scales", (1, 2, 3, 6)) else (1, "")

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = self.select(feats)
        size = x.shape[-2:]
        pooled = self.psp_modules(x)
        if self.psp_post_norms is not None:
            pooled = [self.up_norm(p, size, norm) for p, norm in zip(pooled, self.psp_post_norms)]
        return self.bottleneck([x, *pooled], size=size)
