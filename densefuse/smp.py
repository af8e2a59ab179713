"""Scale equalizers for segmentation_models_pytorch (smp) models, without editing smp.

smp decoders fuse multi-level features as ``consumer(torch.cat([UP(P_1), ..., P_n], dim=1))``. A
*fusion site* is such a channel concat where at least one branch went through a smoothing
(bilinear / bicubic) resize that changed its size, named by the module that first receives the
concat (the *consumer*). :func:`equalize` attaches one :class:`SmpEqualizer` per site: a forward
pre-hook on the consumer replaces its first argument ``x`` by ``eq(x)``, so the equalizer observes
while calibrating and applies its frozen affine in ``explicit`` mode. The equalizers live in
``model.scale_equalizers`` (an ``nn.ModuleDict``), so smp's own state_dict keys do not change and
smp / hub checkpoints still load (``strict=False`` then misses only ``scale_equalizers.*``).

Sites come from a table (:data:`TABLE`, one function per architecture); :func:`probe` runs one traced
forward (a ``TorchFunctionMode`` that records every channel concat, which inputs came out of an
interpolation, and which module first consumes the concat) to check the table and to handle
architectures that are not in it.

Example::

    model = smp.UPerNet(encoder_name="resnet34", encoder_weights=None, classes=150)
    densefuse.smp.equalize(model)
    densefuse.calibrate(model, train_batches)
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from .equalizer import ScaleEqualizer, _check_mode, absorb_offset, equalizers, measure
from .errors import CalibrationError, ConfigError, did_you_mean

__all__ = [
    "ARCHS",
    "SmpEqualizer",
    "Site",
    "TABLE",
    "build_smp_model",
    "equalize",
    "probe",
    "report",
    "sites",
    "table_sites",
]

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
    """

    consumer: str
    groups: tuple[int, ...]
    interpolated: tuple[bool, ...]
    conv: Optional[str] = None
    norm: Optional[str] = None
    pointwise: Optional[str] = None

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


# ---------------------------------------------------------------------------------------------- probe
_INTERPOLATE_SIG = inspect.signature(F.interpolate)
_CATS = {torch.cat, getattr(torch, "concat", torch.cat), getattr(torch, "concatenate", torch.cat)}
#: Shape-preserving ops through which "came out of an interpolation" is carried (e.g. MAnet's UP(x) * attn).
_PASSTHROUGH = {
    "mul", "__mul__", "__rmul__", "mul_", "__imul__", "add", "__add__", "__radd__", "add_", "__iadd__",
    "sub", "__sub__", "div", "__truediv__", "contiguous", "clone",
}


@dataclass
class _Concat:
    parts: list  # (channels, interpolated, smoothing-resize-changed-size)
    consumer: Optional[str] = None


class _Tracer(TorchFunctionMode):
    """Records interpolations and 4-D channel concats during one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: list[Tensor] = []  # keep every recorded tensor alive so id() values stay unique
        self.resized: dict[int, tuple[str, bool]] = {}  # id -> (mode, size changed)
        self.concats: dict[int, _Concat] = {}

    def _record(self, t: Tensor) -> int:
        self.keep.append(t)
        return id(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor):
            return out
        if func is F.interpolate:
            bound = _INTERPOLATE_SIG.bind(*args, **kwargs)
            x, mode = bound.arguments["input"], bound.arguments.get("mode", "nearest")
            changed = tuple(x.shape[2:]) != tuple(out.shape[2:])
            self.resized[self._record(out)] = (str(mode), changed)
        elif func in _CATS:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if out.dim() == 4 and dim in (1, -3) and len(tensors) >= 2:
                parts = []
                for t in tensors:
                    nested = self.concats.get(id(t))
                    if nested is not None:  # UnetPlusPlus: the skip is itself a concat; flatten it
                        parts.extend(nested.parts)
                        continue
                    mode, changed = self.resized.get(id(t), (None, False))
                    parts.append((int(t.shape[1]), mode is not None, mode in SMOOTHING_MODES and changed))
                self.concats[self._record(out)] = _Concat(parts)
        elif getattr(func, "__name__", None) in _PASSTHROUGH:
            for a in args:
                if isinstance(a, Tensor) and id(a) in self.resized and a.shape == out.shape:
                    self.resized[self._record(out)] = self.resized[id(a)]
                    break
        return out


def _example_input(model: nn.Module, size: int = 64) -> Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_ch = int(getattr(getattr(model, "encoder", None), "_in_channels", 0) or (first.in_channels if first else 3))
    p = next(iter(model.parameters()), None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_ch, size, size, generator=g)
    return x.to(p.device) if p is not None else x


def _fold_target_of(model: nn.Module, consumer: str) -> tuple[Optional[str], Optional[str]]:
    """Fold target of a probed consumer: only a Sequential that starts with a Conv2d."""
    try:
        return _conv_norm(model, consumer)
    except (AttributeError, TypeError, IndexError):
        return None, None


@torch.no_grad()
def probe(model: nn.Module, example_input: Optional[Tensor] = None, all_concats: bool = False) -> list[Site]:
    """Find fusion sites by tracing one forward pass (eval mode, no grad; nothing in the model changes).

    Every 4-D channel concat is recorded with the module that first receives it as its first argument
    and, per branch, whether it came out of an interpolation. A concat is a fusion site when it has a
    consumer, at least two non-empty branches and a branch resized by a smoothing mode
    (:data:`SMOOTHING_MODES`) to a new size. ``all_concats=True`` also returns the other concats
    that have a consumer (e.g. a Unet with nearest upsampling), to pick from and pass to
    :func:`equalize` as ``sites=``. ``example_input`` defaults to one random 64x64 image.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"densefuse.smp.probe expects an nn.Module, got {type(model).__name__}")
    x = _example_input(model) if example_input is None else example_input
    tracer = _Tracer()

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], Tensor):
                c = tracer.concats.get(id(args[0]))
                if c is not None and c.consumer is None:
                    c.consumer = name
        return hook

    training = [(m, m.training) for m in model.modules()]
    # An already equalized model: let its equalizers pass the concat through untouched (same tensor).
    eq_state = [(eq, eq.observing, eq._sums.clone(), list(eq.ratios)) for _, eq in equalizers(model)]
    handles = [m.register_forward_pre_hook(hook_for(n), prepend=True) for n, m in model.named_modules() if n]
    try:
        for eq, *_ in eq_state:
            eq.observing = True
        model.eval()
        with tracer:
            try:
                model(x)
            except (RuntimeError, AssertionError, ValueError, TypeError) as e:
                raise ConfigError(
                    f"the fusion-site probe could not run {type(model).__name__} on an input of shape "
                    f"{tuple(x.shape)} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                    "pass example_input= with a valid input"
                ) from e
    finally:
        for h in handles:
            h.remove()
        for m, t in training:
            m.training = t
        for eq, observing, sums, ratios in eq_state:
            eq.observing = observing
            eq._sums.copy_(sums)
            eq.ratios = ratios
    out = []
    for c in tracer.concats.values():
        if c.consumer is None or c.consumer.split(".")[0] == CONTAINER:
            continue
        nonempty = sum(1 for ch, _, _ in c.parts if ch > 0)
        if nonempty < 2 or (not all_concats and not any(smooth for _, _, smooth in c.parts)):
            continue
        conv, norm = _fold_target_of(model, c.consumer)
        out.append(Site(c.consumer, tuple(ch for ch, _, _ in c.parts), tuple(up for _, up, _ in c.parts), conv, norm))
    return out


def sites(model: nn.Module, source: str = "auto", example_input: Optional[Tensor] = None) -> list[Site]:
    """Fusion sites of ``model``: ``"table"``, ``"probe"``, or ``"auto"`` (the table when the
    architecture is listed, else the probe). Raises :class:`ConfigError` when none is found."""
    if source not in ("auto", "table", "probe"):
        raise ConfigError(f"unknown site source '{source}'; choose auto, table or probe")
    arch = _smp_class_name(model)
    reason = ""
    if source in ("auto", "table") and arch is not None:
        try:
            return TABLE[arch](model)
        except NotInTable as e:
            reason = str(e)
    if source == "table":
        raise ConfigError(
            reason or f"{type(model).__name__} is not in the fusion-site table (listed: {', '.join(TABLE)}); "
            "use source='probe'"
        )
    found = probe(model, example_input)
    if not found:
        raise ConfigError(
            f"no fusion site found in {type(model).__name__}: "
            + (reason or "no channel concat of a bilinearly resized feature reaches a module "
               f"(sum fusions such as PAN, Linknet, DPT or FPN-add are not supported; table: {', '.join(TABLE)})")
        )
    return found


# ---------------------------------------------------------------------------------------------- equalize
class SmpEqualizer(ScaleEqualizer):
    """A :class:`ScaleEqualizer` that knows its :class:`Site` and folds through a depthwise-pointwise pair.

    For DeepLabV3+ ``block2`` the first op is a depthwise 3x3 conv followed by a bias-free 1x1
    pointwise conv and a BatchNorm: the depthwise rows are scaled by ``1/std`` (as in the base
    class) and the mean term, carried through the pointwise conv, goes into the BN running mean.
    """

    def __init__(self, site: Site, mode: str = "explicit", eps: float = 1e-5) -> None:
        super().__init__(site.groups, mode=mode, eps=eps)
        self.site = site
        self.label = site.consumer
        self._pointwise: Optional[tuple[nn.Conv2d, Optional[nn.Module]]] = None

    def attach_pointwise(self, pointwise: nn.Conv2d, norm: Optional[nn.Module]) -> None:
        self._pointwise = (pointwise, norm)

    def extra_repr(self) -> str:
        return f"consumer={self.site.consumer!r}, " + super().extra_repr()

    def _absorb_offset(self, c: Tensor) -> None:
        if self._pointwise is None:
            return super()._absorb_offset(c)
        pw, norm = self._pointwise
        absorb_offset(pw.weight.flatten(1) @ c, pw, norm)  # the constant passes through the 1x1 pointwise


class _EqualizeHook:
    """Forward pre-hook: replace the consumer's first argument by ``eq(args[0])``.

    A small class (not a closure) so that ``copy.deepcopy`` and pickling of the model carry the
    hook over to the copied equalizer.
    """

    def __init__(self, eq: SmpEqualizer) -> None:
        self.eq = eq

    def __call__(self, module: nn.Module, args: tuple) -> Optional[tuple]:
        if not args:
            return None
        return (self.eq(args[0]), *args[1:])


def _is_equalized(model: nn.Module) -> bool:
    return any(isinstance(h, _EqualizeHook) for m in model.modules() for h in m._forward_pre_hooks.values())


def equalize(
    model: nn.Module,
    mode: str = "explicit",
    eps: float = 1e-5,
    source: str = "auto",
    example_input: Optional[Tensor] = None,
    sites: Optional[Sequence[Site]] = None,
) -> nn.Module:
    """Attach a scale equalizer at every fusion site of an smp model (in place; returns ``model``).

    Args:
        model: an smp model (or any module, with ``source="probe"`` / ``"auto"``).
        mode: ``"explicit"`` (default), ``"off"`` (measure only) or ``"fold"`` (see :mod:`densefuse.equalizer`).
        eps: dead-branch guard of the equalizers.
        source: where the sites come from: ``"auto"`` (table, else probe), ``"table"`` or ``"probe"``.
        example_input: input for the probe (default one random 64x64 image).
        sites: use these sites instead (e.g. picked from ``probe(model, all_concats=True)``).

    Then run :func:`densefuse.calibrate` before training; :func:`densefuse.fold` works too.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"densefuse.smp.equalize expects a torch nn.Module (an smp model), got {type(model).__name__}")
    if _is_equalized(model) or CONTAINER in model._modules:
        raise CalibrationError(
            f"{type(model).__name__} is already equalized (model.{CONTAINER} exists); call densefuse.smp.equalize once"
        )
    if any(True for _ in equalizers(model)):
        raise CalibrationError(
            f"{type(model).__name__} already has scale equalizers (densefuse models have them built in)"
        )
    mode = _check_mode(mode)
    chosen = list(sites) if sites is not None else _sites(model, source, example_input)
    if not chosen:
        raise ConfigError("equalize() got an empty list of fusion sites")
    # Build and check everything first, then touch the model (no half-equalized model on error).
    container, hooks = nn.ModuleDict(), []
    for site in chosen:
        if site.key in container:
            raise ConfigError(f"fusion site '{site.consumer}' is listed twice")
        eq = SmpEqualizer(site, mode=mode, eps=eps)
        try:
            consumer = model.get_submodule(site.consumer)
            if site.conv is not None:
                conv = model.get_submodule(site.conv)
                norm = model.get_submodule(site.norm) if site.norm else None
                if site.pointwise is not None:
                    eq.attach(conv, None)
                    eq.attach_pointwise(model.get_submodule(site.pointwise), norm)
                else:
                    eq.attach(conv, norm)
        except (AttributeError, ValueError) as e:
            raise ConfigError(f"bad fusion site '{site.consumer}' for {type(model).__name__}: {e}") from None
        container[site.key] = eq
        hooks.append((consumer, eq))
    p = next(iter(model.parameters()), None)
    if p is not None:
        container.to(p.device)
    for consumer, eq in hooks:
        consumer.register_forward_pre_hook(_EqualizeHook(eq))
    model.add_module(CONTAINER, container)
    return model


_sites = sites  # `equalize` has a parameter named `sites`


# ---------------------------------------------------------------------------------------------- report
def report(model: nn.Module, batches: Optional[Iterable[Any]] = None, num_images: Optional[int] = None) -> pd.DataFrame:
    """Per site and branch: mean/std before and after equalization.

    With ``batches``, the stats are measured on them (train-mode BN, nothing changes; see
    :func:`densefuse.measure`). Without, the frozen calibration stats are reported (``after`` is
    then 0/1 by construction for a calibrated site in mode explicit or fold).
    """
    eqs = [(n, eq) for n, eq in equalizers(model) if isinstance(eq, SmpEqualizer)]
    if not eqs:
        raise CalibrationError("the model has no smp scale equalizers; call densefuse.smp.equalize(model) first")
    by_name = {n: eq for n, eq in eqs}
    by_name.update({eq.site.consumer: eq for _, eq in eqs})  # whichever name measure() reports
    if batches is not None:
        df = measure(model, batches, num_images)
        df = df[df["site"].isin(list(by_name))].copy()
        df["interpolated"] = [by_name[s].site.interpolated[b] for s, b in zip(df["site"], df["branch"])]
        df["site"] = [by_name[s].site.consumer for s in df["site"]]
        cols = ["site", "branch", "channels", "interpolated", "mean", "std", "var_before",
                "mean_after", "std_after", "var_after", "mode"]
        return df[cols].reset_index(drop=True)
    rows = []
    for _, eq in eqs:
        if not eq._is_calibrated:
            raise CalibrationError(
                f"site '{eq.site.consumer}' is not calibrated; run densefuse.calibrate(model, batches) first "
                "or pass batches to report()"
            )
        active = eq.mode != "off"
        for i, g in enumerate(eq.groups):
            mu, sd = float(eq.mean[i]), float(eq.std[i])
            rows.append({
                "site": eq.site.consumer, "branch": i, "channels": g, "interpolated": eq.site.interpolated[i],
                "mean": mu, "std": sd, "var_before": sd**2,
                "mean_after": 0.0 if active else mu, "std_after": 1.0 if active else sd,
                "var_after": 1.0 if active else sd**2, "mode": eq.mode,
            })
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- config
#: smp architectures that build_smp_model accepts (class names; matching is case-insensitive).
ARCHS = ("Unet", "UnetPlusPlus", "MAnet", "Linknet", "FPN", "PSPNet", "DeepLabV3", "DeepLabV3Plus",
         "PAN", "UPerNet", "Segformer", "DPT")
_MANAGED = {
    "encoder_name": "set it in model.smp.encoder_name",
    "encoder_weights": "densefuse never downloads weights; it is always None",
    "classes": "set it in model.num_classes",
    "aux_params": "the densefuse trainer expects the forward to return one tensor",
}


def _arch_class(arch: Any) -> type:
    import segmentation_models_pytorch as smp

    names = {a.lower(): a for a in ARCHS}
    key = str(arch).lower()
    if key not in names:
        raise ConfigError(
            f"unknown smp architecture 'model.smp.arch: {arch}'{did_you_mean(str(arch), ARCHS)}; "
            f"available: {', '.join(ARCHS)}"
        )
    return getattr(smp, names[key])


def _accepted(cls: type) -> set[str]:
    from segmentation_models_pytorch.encoders import get_encoder

    params = set(inspect.signature(cls.__init__).parameters) | set(inspect.signature(get_encoder).parameters)
    return params - {"self", "args", "kwargs", "name", "weights", "depth"}


def build_smp_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the smp model of ``cfg["model"]["smp"]`` (random init) and attach equalizers.

    Reads ``model.smp = {arch, encoder_name, kwargs}``, ``model.num_classes`` and
    ``model.equalizer = {mode, eps}``. Equalizers are attached in every mode (``off`` too, so
    reports and calibration tables still work). ``encoder_weights`` is always None: load weights
    into ``model.encoder`` yourself.
    """
    m = cfg["model"]
    spec = dict(m.get("smp") or {})
    for k in spec:
        if k not in ("arch", "encoder_name", "kwargs"):
            raise ConfigError(f"unknown config key 'model.smp.{k}'{did_you_mean(k, ['arch', 'encoder_name', 'kwargs'])}")
    cls = _arch_class(spec.get("arch", "UPerNet"))
    encoder_name = str(spec.get("encoder_name", "resnet18"))
    kwargs = dict(spec.get("kwargs") or {})
    accepted = _accepted(cls)
    for k in kwargs:
        if k in _MANAGED:
            raise ConfigError(f"config key 'model.smp.kwargs.{k}' is not allowed: {_MANAGED[k]}")
        # tu- (timm) encoders take any extra keyword; timm itself checks those.
        if k not in accepted and not encoder_name.startswith("tu-"):
            raise ConfigError(
                f"unknown config key 'model.smp.kwargs.{k}' for smp.{cls.__name__}{did_you_mean(k, accepted)}"
            )
    try:
        model = cls(encoder_name=encoder_name, encoder_weights=None, classes=int(m["num_classes"]), **kwargs)
    except KeyError as e:
        msg = str(e.args[0]) if e.args else str(e)
        if "encoder" in msg.lower():
            from segmentation_models_pytorch.encoders import get_encoder_names

            raise ConfigError(
                f"unknown smp encoder 'model.smp.encoder_name: {encoder_name}'"
                f"{did_you_mean(encoder_name, get_encoder_names())}; timm models work as 'tu-<timm name>'"
            ) from None
        raise ConfigError(f"cannot build smp.{cls.__name__} from model.smp: {msg}") from None
    except (TypeError, ValueError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"cannot build smp.{cls.__name__} from model.smp (check model.smp.kwargs): {e}") from None
    eq = m.get("equalizer") or {}
    mode = eq.get("mode", "explicit")
    try:
        return equalize(model, mode=mode, eps=float(eq.get("eps", 1e-5)))
    except ConfigError as e:
        if mode != "off":
            raise
        # The baseline of an architecture without concat fusion (Linknet, PAN, FPN-add, nearest Unet)
        # is still a valid model; there is just nothing to measure.
        warnings.warn(f"{e}; building smp.{cls.__name__} without scale equalizers (model.equalizer.mode is off)",
                      stacklevel=2)
        return model

