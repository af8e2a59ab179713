"""Find fusion sites by tracing one forward pass (architectures outside the table, and checking it)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..calibration import equalizers
from ..errors import ConfigError
from .sites import CONTAINER, SMOOTHING_MODES, TABLE, NotInTable, Site, _conv_norm, _smp_class_name

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

