"""ASPPHead and DepthwiseSeparableASPPHead (mmseg ``aspp_head.py``, ``sep_aspp_head.py``).

Concat 1 = ``[up(image_pool), aspp_d1, aspp_d12, aspp_d24, aspp_d36]``: only the image-pool branch is
upsampled (from 1x1, a constant map). DeepLabV3+ adds concat 2 = ``[up(aspp_out) x2, c1]`` whose fuse
block starts with a depthwise 3x3 conv, so folding scales the depthwise rows.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ..layers import ConvBNReLU, DepthwiseSeparableConv
from . import register_head
from .base import DecodeHead


@register_head("aspp")
class ASPPHead(DecodeHead):
    """Atrous spatial pyramid pooling (DeepLabV3). ``separable=True`` uses depthwise-separable
    dilated branches (the DeepLabV3+ variant)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        in_index: int = -1,
        channels: int = 512,
        dilations: Sequence[int] = (1, 12, 24, 36),
        separable: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, in_index, channels, num_classes, **kwargs)
        c = self.in_channels
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(c, channels, 1))
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(ConvBNReLU(c, channels, 1))
            elif separable:
                branches.append(DepthwiseSeparableConv(c, channels, 3, dilation=d))
            else:
                branches.append(ConvBNReLU(c, channels, 3, dilation=d))
        self.aspp_modules = nn.ModuleList(branches)
        self.bottleneck = self.make_fusion([channels] * (len(dilations) + 1))

    def aspp(self, x: Tensor) -> Tensor:
        parts = [self.image_pool(x)] + [m(x) for m in self.aspp_modules]
        return self.bottleneck(parts, size=x.shape[-2:])

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.cls_seg(self.aspp(self.select(feats)))


@register_head("sep_aspp")
class DepthwiseSeparableASPPHead(ASPPHead):
    """DeepLabV3+: separable ASPP at ``in_index``, then fusion with the stride-4 feature ``feats[0]``."""

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        c1_in_channels: int = 256,
        c1_channels: int = 48,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("separable", True)
        super().__init__(in_channels, num_classes, **kwargs)
        if c1_in_channels != in_channels[0]:
            raise ValueError(f"c1_in_channels={c1_in_channels} but the stride-4 feature has {in_channels[0]} channels")
        ch = self.channels
        self.c1_bottleneck = ConvBNReLU(c1_in_channels, c1_channels, 1)
        fuse = nn.Sequential(DepthwiseSeparableConv(ch + c1_channels, ch), DepthwiseSeparableConv(ch, ch))
        self.sep_bottleneck = self.make_fusion([ch, c1_channels], fuse=fuse)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        out = self.aspp(self.select(feats))
        c1 = self.c1_bottleneck(feats[0])
        return self.cls_seg(self.sep_bottleneck([out, c1], size=c1.shape[-2:]))
