"""What every decoder shares: input selection, Fusion settings and the Table 4 branch pipelines.

A decoder returns its fused feature map (``out_channels`` channels at the resolution of its finest
input); a predictor (see :mod:`densefuse.heads.predictors`) turns it into the task's output.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from ..fusion import Fusion, resize
from ..layers import ConvNormAct, make_norm

#: ``model.decode_head.branch``: the pipeline of every branch that is upsampled before a fusion.
#: The value is the norm applied *after* the upsample (None: the norm stays inside the conv block).
BRANCHES: dict[str, Optional[str]] = {
    "conv_bn_relu_up": None,  # Conv-BN-ReLU-UP (mmseg; the scale equalizer's setting)
    "conv_relu_up_bn": "bn",  # Conv-ReLU-UP-BN (paper Table 4)
    "conv_relu_up_gn": "gn",  # Conv-ReLU-UP-GN
    "conv_relu_up_ln": "ln",  # Conv-ReLU-UP-LN
}


class DecodeHead(nn.Module):
    """Selects ``in_index`` from the encoder features; builds Fusions and upsampled branches.

    ``branch`` picks the pipeline of branches that are upsampled before a fusion (see :data:`BRANCHES`):
    with a post-upsample norm, the branch's conv block is Conv(bias)-ReLU and the head resizes the
    branch to the fusion size and normalizes it *before* handing it to its :class:`Fusion` (whose own
    resize is then the identity, and whose report shows ratio 1 for that branch).
    """

    #: allowed values of some arguments, checked when the config is loaded
    arg_choices: dict[str, tuple[str, ...]] = {"branch": tuple(BRANCHES)}

    def __init__(
        self,
        in_channels: Sequence[int],
        in_index: Union[int, Sequence[int]],
        channels: int,
        align_corners: bool = False,
        eq_mode: str = "explicit",
        eq_eps: float = 1e-5,
        branch: str = "conv_bn_relu_up",
    ) -> None:
        super().__init__()
        if branch not in BRANCHES:
            raise ValueError(f"unknown branch pipeline '{branch}' (use {', '.join(BRANCHES)})")
        self.in_index = in_index
        multi = not isinstance(in_index, int)
        self.in_channels = [in_channels[i] for i in in_index] if multi else in_channels[in_index]
        self.channels = channels
        self.align_corners = align_corners
        self.branch = branch
        self.post_norm = BRANCHES[branch]
        self._fusion_kwargs = {"mode": eq_mode, "eps": eq_eps, "align_corners": align_corners}

    @classmethod
    def min_batch_size(cls, spec: Mapping[str, Any]) -> tuple[int, str]:
        """Smallest training batch the head built from ``spec`` can take, and why (checked at load time)."""
        return 1, ""

    @staticmethod
    def _pooled_bn(spec: Mapping[str, Any], what: str) -> tuple[int, str]:
        if spec.get("branch", "conv_bn_relu_up") == "conv_bn_relu_up":
            return 2, f"its {what} batch-normalizes a 1x1 map, which needs 2 or more values per channel"
        return 1, ""

    @property
    def out_channels(self) -> int:
        """Channels of the feature map :meth:`forward` returns (what the predictor takes)."""
        return self.channels

    def make_fusion(self, in_channels: Sequence[int], kernel_size: int = 3, fuse: Optional[nn.Module] = None) -> Fusion:
        """A :class:`Fusion` of ``in_channels`` into ``self.channels`` with this head's equalizer settings."""
        return Fusion(in_channels, self.channels, fuse=fuse, kernel_size=kernel_size, **self._fusion_kwargs)

    def branch_norm(self) -> Optional[str]:
        """Norm inside the conv block of an upsampled branch: "bn", or None when it comes after the upsample."""
        return "bn" if self.post_norm is None else None

    def branch_conv(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> ConvNormAct:
        """The conv block of a branch that is upsampled before a fusion (Conv-BN-ReLU or Conv-ReLU)."""
        return ConvNormAct(in_channels, out_channels, kernel_size, norm=self.branch_norm())

    def post_norms(self, n: int, channels: int) -> Optional[nn.ModuleList]:
        """``n`` post-upsample norms (None for the default pipeline, so its state_dict is unchanged)."""
        if self.post_norm is None:
            return None
        return nn.ModuleList(make_norm(self.post_norm, channels) for _ in range(n))

    def up_norm(self, x: Tensor, size: Sequence[int], norm: Optional[nn.Module]) -> Tensor:
        """Resize-then-norm for a post-upsample pipeline; the unchanged branch otherwise (Fusion resizes)."""
        if norm is None:
            return x
        return norm(resize(x, size, self.align_corners))

    def select(self, feats: Sequence[Tensor]) -> Union[Tensor, list[Tensor]]:
        if isinstance(self.in_index, int):
            return feats[self.in_index]
        return [feats[i] for i in self.in_index]
