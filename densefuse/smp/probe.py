"""Find fusion sites by tracing one forward pass (architectures outside the table, and checking it)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from ..calibration import equalizers
from ..errors import ConfigError
from .sites import CONTAINER, SMOOTHING_MODES, TABLE, NotInTable, Site, _smp_class_name

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
    conv: Optional[str] = None  # the first Conv2d that receives the concat tensor itself


@dataclass(frozen=True)
class _Linear:
    """A tensor that is a linear layer's output, a smoothing resize of one, or a sum of such tensors."""

    leaves: tuple  # paths of the Conv2d layers whose outputs add up to this tensor
    smooth: bool  # an addend went through a size-changing smoothing resize (before or after its layer)


@dataclass
class _Sum:
    where: str  # module in which the sum ran
    leaves: tuple


_ADDS = {"add", "__add__", "__radd__", "add_", "__iadd__"}


class _Tracer(TorchFunctionMode):
    """Records interpolations, 4-D channel concats and (for sum fusions) sums of conv outputs during one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: list[Tensor] = []  # keep every recorded tensor alive so id() values stay unique
        self.resized: dict[int, tuple[str, bool]] = {}  # id -> (mode, size changed)
        self.concats: dict[int, _Concat] = {}
        self.linear: dict[int, _Linear] = {}  # id -> how the tensor is a sum of conv outputs
        self.conv_out: dict[int, str] = {}  # id of a conv's output -> conv path (for the norm after it)
        self.norm_after: dict[str, str] = {}  # conv path -> the first BatchNorm that receives its output
        self.smooth_input: set[str] = set()  # convs whose input came out of a size-changing smoothing resize
        self.sums: list[_Sum] = []
        self.stack: list[str] = []

    def _record(self, t: Tensor) -> int:
        self.keep.append(t)
        return id(t)

    def smoothed(self, t: Tensor) -> bool:
        mode, changed = self.resized.get(id(t), (None, False))
        return mode in SMOOTHING_MODES and changed

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor):
            return out
        name = getattr(func, "__name__", None)
        ins = [a for a in args if isinstance(a, Tensor)]
        linear = None
        if func is F.interpolate:
            bound = _INTERPOLATE_SIG.bind(*args, **kwargs)
            x, mode = bound.arguments["input"], bound.arguments.get("mode", "nearest")
            changed = tuple(x.shape[2:]) != tuple(out.shape[2:])
            self.resized[self._record(out)] = (str(mode), changed)
            src = self.linear.get(id(x))
            if src is not None:  # a resize is linear and keeps constants: still a sum of the same layers
                linear = _Linear(src.leaves, src.smooth or (str(mode) in SMOOTHING_MODES and changed))
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
        elif name in _PASSTHROUGH:
            for a in ins:
                if id(a) in self.resized and a.shape == out.shape:
                    self.resized[self._record(out)] = self.resized[id(a)]
                    break
            if name in _ADDS and len(ins) == 2 and out.dim() == 4 and ins[0].shape == ins[1].shape == out.shape:
                linear = self._sum(ins[0], ins[1])
        # an in-place op (ReLU(inplace=True), +=) returns its input: it is no longer what it was
        self.linear.pop(id(out), None)
        self.conv_out.pop(id(out), None)
        if linear is not None:
            self.linear[self._record(out)] = linear
        return out

    def _sum(self, a: Tensor, b: Tensor) -> Optional[_Linear]:
        """``a + b`` where both addends are sums of conv outputs: record it; a fusion when an addend was
        resized. The sum's own output starts unresized (a later ``+`` of it is a residual, not a fusion)."""
        la, lb = self.linear.get(id(a)), self.linear.get(id(b))
        if la is None or lb is None:
            return None
        leaves = tuple(dict.fromkeys(la.leaves + lb.leaves))
        if la.smooth or lb.smooth:
            self.sums.append(_Sum(self.stack[-1] if self.stack else "", leaves))
        return _Linear(leaves, False)

    # ---------------------------------------------------------------- module hooks
    def pre_hook(self, name: str, module: nn.Module, args: tuple) -> None:
        self.stack.append(name)
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None:
            return
        c = self.concats.get(id(x))
        if c is not None and c.consumer is None:
            c.consumer = name
        if isinstance(module, nn.Conv2d):
            if c is not None and c.conv is None:
                c.conv = name
            if self.smoothed(x) or (id(x) in self.linear and self.linear[id(x)].smooth):
                self.smooth_input.add(name)
        elif isinstance(module, _BatchNorm) and id(x) in self.conv_out:
            self.norm_after.setdefault(self.conv_out[id(x)], name)

    def post_hook(self, name: str, module: nn.Module, args: tuple, out: object) -> None:
        if self.stack and self.stack[-1] == name:
            self.stack.pop()
        if isinstance(module, nn.Conv2d) and isinstance(out, Tensor):
            self.conv_out[self._record(out)] = name
            self.linear[id(out)] = _Linear((name,), name in self.smooth_input)

    def fold_target(self, model: nn.Module, conv: Optional[str]) -> tuple[Optional[str], Optional[str]]:
        """(conv, norm) when ``conv`` can take a fold: a BatchNorm over its output follows it, or it has a bias."""
        if conv is None:
            return None, None
        m = model.get_submodule(conv)
        norm = self.norm_after.get(conv)
        if norm is not None and getattr(model.get_submodule(norm), "num_features", None) == m.out_channels:
            return conv, norm
        return (conv, None) if m.bias is not None else (None, None)


def _example_input(model: nn.Module, size: int = 64) -> Tensor:
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    in_ch = int(getattr(getattr(model, "encoder", None), "_in_channels", 0) or (first.in_channels if first else 3))
    p = next(iter(model.parameters()), None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, in_ch, size, size, generator=g)
    return x.to(p.device) if p is not None else x


@torch.no_grad()
def probe(model: nn.Module, example_input: Optional[Tensor] = None, all_concats: bool = False,
          sums: bool = False) -> list[Site]:
    """Find fusion sites by tracing one forward pass (eval mode, no grad; nothing in the model changes).

    Every 4-D channel concat is recorded with the module that first receives it as its first argument
    and, per branch, whether it came out of an interpolation. A concat is a fusion site when it has a
    consumer, at least two non-empty branches and a branch resized by a smoothing mode
    (:data:`SMOOTHING_MODES`) to a new size. Its fold target is found by data flow, whatever the
    attribute names: the first Conv2d that receives the concat tensor itself and the BatchNorm that
    receives that conv's output. ``all_concats=True`` also returns the other concats that have a
    consumer (e.g. a Unet with nearest upsampling), to pick from and pass to :func:`equalize` as
    ``sites=``.

    ``sums=True`` also returns sum fusions ``a + b`` whose addends are each the output of a Conv2d (or a
    bilinear resize of one, or a sum of such), with an addend resized by a smoothing mode: a sum of
    linear layers is one linear layer over the concat of their inputs (``L1(x1) + L2(x2) = [L1 L2]
    cat[x1, x2]``), so each layer's input is a branch. One single-branch site per such layer
    (consumer = the layer, ``fusion`` = where the sum ran). ``example_input`` defaults to one random
    64x64 image.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"densefuse.smp.probe expects an nn.Module, got {type(model).__name__}")
    x = _example_input(model) if example_input is None else example_input
    tracer = _Tracer()

    def pre(name: str) -> Callable:
        return lambda module, args: tracer.pre_hook(name, module, args)

    def post(name: str) -> Callable:
        return lambda module, args, out: tracer.post_hook(name, module, args, out)

    training = [(m, m.training) for m in model.modules()]
    # An already equalized model: let its equalizers pass the concat through untouched (same tensor).
    eq_state = [(eq, eq.observing, eq._sums.clone(), list(eq.ratios)) for _, eq in equalizers(model)]
    named = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_pre_hook(pre(n), prepend=True) for n, m in named]
    handles += [m.register_forward_hook(post(n), prepend=True) for n, m in named]
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
        for eq, observing, sums_, ratios in eq_state:
            eq.observing = observing
            eq._sums.copy_(sums_)
            eq.ratios = ratios
    out = []
    for c in tracer.concats.values():
        if c.consumer is None or c.consumer.split(".")[0] == CONTAINER:
            continue
        nonempty = sum(1 for ch, _, _ in c.parts if ch > 0)
        if nonempty < 2 or (not all_concats and not any(smooth for _, _, smooth in c.parts)):
            continue
        conv, norm = tracer.fold_target(model, c.conv)
        out.append(Site(c.consumer, tuple(ch for ch, _, _ in c.parts), tuple(up for _, up, _ in c.parts), conv, norm))
    if sums:
        out.extend(_sum_sites(model, tracer))
    return out


def _sum_sites(model: nn.Module, tracer: _Tracer) -> list[Site]:
    """One single-branch site per conv that ends an addend of a recorded sum fusion (each conv once)."""
    out: dict[str, Site] = {}
    for s in tracer.sums:
        for leaf in s.leaves:
            if leaf in out:
                continue
            conv = model.get_submodule(leaf)
            out[leaf] = Site(leaf, (int(conv.in_channels),), (leaf in tracer.smooth_input,), conv=leaf,
                             fusion=f"{s.where or type(model).__name__} (+)", center=conv.bias is not None)
    return list(out.values())


def sites(model: nn.Module, source: str = "auto", example_input: Optional[Tensor] = None,
          sums: bool = False) -> list[Site]:
    """Fusion sites of ``model``: ``"table"``, ``"probe"``, or ``"auto"`` (the table when the
    architecture is listed, else the probe); ``sums=True`` adds the sum-fusion sites of the probe.
    Raises :class:`ConfigError` when none is found."""
    if source not in ("auto", "table", "probe"):
        raise ConfigError(f"unknown site source '{source}'; choose auto, table or probe")
    arch = _smp_class_name(model)
    reason = ""
    found: Optional[list[Site]] = None
    if source in ("auto", "table") and arch is not None:
        try:
            found = TABLE[arch](model)
        except NotInTable as e:
            reason = str(e)
    if found is None and source == "table":
        raise ConfigError(
            reason or f"{type(model).__name__} is not in the fusion-site table (listed: {', '.join(TABLE)}); "
            "use source='probe'"
        )
    if found is None or sums:
        probed = probe(model, example_input, sums=sums)
        concats = [s for s in probed if s.fusion is None]
        found = (concats if found is None else found) + [s for s in probed if s.fusion is not None]
    if not found:
        raise ConfigError(
            f"no fusion site found in {type(model).__name__}: "
            + (reason or "no channel concat of a bilinearly resized feature reaches a module "
               "(sum fusions whose addends end in a conv, as in DPT, are found with sums=True; sums after a "
               f"norm and activation, as in PAN, Linknet or FPN-add, are not; table: {', '.join(TABLE)})")
        )
    return found
