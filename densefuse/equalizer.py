"""Scale equalizers: frozen per-branch ``(x - mu_i) / sigma_i`` at a multi-level fusion site.

Bilinear upsampling keeps a feature's mean but lowers its variance (Kim & Kim, TMLR 2024, Thm. 3.2),
so the branches a decoder concatenates reach the fusion conv at unequal scales. A
:class:`ScaleEqualizer` holds one scalar mean and std per branch, measured once over training
images by :func:`densefuse.calibrate` and then frozen. Three modes:

``off``       identity (the baseline); calibration still measures, so reports work.
``explicit``  the affine runs in the forward pass (default; keeps the gradients of the paper's model).
``fold``      Algorithm 1: the fusion conv's input-channel slices are divided by sigma once
              (:func:`densefuse.fold`); the forward is then the identity.

An equalizer holds no reference to the conv it folds into: :func:`densefuse.fold` looks the conv up
when it runs (:meth:`ScaleEqualizer.fold_target`), so folding stays right after SyncBatchNorm
conversion, DDP or ``torch.compile`` wrapping, or loading a state_dict into a fresh model.
The model-level functions (calibrate, measure, fold, ...) live in :mod:`densefuse.calibration`.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import CalibrationError

MODES = ("off", "explicit", "fold")
#: model-level functions kept importable from here (they live in densefuse.calibration)
@dataclass(frozen=True)
class FoldTarget:
    """Where a site folds to, looked up when :func:`densefuse.fold` runs.

    Attributes:
        conv: the first conv applied to the concat; its input-channel slices are scaled by 1/std.
        norm: BatchNorm after ``conv`` (or after ``pointwise``) whose running mean takes the mean term
            when the conv has no bias.
        pointwise: for a depthwise ``conv``, the bias-free 1x1 conv between it and ``norm``; the
            mean term passes through it.
    """

    conv: nn.Conv2d
    norm: Optional[nn.Module] = None
    pointwise: Optional[nn.Conv2d] = None


class _SiteTrace:
    """What one traced forward records for a site: a zero leaf added to its output, and which
    sites' leaves reach its input (see :func:`densefuse.calibration.calibrate`)."""

    def __init__(self, index: int, leaves: dict[int, int]) -> None:
        self.index = index
        self.leaf = torch.zeros((), requires_grad=True)
        self.leaves = leaves  # id(leaf) -> site index, shared by every site of the trace
        self.leaves[id(self.leaf)] = index
        self.sources: set[int] = set()

    def record(self, x: Tensor) -> None:
        """Add the sites whose leaf is an autograd ancestor of ``x``."""
        stack = [x.grad_fn] if x.grad_fn is not None else []
        seen: set[int] = set()
        while stack:
            fn = stack.pop()
            if fn is None or id(fn) in seen:
                continue
            seen.add(id(fn))
            var = getattr(fn, "variable", None)
            if var is not None and id(var) in self.leaves:
                self.sources.add(self.leaves[id(var)])
            stack.extend(f for f, _ in fn.next_functions)


#: validity (B, 1, H, W) of the input pixels while calibrating or measuring (None: every pixel counts)
_VALID: ContextVar[Optional[Tensor]] = ContextVar("densefuse_valid_pixels", default=None)


@contextmanager
def valid_pixels(valid: Optional[Tensor]) -> Iterator[None]:
    """Within this context, fusion statistics count only positions that lie wholly on valid input pixels.

    ``valid`` is (B, 1, H, W) (bool or 0/1) at the input resolution, False on padding (e.g. a training crop
    padded to the crop size). A branch position of a fusion of size (h, w) counts when the area-pooled
    validity under it is 1, so padded pixels do not enter the calibration statistics.
    """
    token = _VALID.set(valid)
    try:
        yield
    finally:
        _VALID.reset(token)


def valid_positions(valid: Tensor, size: Sequence[int]) -> Tensor:
    """(B, h, w) bool: positions of an (h, w) map whose area-pooled input validity is 1."""
    v = valid if valid.ndim == 4 else valid.unsqueeze(1)
    pooled = F.adaptive_avg_pool2d(v.float(), tuple(int(s) for s in size))
    return pooled[:, 0] >= 1.0 - 1e-6


def on_valid(x: Tensor) -> Tensor:
    """``x`` (B, C, h, w), or under :func:`valid_pixels` its values at the valid positions, (C, N)."""
    valid = _VALID.get()
    if valid is None:
        return x
    if valid.shape[0] != x.shape[0]:
        raise CalibrationError(f"the validity mask has {valid.shape[0]} samples, the features {x.shape[0]}")
    keep = valid_positions(valid.to(x.device), x.shape[-2:])
    return x.transpose(0, 1)[:, keep]


class ScaleEqualizer(nn.Module):
    """Per-branch frozen standardisation for one fusion site.

    Args:
        groups: channel count of every branch, in concat order.
        mode: ``"off"``, ``"explicit"`` or ``"fold"``.
        eps: a branch whose std is below ``eps`` is treated as dead (constant): it keeps std 1
            and a warning is issued, instead of being amplified by 1/eps.

    Buffers ``mean``, ``std``, ``calibrated`` and ``folded`` are saved in the state_dict; the float64
    running sums used while calibrating and measuring are not.

    Besides the normal forward, a site can record: ``observing`` (calibration: pass the input
    through and sum its moments) or ``measuring`` (:func:`densefuse.measure`: run as in the real
    forward and sum the moments of the input and of what the fusion conv effectively sees).
    """

    #: Python-side state; TorchScript does not compile these when a model holding the equalizer is scripted
    __jit_unused_properties__ = ["num_groups", "slices", "is_calibrated", "is_folded", "recording", "active"]

    def __init__(self, groups: Sequence[int], mode: str = "explicit", eps: float = 1e-5) -> None:
        super().__init__()
        groups = tuple(int(g) for g in groups)
        if not groups or any(g < 0 for g in groups):
            raise ValueError(f"groups must be a non-empty list of channel counts, got {groups}")
        self.groups = groups
        self.eps = float(eps)
        self.mode = _check_mode(mode)
        n = len(groups)
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("std", torch.ones(n))
        self.register_buffer("calibrated", torch.tensor(False))
        self.register_buffer("folded", torch.tensor(False))
        # [before, after] x [count, sum, sum of squares] x branch, float64
        self.register_buffer("_sums", torch.zeros(2, 3, n, dtype=torch.float64), persistent=False)
        # channel count per branch as a device tensor, so the per-channel expansion needs no host copy
        self.register_buffer("_group_sizes", torch.tensor(groups, dtype=torch.long), persistent=False)
        # branch index of every channel: the per-channel expansion is one gather (exports to ONNX / TorchScript,
        # unlike repeat_interleave with output_size)
        # (built from a Python list: a model built on the meta device has no values to repeat by)
        self.register_buffer("_channel_group", torch.tensor([i for i, g in enumerate(groups) for _ in range(g)],
                                                            dtype=torch.long), persistent=False)
        self.observing = False
        self.measuring = False
        #: calibrated but unfolded sites in mode fold apply the affine explicitly (calibrate/measure
        #: set this: the folded conv will compute the same, up to zero-padded borders)
        self.emulate_fold = False
        self._trace: Optional[_SiteTrace] = None
        self.ratios: list[Optional[tuple[float, float]]] = [None] * n
        # Python mirrors of the bool buffers: no tensor reads in forward (torch.compile friendly).
        self._is_calibrated = False
        self._is_folded = False
        #: name of the site in reports; ``None`` uses the owning module's path
        self.label: Optional[str] = None
        #: False: a scale-only site (its mean is kept at 0), which folds into a conv without a bias or norm
        self.centered = True

    # ------------------------------------------------------------------ structure
    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def slices(self) -> list[slice]:
        """Channel slice of every branch in the concatenated tensor."""
        out, start = [], 0
        for g in self.groups:
            out.append(slice(start, start + g))
            start += g
        return out

    @property
    def is_calibrated(self) -> bool:
        return self._is_calibrated

    @property
    def is_folded(self) -> bool:
        return self._is_folded

    @property
    def recording(self) -> bool:
        """Whether the forward sums statistics (calibration or measurement)."""
        return self.observing or self.measuring

    def extra_repr(self) -> str:
        return f"groups={self.groups}, mode={self.mode!r}, calibrated={self._is_calibrated}"

    # ------------------------------------------------------------------ state
    def set_mode(self, mode: str) -> None:
        """Switch mode. A folded site cannot be switched back: its conv weights are already scaled."""
        mode = _check_mode(mode)
        if self._is_folded and mode != "fold":
            raise CalibrationError("this site is folded into its conv weights; it cannot change mode")
        self.mode = mode

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._is_calibrated = bool(self.calibrated)
        self._is_folded = bool(self.folded)
        if self._is_folded:
            self.mode = "fold"

    @property
    def active(self) -> bool:
        """Whether the frozen affine is in effect (explicitly, or folded into the conv)."""
        return self.mode != "off" and self._is_calibrated

    def _applies_affine(self) -> bool:
        """Whether the forward itself must apply the affine; raises when the site cannot run."""
        if self.mode == "off":
            return False
        if not self._is_calibrated:
            if self.measuring:
                return False  # measured as it is: nothing to apply yet
            raise CalibrationError(
                f"scale equalizer in mode '{self.mode}' is not calibrated; run densefuse.calibrate(model, batches) "
                "first (or use mode 'off')"
            )
        if self.mode == "explicit":
            return True
        if self._is_folded:
            return False
        if self.emulate_fold:
            return True
        raise CalibrationError("scale equalizer in mode 'fold' is calibrated but not folded; run densefuse.fold(model)")

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self._sums.zero_()
        self.ratios = [None] * self.num_groups

    @torch.no_grad()
    def _add(self, which: int, index: int, x: Tensor) -> None:
        if x.numel() == 0:
            return
        s = self._sums[which]
        s[0, index] += x.numel()
        s[1, index] += x.sum(dtype=torch.float64)
        s[2, index] += x.float().square().sum(dtype=torch.float64)

    def observe(self, index: int, x: Tensor, ratio: Optional[tuple[float, float]] = None) -> None:
        """Add branch ``index`` as it reaches the site (resized to the fusion size) to the sums."""
        if self._trace is not None:
            self._trace.record(x)
        self._add(0, index, x)
        if ratio is not None:
            self.ratios[index] = ratio

    def observe_after(self, index: int, y: Tensor) -> None:
        """Add branch ``index`` as the fusion conv effectively sees it (``y`` is what enters the conv;
        a folded conv applies the affine itself, so it is applied here for the statistics)."""
        if self._is_folded:
            y = (y - self.mean[index].to(y.dtype)) / self.std[index].to(y.dtype)
        self._add(1, index, y)

    def _branches(self, x: Tensor) -> tuple[Tensor, ...]:
        """The branches of a concatenated (B, C, h, w) tensor; under :func:`valid_pixels`
        only their positions that lie wholly on real (unpadded) input pixels, each as (C_i, N)."""
        kept = on_valid(x)
        return torch.split(kept, self.groups, dim=1 if kept.ndim == x.ndim else 0)

    def observe_concat(self, x: Tensor) -> None:
        """Observe every branch of an already concatenated tensor (padding left out, as in a Fusion)."""
        for i, part in enumerate(self._branches(x)):
            self.observe(i, part)

    def observe_concat_after(self, y: Tensor) -> None:
        """Observe what the fusion conv sees of every branch of a concatenated tensor."""
        for i, part in enumerate(self._branches(y)):
            self.observe_after(i, part)

    def reduced_sums(self) -> Tensor:
        """The running sums, summed over ranks under torch.distributed (one all-reduce)."""
        sums = self._sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        return sums

    def measured(self, sums: Optional[Tensor] = None, after: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """(count, mean, var) per branch of the input (or, ``after=True``, of what the conv sees),
        from ``sums`` (default: :meth:`reduced_sums`)."""
        s = (self.reduced_sums() if sums is None else sums)[1 if after else 0]
        n = s[0]
        safe_n = n.clamp_min(1)
        mean = s[1] / safe_n
        var = (s[2] / safe_n - mean.square()).clamp_min(0)
        return n, mean, var

    def mark(self, x: Tensor) -> Tensor:
        """The site's output; while tracing, plus a zero leaf so later sites can see they depend on it."""
        return x if self._trace is None else x + self._trace.leaf

    @torch.no_grad()
    def finish_calibration(self, measured: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> list[int]:
        """Freeze the measured stats (``measured()``, or its result when given) into ``mean``/``std``;
        return the indices of dead branches."""
        if self._is_folded:
            raise CalibrationError("this site is already folded; calibrating again would fold twice")
        n, mean, var = self.measured() if measured is None else (t.clone() for t in measured)
        needed = self._group_sizes > 0
        if bool((needed & (n == 0)).any()):
            raise CalibrationError("a branch of this fusion site was never seen during calibration")
        std = var.sqrt()
        dead = [i for i, g in enumerate(self.groups) if g > 0 and float(std[i]) < self.eps]
        for i in dead:
            std[i] = 1.0
        for i, g in enumerate(self.groups):
            if g == 0:
                mean[i], std[i] = 0.0, 1.0
        self.mean.copy_(mean.to(self.mean))
        self.std.copy_(std.to(self.std))
        self.calibrated.fill_(True)
        self._is_calibrated = True
        return dead

    # ------------------------------------------------------------------ forward
    def branch(self, index: int, x: Tensor) -> Tensor:
        """Equalize branch ``index`` on its own. Exact before a bilinear resize (weights sum to 1)."""
        if self.observing or not self._applies_affine():
            return x
        return (x - self.mean[index].to(x.dtype)) / self.std[index].to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Equalize an already concatenated tensor (channels in ``groups`` order)."""
        if self.observing:
            self.observe_concat(x)
            return self.mark(x)
        y = self.apply(x) if self._applies_affine() else x
        if self.measuring:
            self.observe_concat(x)
            self.observe_concat_after(y)
        return y

    def apply(self, x: Tensor) -> Tensor:
        """The frozen affine on a concatenated tensor, whatever the mode."""
        scale, shift = self.channel_affine()
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def channel_affine(self) -> tuple[Tensor, Tensor]:
        """Per-channel (scale, shift) with ``x * scale + shift == (x - mean_i) / std_i``."""
        index = self._channel_group
        return (1.0 / self.std).index_select(0, index), (-self.mean / self.std).index_select(0, index)

    def runtime_affine(self) -> tuple[Tensor, Tensor]:
        """Per-channel (scale, shift) that the forward applies now: the frozen affine in mode explicit,
        the identity in mode off or once folded (a TorchScript / exported copy bakes this in). Raises
        :class:`CalibrationError` where the forward itself would refuse to run."""
        if self._applies_affine():
            return self.channel_affine()
        total = sum(self.groups)
        return self.std.new_ones(total), self.std.new_zeros(total)

    # ------------------------------------------------------------------ fold
    def fold_target(self, root: nn.Module, name: str) -> FoldTarget:
        """The conv this site folds into, looked up now in ``root`` (where this equalizer is ``name``).

        A plain equalizer asks the module that owns it (a :class:`densefuse.Fusion` answers with the
        first conv of its ``fuse`` block). Raises :class:`CalibrationError` when there is none.
        """
        parent_path = name.rpartition(".")[0]
        parent = root.get_submodule(parent_path) if parent_path else root
        find = getattr(parent, "fold_target", None)
        if find is None or parent is self:
            raise CalibrationError(
                f"fusion site '{parent_path or name}' has no conv to fold into ({type(parent).__name__} does not "
                "name one); use mode 'explicit'"
            )
        return find()

    def check_fold_target(self, target: FoldTarget, site: str) -> None:
        """Raise :class:`CalibrationError` unless ``target`` can take this site's fold exactly."""
        conv = target.conv
        if not isinstance(conv, nn.Conv2d):
            raise CalibrationError(f"fusion site '{site}': the fold target is a {type(conv).__name__}, not a Conv2d")
        if conv.in_channels != sum(self.groups):
            raise CalibrationError(
                f"fusion site '{site}': its conv has {conv.in_channels} input channels, the branches sum to "
                f"{sum(self.groups)}"
            )
        if conv.groups not in (1, conv.in_channels):
            raise CalibrationError(f"fusion site '{site}': cannot fold into a grouped conv with groups={conv.groups}")
        last = target.pointwise if target.pointwise is not None else conv
        if self.centered and last.bias is None and not _absorbing_norm(target.norm):
            raise CalibrationError(
                f"fusion site '{site}': its conv has no bias and no BatchNorm follows it, so the mean term "
                "has nowhere to go; use mode 'explicit'"
            )

    @torch.no_grad()
    def fold(self, target: FoldTarget) -> None:
        """Algorithm 1: scale ``target.conv``'s input slices by 1/std and switch to mode ``fold``.

        The mean term becomes a per-output-channel constant ``c``. It goes into the conv bias when
        there is one, else into the following BatchNorm's ``running_mean`` (exact in eval); in train
        mode BatchNorm removes it anyway. Zero padding of a 3x3 conv makes the border differ
        (see :func:`border_offset`).
        """
        if self._is_folded:
            raise CalibrationError("this fusion site is already folded; folding twice would rescale twice")
        if not self._is_calibrated:
            raise CalibrationError("cannot fold an uncalibrated scale equalizer; run densefuse.calibrate first")
        self.check_fold_target(target, self.label or type(self).__name__)
        conv = target.conv
        scale, _ = self.channel_affine()
        w = conv.weight
        if conv.groups == 1:
            w.mul_(scale.to(w).view(1, -1, 1, 1))
        else:  # depthwise: one row block per input channel
            mult = conv.out_channels // conv.in_channels
            w.mul_(scale.to(w).repeat_interleave(mult).view(-1, 1, 1, 1))
        if self.centered:  # a scale-only site has no mean term
            c = self._mean_offset(conv)
            if target.pointwise is not None:
                pw = target.pointwise
                absorb_offset(pw.weight.flatten(1) @ c.to(pw.weight), pw, target.norm)
            else:
                absorb_offset(c, conv, target.norm)
        self.folded.fill_(True)
        self._is_folded = True
        self.mode = "fold"

    def _mean_offset(self, conv: nn.Conv2d) -> Tensor:
        """Per-output-channel constant that the (already rescaled) ``conv`` adds for the mean term:
        the conv of a constant map holding each branch's mean, without padding."""
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        w = conv.weight
        mean_map = self.mean.index_select(0, self._channel_group)
        const = mean_map.to(w).view(1, -1, 1, 1).expand(1, -1, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
        return F.conv2d(const, w, None, 1, 0, conv.dilation, conv.groups).flatten()


@torch.no_grad()
def border_offset(eq: ScaleEqualizer, conv: nn.Conv2d, size: Sequence[int]) -> Tensor:
    """What folding changes in ``conv``'s output (1, C_out, H, W) for an input of ``size``.

    Explicit mode pads the *equalized* input with zeros (``x = mu``); the folded conv pads the raw
    input with zeros (``(x - mu) / sigma = -mu / sigma``). So the folded output differs by
    ``-sum over the padded taps of W * mu / sigma``: zero in the interior, and at most
    ``sum_k |sum_c W[o,c,k] mu_c / sigma_c|`` over the outside taps at the border. ``conv`` is the
    unfolded conv (weights as before folding).
    """
    _, shift = eq.channel_affine()
    w = conv.weight
    h, wd = (int(s) for s in size)
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    b = shift.to(w).view(1, -1, 1, 1)  # -mu / sigma per channel
    padded = F.conv2d(b.expand(1, -1, h, wd), w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    full = F.conv2d(b.expand(1, -1, (kh - 1) * dh + 1, (kw - 1) * dw + 1), w, None, 1, 0, conv.dilation, conv.groups)
    return full - padded


def _absorbing_norm(norm: Optional[nn.Module]) -> bool:
    return isinstance(norm, _BatchNorm) and norm.running_mean is not None


def absorb_offset(c: Tensor, conv: nn.Conv2d, norm: Optional[nn.Module]) -> None:
    """Make ``conv`` (and the ``norm`` after it) output ``y - c``: bias when present, else BN running mean."""
    if conv.bias is not None:
        conv.bias.sub_(c.to(conv.bias))
    elif _absorbing_norm(norm):
        norm.running_mean.add_(c.to(norm.running_mean))  # type: ignore[union-attr]
    else:
        raise CalibrationError("the fusion conv has no bias and no BatchNorm follows it; the mean term cannot be folded")


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise CalibrationError(f"unknown equalizer mode '{mode}'; choose one of {', '.join(MODES)}")
    return mode


def find_fold_target(module: nn.Module) -> Optional[FoldTarget]:
    """First Conv2d in ``module`` and the BatchNorm that directly follows it (or None); None without a conv."""
    mods = list(module.modules())
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            norm = nxt if isinstance(nxt, _BatchNorm) and nxt.num_features == m.out_channels else None
            return FoldTarget(m, norm)
    return None
