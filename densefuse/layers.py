"""Small shared blocks (mmcv ConvModule semantics: conv without bias when a norm follows)."""
from __future__ import annotations

from typing import Optional

from torch import nn


def make_norm(kind: Optional[str], channels: int) -> nn.Module:
    """``"bn"`` (BatchNorm2d; converted to SyncBatchNorm under DDP), ``"gn"`` (32 groups), ``"ln"``
    (GroupNorm with one group = LayerNorm over C,H,W) or ``None``."""
    if kind is None:
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"unknown norm '{kind}' (use bn, gn, ln or None)")


class ConvBNReLU(nn.Sequential):
    """Conv2d -> norm -> ReLU, Kaiming-normal (fan_out) init like mmcv's ConvModule.

    Submodules are named ``conv``, ``bn``, ``act`` so name-based weight-decay rules match mmseg's.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm: Optional[str] = "bn",
        act: bool = True,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=norm is None
        )
        self.bn = make_norm(norm, out_channels)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise k x k ConvBNReLU then pointwise 1x1 ConvBNReLU (mmcv DepthwiseSeparableConvModule)."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1, norm: Optional[str] = "bn"
    ) -> None:
        super().__init__()
        self.depthwise = ConvBNReLU(in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels, norm=norm)
        self.pointwise = ConvBNReLU(in_channels, out_channels, 1, norm=norm)


class ClsSeg(nn.Sequential):
    """Dropout2d (channel dropout) + 1x1 classifier, init Normal(0, 0.01) like mmseg's ``cls_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
