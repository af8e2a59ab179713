"""UPerHead (mmseg ``uper_head.py``): PPM on the top level, FPN top-down adds, multi-level fusion.

Both concats go through :class:`Fusion`: concat A = ``[x, up(p1), up(p2), up(p3), up(p6)]`` into
``psp_fusion`` and concat B = ``[fpn0, up(fpn1) x2, up(fpn2) x4, up(psp_out) x8]`` into ``fpn_fusion``.
The top-down path stays a sum, as in mmseg.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from ..fusion import resize
from ..layers import PPM, ConvNormAct
from ..registry import HEADS
from .base import DecodeHead


@HEADS.register("uper")
class UPerHead(DecodeHead):
    """Unified Perceptual Parsing decoder with scale-equalized fusion at both concat sites.

    Upsampled branches (for ``branch``): the PPM branches, ``fpn_convs[1:]`` and the PPM fusion's
    output. With a post-upsample norm, ``psp_fusion``'s fuse block is Conv(bias)-ReLU, the top-down
    path adds that un-normalized map, and ``fpn_post_norms[-1]`` normalizes it after its x8 upsample.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_index: Sequence[int] = (0, 1, 2, 3),
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, list(in_index), channels, **kwargs)
        chans = self.in_channels
        n = len(chans)
        self.psp_modules = PPM(pool_scales, chans[-1], channels, norm=self.branch_norm())
        psp_fuse = None if self.post_norm is None else ConvNormAct(chans[-1] + channels * len(pool_scales), channels,
                                                                    3, norm=None)
        self.psp_fusion = self.make_fusion([chans[-1]] + [channels] * len(pool_scales), fuse=psp_fuse)
        self.lateral_convs = nn.ModuleList(ConvNormAct(c, channels, 1) for c in chans[:-1])
        self.fpn_convs = nn.ModuleList(
            ConvNormAct(channels, channels, 3, norm="bn" if i == 0 else self.branch_norm()) for i in range(n - 1)
        )
        self.fpn_fusion = self.make_fusion([channels] * n)
        self.psp_post_norms = self.post_norms(len(pool_scales), channels)
        self.fpn_post_norms = self.post_norms(n - 1, channels)

    @classmethod
    def min_batch_size(cls, spec: Mapping[str, Any]) -> tuple[int, str]:
        return cls._pooled_bn(spec, "pool-scale-1 branch") if 1 in spec.get("pool_scales", (1, 2, 3, 6)) else (1, "")

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        inputs = self.select(feats)
        top = inputs[-1]
        size = top.shape[-2:]
        pooled = self.psp_modules(top)
        if self.psp_post_norms is not None:
            pooled = [self.up_norm(p, size, norm) for p, norm in zip(pooled, self.psp_post_norms)]
        psp_out = self.psp_fusion([top, *pooled], size=size)
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])] + [psp_out]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:], self.align_corners)
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        if self.fpn_post_norms is not None:
            outs = [outs[0]] + [self.up_norm(o, size, norm) for o, norm in zip(outs[1:], self.fpn_post_norms)]
        return self.fpn_fusion(outs, size=size)
