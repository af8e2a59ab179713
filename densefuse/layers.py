"""Small shared blocks (mmcv ConvModule semantics: conv without bias when a norm follows).

Norms and activations are chosen by name or given as a callable (the shape of timm's ``create_act``),
so one block covers Conv-BN-ReLU, Conv-GN-GELU and a norm-free Conv-LeakyReLU.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import zlib
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

NormSpec = Union[str, None, Callable[[int], nn.Module]]
ActSpec = Union[str, None, Callable[..., nn.Module]]

#: names accepted by :func:`make_norm`
NORMS = ("bn", "syncbn", "gn", "ln")
#: names accepted by :func:`make_act`
ACTS = ("relu", "leaky_relu", "gelu")


def make_norm(kind: NormSpec, channels: int) -> nn.Module:
    """A norm layer over ``channels``.

    ``"bn"`` (BatchNorm2d; converted to SyncBatchNorm under DDP), ``"syncbn"``, ``"gn"`` (32 groups, or
    the largest group count up to 32 that divides ``channels``), ``"ln"`` (GroupNorm with one group =
    LayerNorm over C,H,W), ``None`` (identity) or a callable ``channels -> module``.
    """
    if kind is None:
        return nn.Identity()
    if callable(kind):
        return kind(channels)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "syncbn":
        return nn.SyncBatchNorm(channels)
    if kind == "gn":
        groups = min(32, channels)
        if channels % groups:
            groups = math.gcd(channels, 32)
        return nn.GroupNorm(groups, channels)
    if kind == "ln":
        return nn.GroupNorm(1, channels)
    raise ValueError(f"unknown norm '{kind}' (use {', '.join(NORMS)}, None or a callable)")


def make_act(kind: ActSpec, **kwargs: Any) -> nn.Module:
    """An activation: ``"relu"`` / ``"leaky_relu"`` (in place unless ``inplace=False``), ``"gelu"``,
    ``None`` (identity) or a callable returning a module (called with ``kwargs``)."""
    if kind is None:
        return nn.Identity()
    if callable(kind):
        return kind(**kwargs)
    if kind == "relu":
        return nn.ReLU(**{"inplace": True, **kwargs})
    if kind == "leaky_relu":
        return nn.LeakyReLU(**{"inplace": True, **kwargs})
    if kind == "gelu":
        return nn.GELU(**kwargs)
    raise ValueError(f"unknown activation '{kind}' (use {', '.join(ACTS)}, None or a callable)")


class ConvNormAct(nn.Sequential):
    """Conv2d -> norm -> activation with mmcv ConvModule's init (Kaiming-normal, fan_out).

    Submodules are always named ``conv``, ``bn``, ``act`` (``bn`` and ``act`` may be Identity) so that
    name-based weight-decay rules and checkpoint keys do not depend on the choice of norm.
    ``bias="auto"`` gives the conv a bias only when there is no norm after it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        bias: Union[bool, str] = "auto",
        norm: NormSpec = "bn",
        act: ActSpec = "relu",
        act_kwargs: Optional[dict] = None,
    ) -> None:
        padding = dilation * (kernel_size - 1) // 2
        if bias == "auto":
            bias = norm is None
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias=bool(bias))
        self.bn = make_norm(norm, out_channels)
        act_kwargs = dict(act_kwargs or {})
        self.act = make_act(act, **act_kwargs)
        if act == "leaky_relu":
            slope = act_kwargs.get("negative_slope", 0.01)
            nn.init.kaiming_normal_(self.conv.weight, a=slope, mode="fan_out", nonlinearity="leaky_relu")
        else:
            nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)


class ConvBNReLU(ConvNormAct):
    """``ConvNormAct`` with the older ``act: bool`` argument (Conv-norm-ReLU, or no activation)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int = 1,
        norm: NormSpec = "bn",
        act: bool = True,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, dilation, groups,
                         norm=norm, act="relu" if act else None)


class DepthwiseSeparableConv(nn.Sequential):
    """Depthwise k x k ConvNormAct then pointwise 1x1 ConvNormAct (mmcv DepthwiseSeparableConvModule)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        dilation: int = 1,
        norm: NormSpec = "bn",
        act: ActSpec = "relu",
    ) -> None:
        super().__init__()
        self.depthwise = ConvNormAct(in_channels, in_channels, kernel_size, dilation=dilation, groups=in_channels,
                                     norm=norm, act=act)
        self.pointwise = ConvNormAct(in_channels, out_channels, 1, norm=norm, act=act)


class PPM(nn.ModuleList):
    """Pyramid pooling branches: AdaptiveAvgPool2d(s) -> 1x1 ConvNormAct, one per pool scale.

    ``norm=None`` gives Conv(bias)-ReLU branches, for pipelines that normalize after the upsample.
    """

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, norm: NormSpec = "bn") -> None:
        super().__init__(
            nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvNormAct(in_channels, channels, 1, norm=norm)) for s in pool_scales
        )

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return [branch(x) for branch in self]


_SAMPLE_SEEDS: contextvars.ContextVar[Optional[list[int]]] = contextvars.ContextVar("densefuse_sample_seeds",
                                                                                     default=None)


@contextlib.contextmanager
def sample_seeds(seeds: Optional[Tensor]) -> Iterator[None]:
    """Within the block, :class:`SampleDropout2d` draws each sample's mask from ``seeds`` (B,) (the
    training loader's per-sample seeds); ``None`` leaves dropout on torch's global RNG."""
    token = _SAMPLE_SEEDS.set(None if seeds is None else [int(v) for v in seeds.tolist()])
    try:
        yield
    finally:
        _SAMPLE_SEEDS.reset(token)


class SampleDropout2d(nn.Dropout2d):
    """``nn.Dropout2d`` whose channel mask for each sample comes from that sample's seed (see
    :func:`sample_seeds`) and :attr:`salt` (the module's name, set by the trainer): a sample is dropped
    alike whichever process and batch it is in, so N processes with batch b/N train like one process
    with batch b. Outside :func:`sample_seeds` or for a batch of another size it is ``nn.Dropout2d``.
    Under ``torch.compile`` the masks are drawn outside the graph, so a compiled run drops what an eager
    one drops. Same state_dict (none)."""

    salt: str = ""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or x.ndim != 4:
            return super().forward(x)
        scale = _sample_dropout_scale(self.salt, self.p, x)
        return super().forward(x) if scale is None else x * scale


@torch.compiler.disable
def _sample_dropout_scale(salt: str, p: float, x: Tensor) -> Optional[Tensor]:
    """(B, C, 1, 1) keep-mask / (1 - p) drawn from the per-sample seeds in force, or ``None`` without them
    (or for a batch of another size). Kept out of compiled graphs: it reads the seeds of the current step."""
    seeds = _SAMPLE_SEEDS.get()
    if seeds is None or len(seeds) != x.shape[0]:
        return None
    offset = zlib.crc32(salt.encode())
    keep = torch.stack([torch.rand(x.shape[1], generator=torch.Generator().manual_seed((s + offset) % 2**63))
                        for s in seeds]) >= p
    return (keep.to(x.dtype) / (1.0 - p)).to(x.device).view(x.shape[0], x.shape[1], 1, 1)


def name_sample_dropouts(model: nn.Module) -> None:
    """Salt each :class:`SampleDropout2d` of ``model`` with its name (wrapper prefixes of DDP and
    ``torch.compile`` left out), so two heads of one sample draw different masks."""
    for name, m in model.named_modules():
        if isinstance(m, SampleDropout2d):
            parts = [p for p in name.split(".") if p not in ("module", "_orig_mod")]
            m.salt = ".".join(parts)
