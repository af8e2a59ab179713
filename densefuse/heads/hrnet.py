"""HRNet-style head (HRNet's segmentation head, the multi-task baselines' per-task head): every level
bilinearly upsampled to the finest, concatenated through :class:`Fusion`, then a 1x1 Conv-BN-ReLU.

The multi-task codebases (MTI-Net, LibMTL, InvPT) run this head on each task's share of the encoder
features; there the concat of upsampled levels is unequalized. Here it goes through a :class:`Fusion`,
so calibration puts every level at mean 0 / variance 1 where it enters the 1x1 conv.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from torch import Tensor

from ..layers import ConvNormAct
from ..registry import HEADS
from .base import DecodeHead


@HEADS.register("hrnet")
class HRNetHead(DecodeHead):
    """``ConvBNReLU_1x1(cat[UP(x_0), ..., UP(x_n)])`` at the resolution of the finest selected level.

    ``channels=None`` keeps the concat's width (``sum(in_channels)``), as HRNet's own ``last_layer`` does.
    The branches are the encoder's levels themselves (no conv before the upsample), so the post-upsample
    norm pipelines of ``branch`` do not apply: only the default is accepted.
    """

    arg_choices = {"branch": ("conv_bn_relu_up",)}

    def __init__(
        self,
        in_channels: Sequence[int],
        in_index: Sequence[int] = (0, 1, 2, 3),
        channels: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        index = list(in_index)
        width = sum(in_channels[i] for i in index) if channels is None else int(channels)
        super().__init__(in_channels, index, width, **kwargs)
        if self.post_norm is not None:
            raise ValueError("HRNetHead upsamples the encoder levels themselves; branch must be conv_bn_relu_up")
        chans = list(self.in_channels)
        self.fusion = self.make_fusion(chans, fuse=ConvNormAct(sum(chans), width, 1))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        inputs = self.select(feats)
        return self.fusion(inputs, size=inputs[0].shape[-2:])
