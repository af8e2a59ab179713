"""``Fusion``: resize -> equalize -> concat -> fuse. The one place multi-level fusion happens.

``valid_pixels`` / ``valid_positions`` (which positions count in the statistics) live with the
equalizer that keeps the statistics and are re-exported here."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .equalizer import FoldTarget, ScaleEqualizer, find_fold_target, on_valid, valid_pixels, valid_positions
from .errors import CalibrationError
from .layers import ConvBNReLU

__all__ = ["Fusion", "resize", "valid_pixels", "valid_positions"]


def resize(x: Tensor, size: Sequence[int], align_corners: bool = False) -> Tensor:
    """Bilinear resize to ``size``; identity when the size already matches."""
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


class Fusion(nn.Module):
    """Multi-level fusion with a scale equalizer on every branch.

    While calibrating, only positions on real pixels are counted when the batch says which are real
    (see :func:`valid_pixels`).

    ``forward(feats, size)`` resizes each branch to ``size`` (bilinear), equalizes it, concatenates
    along channels and runs ``fuse``. In ``explicit`` mode the equalizer runs on the *pre-upsample*
    tensor: bilinear weights sum to 1, so ``UP((x - mu) / s) == (UP(x) - mu) / s`` exactly while the
    affine touches r^2 fewer elements. The statistics are still those of the upsampled tensor.

    Args:
        in_channels: channels of every branch, in concat order.
        out_channels: output channels of the default fuse block (ConvBNReLU, ``kernel_size``).
        fuse: a custom fuse block; its first Conv2d is the one :func:`densefuse.fold` rescales (found
            when fold runs, so replacing modules inside ``fuse`` before folding is fine). The mean term
            goes into that conv's bias, or into the BatchNorm right after it.
        align_corners: passed to the bilinear resize.
        mode, eps: equalizer settings (see :class:`ScaleEqualizer`).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: Optional[int] = None,
        fuse: Optional[nn.Module] = None,
        kernel_size: int = 3,
        align_corners: bool = False,
        mode: str = "explicit",
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_channels = tuple(int(c) for c in in_channels)
        if fuse is None:
            if out_channels is None:
                raise ValueError("Fusion needs out_channels or a fuse module")
            fuse = ConvBNReLU(sum(self.in_channels), out_channels, kernel_size)
        self.align_corners = align_corners
        self.equalizer = ScaleEqualizer(self.in_channels, mode=mode, eps=eps)
        self.fuse = fuse

    @property
    def slices(self) -> list[slice]:
        """Channel slice of every branch in the concat."""
        return self.equalizer.slices

    def concat(self, feats: Sequence[Tensor], size: Optional[Sequence[int]] = None) -> Tensor:
        """The equalized concat that enters the fuse block."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"Fusion expects {len(self.in_channels)} branches, got {len(feats)}")
        size = tuple(size) if size is not None else tuple(feats[0].shape[-2:])
        eq = self.equalizer
        if eq.recording:
            return eq.mark(torch.cat([self._recorded(i, x, size) for i, x in enumerate(feats)], dim=1))
        return torch.cat([resize(eq.branch(i, x), size, self.align_corners) for i, x in enumerate(feats)], dim=1)

    def _recorded(self, index: int, x: Tensor, size: tuple[int, ...]) -> Tensor:
        """Branch ``index`` while calibrating (observe, pass through) or measuring (observe the
        resized input and what really enters the fuse block)."""
        eq = self.equalizer
        up = resize(x, size, self.align_corners)
        eq.observe(index, on_valid(up), (size[0] / x.shape[-2], size[1] / x.shape[-1]))
        if eq.observing:
            return up
        y = resize(eq.branch(index, x), size, self.align_corners)
        eq.observe_after(index, on_valid(y))
        return y

    def fold_target(self) -> FoldTarget:
        """The first conv of ``fuse`` (and the BatchNorm right after it), looked up now."""
        target = find_fold_target(self.fuse)
        if target is None:
            raise CalibrationError(f"the fuse block ({type(self.fuse).__name__}) of this Fusion has no Conv2d to fold into")
        return target

    def forward(self, feats: Sequence[Tensor], size: Optional[Sequence[int]] = None) -> Tensor:
        return self.fuse(self.concat(feats, size))
