"""What every decode head shares: input selection and the classifier."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from torch import Tensor, nn

from ..fusion import Fusion
from ..layers import ClsSeg


class DecodeHead(nn.Module):
    """Selects ``in_index`` from the encoder features and ends in ``cls_seg`` (Dropout2d + 1x1 conv).

    ``num_classes`` is the number of output channels (classes for seg, bins or 1 for depth).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        in_index: Union[int, Sequence[int]],
        channels: int,
        num_classes: int,
        dropout: float = 0.1,
        align_corners: bool = False,
        eq_mode: str = "explicit",
        eq_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_index = in_index
        multi = not isinstance(in_index, int)
        self.in_channels = [in_channels[i] for i in in_index] if multi else in_channels[in_index]
        self.channels = channels
        self.align_corners = align_corners
        self._fusion_kwargs = {"mode": eq_mode, "eps": eq_eps, "align_corners": align_corners}
        self.cls_seg = ClsSeg(channels, num_classes, dropout)

    def make_fusion(self, in_channels: Sequence[int], kernel_size: int = 3, fuse: Optional[nn.Module] = None) -> Fusion:
        """A :class:`Fusion` of ``in_channels`` into ``self.channels`` with this head's equalizer settings."""
        return Fusion(in_channels, self.channels, fuse=fuse, kernel_size=kernel_size, **self._fusion_kwargs)

    def select(self, feats: Sequence[Tensor]) -> Union[Tensor, list[Tensor]]:
        if isinstance(self.in_index, int):
            return feats[self.in_index]
        return [feats[i] for i in self.in_index]
