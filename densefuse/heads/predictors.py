"""Predictors: turn a decoder's feature map into the task output (here: segmentation logits).

Registered in :data:`densefuse.registry.PREDICTORS` and chosen by ``model.decode_head.predictor``.
A task with another output (depth regression) registers its own predictor from its package.
"""
from __future__ import annotations

from torch import nn

from ..layers import SampleDropout2d
from ..registry import PREDICTORS


@PREDICTORS.register("cls_seg")
class ClsSeg(nn.Sequential):
    """Dropout2d (channel dropout, one mask per sample from its seed: :class:`~densefuse.layers.SampleDropout2d`) + 1x1 classifier, init Normal(0, 0.01) like mmseg's ``cls_seg``."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = SampleDropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(in_channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)
