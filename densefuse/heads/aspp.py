"""ASPPHead and DepthwiseSeparableASPPHead (mmseg ``aspp_head.py``, ``sep_aspp_head.py``).

Concat 1 = ``[up(image_pool), aspp_d1, aspp_d12, aspp_d24, aspp_d36]``: only the image-pool branch is
upsampled (from 1x1, a constant map). DeepLabV3+ adds concat 2 = ``[up(aspp_out) x2, c1]`` whose fuse
block starts with a depthwise 3x3 conv, so folding scales the depthwise rows.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import ConvNormAct, DepthwiseSeparableConv
from ..registry import HEADS
from .base import DecodeHead


@HEADS.register("aspp")
class ASPPHead(DecodeHead):
    """Atrous spatial pyramid pooling (DeepLabV3). ``separable=True`` uses depthwise-separable
    dilated branches (the DeepLabV3+ variant). Upsampled branch (for ``branch``): the image pool."""

    #: whether the ASPP output is upsampled into a later fusion (DeepLabV3+), so follows ``branch`` too
    output_upsampled = False

    def __init__(
        self,
        in_channels: Sequence[int],
        in_index: int = -1,
        channels: int = 512,
        dilations: Sequence[int] = (1, 12, 24, 36),
        separable: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, in_index, channels, **kwargs)
        c = self.in_channels
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), self.branch_conv(c, channels, 1))
        branches = []
        for d in dilations:
            if d == 1:
                branches.append(ConvNormAct(c, channels, 1))
            elif separable:
                branches.append(DepthwiseSeparableConv(c, channels, 3, dilation=d))
            else:
                branches.append(ConvNormAct(c, channels, 3, dilation=d))
        self.aspp_modules = nn.ModuleList(branches)
        n_in = channels * (len(dilations) + 1)
        fuse = ConvNormAct(n_in, channels, 3, norm=None) if self.output_upsampled and self.post_norm else None
        self.bottleneck = self.make_fusion([channels] * (len(dilations) + 1), fuse=fuse)
        self.image_pool_post_norm = None if self.post_norm is None else self.post_norms(1, channels)[0]

    @classmethod
    def min_batch_size(cls, spec: Mapping[str, Any]) -> tuple[int, str]:
        return cls._pooled_bn(spec, "image-pool branch")

    def aspp(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        pool = self.up_norm(self.image_pool(x), size, self.image_pool_post_norm)
        parts = [pool] + [m(x) for m in self.aspp_modules]
        return self.bottleneck(parts, size=size)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        return self.aspp(self.select(feats))


@HEADS.register("sep_aspp")
class DepthwiseSeparableASPPHead(ASPPHead):
    """DeepLabV3+: separable ASPP at ``in_index``, then fusion with the stride-4 feature ``feats[0]``
    (``c1_in_channels`` defaults to that feature's channels).

    Upsampled branches (for ``branch``): the image pool and the ASPP output (x2 into ``sep_bottleneck``).
    """

    output_upsampled = True

    def __init__(
        self,
        in_channels: Sequence[int],
        c1_in_channels: Optional[int] = None,
        c1_channels: int = 48,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("separable", True)
        super().__init__(in_channels, **kwargs)
        if c1_in_channels is None:
            c1_in_channels = in_channels[0]
        elif c1_in_channels != in_channels[0]:
            raise ConfigError(f"model.decode_head.c1_in_channels is {c1_in_channels} but the stride-4 feature has "
                              f"{in_channels[0]} channels: set it to {in_channels[0]} or remove it")
        ch = self.channels
        self.c1_bottleneck = ConvNormAct(c1_in_channels, c1_channels, 1)
        fuse = nn.Sequential(DepthwiseSeparableConv(ch + c1_channels, ch), DepthwiseSeparableConv(ch, ch))
        self.sep_bottleneck = self.make_fusion([ch, c1_channels], fuse=fuse)
        self.aspp_post_norm = None if self.post_norm is None else self.post_norms(1, ch)[0]

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        out = self.aspp(self.select(feats))
        c1 = self.c1_bottleneck(feats[0])
        out = self.up_norm(out, c1.shape[-2:], self.aspp_post_norm)
        return self.sep_bottleneck([out, c1], size=c1.shape[-2:])
