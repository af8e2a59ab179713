"""The fusion-site table: where each smp architecture concatenates resized features.

A *fusion site* is a channel concat where at least one branch went through a smoothing (bilinear /
bicubic) resize that changed its size, named by the module that first receives the concat (the
*consumer*). :data:`TABLE` holds one function per architecture that reads the sites off a built model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: Name of the ModuleDict that holds the equalizers on an equalized model.
CONTAINER = "scale_equalizers"
#: Interpolation modes that average neighbouring pixels and so lower the variance (Thm. 3.2).
SMOOTHING_MODES = ("bilinear", "bicubic", "linear", "trilinear")

# ---------------------------------------------------------------------------------------------- sites
@dataclass(frozen=True)
class Site:
    """One fusion site of an smp model.

    Attributes:
        consumer: path of the module whose first argument is the concat (the pre-hook goes here).
        groups: channels of every branch, in concat order.
        interpolated: per branch, whether it came out of an interpolation (``F.interpolate``/``nn.Upsample``).
        conv: path of the first conv applied to the concat (the one :func:`densefuse.fold` rescales),
            or None when folding is not possible at this site.
        norm: BatchNorm after ``conv`` (or after ``pointwise``) that absorbs the mean term, or None.
        pointwise: for a depthwise ``conv``, the 1x1 conv between it and ``norm``.
        fusion: for one addend of a sum fusion (``equalize(..., sums=True)``), where the sum happens
            (the module it runs in and the ``+``); None for a channel concat.
        center: subtract the branch mean (the default). A sum addend whose layer has no bias is only
            scaled: its mean term would have nowhere to go when folded, and scaling alone commutes with
            zero padding, so that fold is exact everywhere.
    """

    consumer: str
    groups: tuple[int, ...]
    interpolated: tuple[bool, ...]
    conv: Optional[str] = None
    norm: Optional[str] = None
    pointwise: Optional[str] = None
    fusion: Optional[str] = None
    center: bool = True

    @property
    def key(self) -> str:
        """Key in ``model.scale_equalizers`` (module paths may not contain dots there)."""
        return self.consumer.replace(".", "__")


class NotInTable(Exception):
    """Raised by a table entry when the model's configuration has no listed site (with the reason)."""


def _get(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path)


def _conv_norm(model: nn.Module, seq_path: str) -> tuple[Optional[str], Optional[str]]:
    """Fold target of a Conv2dReLU-like Sequential ``[conv, norm, act]``: (conv path, BN path or None).

    Folding needs somewhere to put the mean term: a conv bias or a following BatchNorm. Other
    norms (GroupNorm, LayerNorm) would not absorb it exactly, so such sites are left unfoldable.
    """
    seq = _get(model, seq_path)
    conv = seq[0] if isinstance(seq, nn.Sequential) and len(seq) else None
    if not isinstance(conv, nn.Conv2d):
        return None, None
    nxt = seq[1] if len(seq) > 1 else None
    if isinstance(nxt, _BatchNorm) and nxt.num_features == conv.out_channels:
        return f"{seq_path}.0", f"{seq_path}.1"
    if conv.bias is not None:
        return f"{seq_path}.0", None
    return None, None


def _upernet(model: nn.Module) -> list[Site]:
    dec = model.decoder
    pooled = [int(block[1][0].out_channels) for block in dec.psp.blocks]
    x_ch = int(dec.psp.out_conv[0].in_channels) - sum(pooled)
    dc = int(dec.fusion_block[0].in_channels) // (len(dec.fpn_conv_blocks) + 1)
    n = len(dec.fpn_conv_blocks) + 1
    return [
        Site("decoder.psp.out_conv", (x_ch, *pooled), (False,) + (True,) * len(pooled),
             *_conv_norm(model, "decoder.psp.out_conv")),
        # P2 goes through a same-size (identity) interpolate, so every branch is "interpolated".
        Site("decoder.fusion_block", (dc,) * n, (True,) * n, *_conv_norm(model, "decoder.fusion_block")),
    ]


def _pspnet(model: nn.Module) -> list[Site]:
    dec = model.decoder
    pooled = [int(block.pool[1][0].out_channels) for block in dec.psp.blocks]
    x_ch = int(dec.conv[0].in_channels) - sum(pooled)
    return [Site("decoder.conv", (*pooled, x_ch), (True,) * len(pooled) + (False,), *_conv_norm(model, "decoder.conv"))]


def _aspp(model: nn.Module, path: str) -> Site:
    aspp = _get(model, path)
    n = len(aspp.convs)
    c = int(aspp.project[0].in_channels) // n
    return Site(f"{path}.project", (c,) * n, (False,) * (n - 1) + (True,), *_conv_norm(model, f"{path}.project"))


def _deeplabv3(model: nn.Module) -> list[Site]:
    return [_aspp(model, "decoder.aspp")]


def _deeplabv3plus(model: nn.Module) -> list[Site]:
    dec = model.decoder
    low = int(dec.block1[0].out_channels)
    dw = dec.block2[0][0]
    block2 = Site("decoder.block2", (int(dw.in_channels) - low, low), (True, False), conv="decoder.block2.0.0",
                  norm="decoder.block2.1" if isinstance(dec.block2[1], _BatchNorm) else None,
                  pointwise="decoder.block2.0.1")
    return [_aspp(model, "decoder.aspp.0"), block2]


def _segformer(model: nn.Module) -> list[Site]:
    groups = tuple(int(m.linear.out_features) for m in model.decoder.mlp_stage)
    return [Site("decoder.fuse_stage", groups, (True,) * len(groups), *_conv_norm(model, "decoder.fuse_stage"))]


def _fpn(model: nn.Module) -> list[Site]:
    dec = model.decoder
    if dec.merge.policy != "cat":
        raise NotInTable(
            f"FPN with decoder_merge_policy='{dec.merge.policy}' sums its levels (no channel concat); "
            "use decoder_merge_policy='cat'"
        )
    groups = tuple(int(b.block[-1].block[0].out_channels) for b in dec.seg_blocks)
    interpolated = tuple(bool(b.block[-1].upsample) for b in dec.seg_blocks)
    head = model.segmentation_head[0]
    conv = "segmentation_head.0" if isinstance(head, nn.Conv2d) and head.bias is not None else None
    return [Site("decoder.dropout", groups, interpolated, conv=conv)]


def _require_smoothing(arch: str, mode: str) -> None:
    if mode not in SMOOTHING_MODES:
        raise NotInTable(
            f"{arch} upsamples with decoder_interpolation='{mode}', which keeps the variance, so there is "
            f"no scale imbalance to fix; build it with decoder_interpolation='bilinear' to get fusion sites"
        )


def _unet_site(model: nn.Module, path: str, in_ch: int) -> Optional[Site]:
    block = _get(model, path)
    skip = int(block.conv1[0].in_channels) - in_ch
    if skip <= 0 or in_ch <= 0:
        return None
    # conv1 only receives the concat unchanged when attention1 is the identity (no scSE).
    plain = isinstance(block.attention1.attention, nn.Identity)
    conv, norm = _conv_norm(model, f"{path}.conv1") if plain else (None, None)
    return Site(f"{path}.attention1", (in_ch, skip), (True, False), conv, norm)


def _unet(model: nn.Module) -> list[Site]:
    dec = model.decoder
    _require_smoothing("Unet", dec.blocks[0].interpolation_mode)
    out, in_ch = [], int(model.encoder.out_channels[-1])
    for i, block in enumerate(dec.blocks):
        site = _unet_site(model, f"decoder.blocks.{i}", in_ch)
        if site is not None:
            out.append(site)
        in_ch = int(block.conv2[0].out_channels)
    return out


def _unetplusplus(model: nn.Module) -> list[Site]:
    dec = model.decoder
    _require_smoothing("UnetPlusPlus", next(iter(dec.blocks.values())).interpolation_mode)
    out = []
    for key, block in dec.blocks.items():
        depth_idx, level = (int(v) for v in key.split("_")[1:])
        if block.is_empty or level >= dec.depth:
            continue
        skip = int(dec.skip_channels[level])
        k = level + 1 - depth_idx  # the skip is a nested concat: (level - depth_idx) dense outputs + 1 encoder feature
        in_ch = int(block.conv1[0].in_channels) - k * skip
        if skip <= 0 or in_ch <= 0:
            continue
        path = f"decoder.blocks.{key}"
        plain = isinstance(block.attention1.attention, nn.Identity)
        conv, norm = _conv_norm(model, f"{path}.conv1") if plain else (None, None)
        out.append(Site(f"{path}.attention1", (in_ch,) + (skip,) * k, (True,) + (False,) * k, conv, norm))
    return out


def _manet(model: nn.Module) -> list[Site]:
    dec = model.decoder
    _require_smoothing("MAnet", dec.blocks[0].interpolation_mode)
    out = []
    for i, block in enumerate(dec.blocks):
        if not hasattr(block, "SE_ll"):  # the last DecoderBlock has no skip and no concat
            continue
        c = int(block.conv1[0].in_channels) // 2
        path = f"decoder.blocks.{i}.conv1"
        # branch 0 is UP(x) * attention: still an interpolation output for the probe.
        out.append(Site(path, (c, c), (True, False), *_conv_norm(model, path)))
    return out


#: Architecture (smp class name) -> function returning its fusion sites (raises NotInTable with a reason).
TABLE: dict[str, Callable[[nn.Module], list[Site]]] = {
    "UPerNet": _upernet,
    "PSPNet": _pspnet,
    "DeepLabV3": _deeplabv3,
    "DeepLabV3Plus": _deeplabv3plus,
    "Segformer": _segformer,
    "FPN": _fpn,
    "Unet": _unet,
    "UnetPlusPlus": _unetplusplus,
    "MAnet": _manet,
}


def _smp_class_name(model: nn.Module) -> Optional[str]:
    """Name of the smp architecture class ``model`` is (or derives from), if any."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("segmentation_models_pytorch.") and cls.__name__ in TABLE:
            return cls.__name__
    return None


def table_sites(model: nn.Module) -> Optional[list[Site]]:
    """Fusion sites of ``model`` from :data:`TABLE`, or None when its architecture/config is not listed."""
    name = _smp_class_name(model)
    if name is None:
        return None
    try:
        return TABLE[name](model)
    except NotInTable:
        return None

