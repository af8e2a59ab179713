"""GEDepth's decoder pieces: the DenseDepth decoder (4 scale-equalized up-fusions) and the
ground-attention / ground-slope heads (per-level conv, upsample, sum)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from densefuse.fusion import Fusion


def conv_lrelu_block(in_channels: int, out_channels: int, negative_slope: float = 0.01) -> nn.Sequential:
    """Conv3x3-LeakyReLU-Conv3x3-LeakyReLU with bias and no norm (GEDepth's ``UpSample`` convA/convB).
    Without a norm after the first conv, :func:`densefuse.fold` puts the mean term into its bias."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=True),
        nn.LeakyReLU(negative_slope),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=True),
        nn.LeakyReLU(negative_slope),
    )


class DenseDepthHead(nn.Module):
    """DenseDepth decoder: 1x1 conv on the deepest level, then one up-fusion per shallower level,
    ``Conv-LReLU-Conv-LReLU(cat[UP(x), skip])`` (bilinear, align_corners=True), each a scale-equalized
    :class:`~densefuse.Fusion`, and a 3x3 conv + ReLU to the residual depth ``R`` at the resolution of
    the shallowest level (1/2 of the input).

    Args:
        in_channels: encoder channels, shallowest (stride 2) first.
        widths: output channels of the bottleneck and of every up-fusion (same order); ``None`` follows
            the encoder, as GEDepth does.
        mode, eps: equalizer settings of the fusion sites.
    """

    def __init__(self, in_channels: Sequence[int], widths: Optional[Sequence[int]] = None, mode: str = "explicit",
                 eps: float = 1e-5, negative_slope: float = 0.01) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        widths = [int(c) for c in (widths or in_channels)]
        if len(widths) != len(in_channels):
            raise ValueError(f"widths has {len(widths)} entries but the encoder gives {len(in_channels)} levels")
        self.in_channels, self.widths, self.negative_slope = in_channels, widths, float(negative_slope)
        self.bottleneck = nn.Conv2d(in_channels[-1], widths[-1], 1)
        self.fusions = nn.ModuleList()
        prev = widths[-1]
        for i in reversed(range(len(in_channels) - 1)):
            block = conv_lrelu_block(prev + in_channels[i], widths[i], negative_slope)
            self.fusions.append(Fusion([prev, in_channels[i]], fuse=block, align_corners=True, mode=mode, eps=eps))
            prev = widths[i]
        self.conv_depth = nn.Conv2d(widths[0], 1, 3, padding=1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = self.bottleneck(feats[-1])
        for fusion, skip in zip(self.fusions, reversed(feats[:-1])):
            x = fusion([x, skip], size=skip.shape[-2:])
        return F.relu(self.conv_depth(x))


class LevelSumHead(nn.Module):
    """GEDepth's ground-attention (and ground-slope) neck: per level a 3x3 conv to ``channels``,
    bilinear (align_corners=True) upsampling to the shallowest level's size, a sum, and a 3x3 conv to
    ``out_channels`` (1 for the attention logit, 11 for the slope classes). Sums, not concats: no
    equalizer here."""

    def __init__(self, in_channels: Sequence[int], channels: int = 64, out_channels: int = 1) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(int(c), channels, 3, padding=1) for c in in_channels)
        self.out = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        total: Optional[Tensor] = None
        for conv, f in zip(self.lateral, feats):
            y = conv(f)
            if y.shape[-2:] != size:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
            total = y if total is None else total + y
        assert total is not None
        return self.out(total)
