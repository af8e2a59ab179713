"""FCNHead (mmseg ``fcn_head.py``): convs on one level; with ``concat_input`` a Fusion of [x, convs(x)]."""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ..errors import ConfigError
from ..layers import ConvNormAct
from ..registry import HEADS
from .base import DecodeHead


@HEADS.register("fcn")
class FCNHead(DecodeHead):
    """``num_convs`` 3x3 ConvNormAct on ``inputs[in_index]``.

    With ``concat_input=True`` the input and the conv output are concatenated (no upsampling:
    the paper's control case, so ``branch`` changes nothing here) through a :class:`Fusion` into
    ``conv_cat``. The standard auxiliary head is ``FCNHead(in_index=2, channels=256, num_convs=1,
    concat_input=False)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_index: int = -1,
        channels: int = 512,
        num_convs: int = 2,
        kernel_size: int = 3,
        dilation: int = 1,
        concat_input: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(in_channels, in_index, channels, **kwargs)
        c_in = self.in_channels
        convs = [ConvNormAct(c_in if i == 0 else channels, channels, kernel_size, dilation=dilation)
                 for i in range(num_convs)]
        self.convs = nn.Sequential(*convs) if convs else nn.Identity()
        if num_convs == 0 and c_in != channels:
            raise ConfigError(f"FCNHead with num_convs=0 needs channels == its input's channels ({c_in}), "
                              f"got channels={channels}")
        self.conv_cat = self.make_fusion([c_in, channels], kernel_size) if concat_input else None

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = self.select(feats)
        out = self.convs(x)
        if self.conv_cat is not None:
            out = self.conv_cat([x, out])
        return out
