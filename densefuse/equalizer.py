"""Scale equalizers: frozen per-branch ``(x - mu_i) / sigma_i`` at a multi-level fusion site.

Bilinear upsampling keeps a feature's mean but lowers its variance (Kim & Kim, TMLR 2024, Thm. 3.2),
so the branches a decoder concatenates reach the fusion conv at unequal scales. A
:class:`ScaleEqualizer` holds one scalar mean and std per branch, measured once over training
images by :func:`calibrate` and then frozen. Three modes:

``off``       identity (the baseline); calibration still measures, so reports work.
``explicit``  the affine runs in the forward pass (default; keeps the gradients of the paper's model).
``fold``      Algorithm 1: the fusion conv's input-channel slices are divided by sigma once (:func:`fold`);
              the forward is then the identity.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import CalibrationError

MODES = ("off", "explicit", "fold")


class ScaleEqualizer(nn.Module):
    """Per-branch frozen standardisation for one fusion site.

    Args:
        groups: channel count of every branch, in concat order.
        mode: ``"off"``, ``"explicit"`` or ``"fold"``.
        eps: a branch whose std is below ``eps`` is treated as dead (constant): it keeps std 1
            and a warning is issued, instead of being amplified by 1/eps.

    Buffers ``mean``, ``std``, ``calibrated`` and ``folded`` are saved in the state_dict; the float64
    running sums used while calibrating are not.
    """

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
        self.register_buffer("_sums", torch.zeros(3, n, dtype=torch.float64), persistent=False)
        # channel count per branch as a device tensor, so the per-channel expansion needs no host copy
        self.register_buffer("_group_sizes", torch.tensor(groups, dtype=torch.long), persistent=False)
        self.observing = False
        self.ratios: list[Optional[tuple[float, float]]] = [None] * n
        # Python mirrors of the bool buffers: no tensor reads in forward (torch.compile friendly).
        self._is_calibrated = False
        self._is_folded = False
        self._target: Optional[tuple[nn.Conv2d, Optional[nn.Module]]] = None
        #: name of the site in reports; ``None`` uses the owning module's path
        self.label: Optional[str] = None

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

    def attach(self, conv: nn.Conv2d, norm: Optional[nn.Module] = None) -> None:
        """Name the fusion conv (and the norm right after it) that :meth:`fold` rescales."""
        if conv.in_channels != sum(self.groups):
            raise ValueError(
                f"fusion conv has {conv.in_channels} input channels, the branches sum to {sum(self.groups)}"
            )
        self._target = (conv, norm)

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

    def _check_ready(self) -> None:
        if not self._is_calibrated:
            raise CalibrationError(
                f"scale equalizer in mode '{self.mode}' is not calibrated; run densefuse.calibrate(model, batches) "
                "first (or use mode 'off')"
            )
        if self.mode == "fold" and not self._is_folded:
            raise CalibrationError("scale equalizer in mode 'fold' is calibrated but not folded; run densefuse.fold(model)")

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self._sums.zero_()
        self.ratios = [None] * self.num_groups

    @torch.no_grad()
    def observe(self, index: int, x: Tensor, ratio: Optional[tuple[float, float]] = None) -> None:
        """Add branch ``index`` (already resized to the fusion size) to the running float64 sums."""
        if x.numel() == 0:
            return
        s = self._sums
        s[0, index] += x.numel()
        s[1, index] += x.sum(dtype=torch.float64)
        s[2, index] += x.float().square().sum(dtype=torch.float64)
        if ratio is not None:
            self.ratios[index] = ratio

    def observe_concat(self, x: Tensor) -> None:
        """Observe every branch of an already concatenated tensor."""
        for i, part in enumerate(torch.split(x, self.groups, dim=1)):
            self.observe(i, part)

    def measured(self) -> tuple[Tensor, Tensor, Tensor]:
        """(count, mean, var) per branch from the running sums, summed over ranks under torch.distributed."""
        sums = self._sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        n = sums[0]
        safe_n = n.clamp_min(1)
        mean = sums[1] / safe_n
        var = (sums[2] / safe_n - mean.square()).clamp_min(0)
        return n, mean, var

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
        if self.observing or self.mode == "off":
            return x
        self._check_ready()
        if self.mode == "fold":
            return x
        return (x - self.mean[index].to(x.dtype)) / self.std[index].to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Equalize an already concatenated tensor (channels in ``groups`` order)."""
        if self.observing:
            self.observe_concat(x)
            return x
        if self.mode == "off":
            return x
        self._check_ready()
        if self.mode == "fold":
            return x
        scale, shift = self.channel_affine()
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def channel_affine(self) -> tuple[Tensor, Tensor]:
        """Per-channel (scale, shift) with ``x * scale + shift == (x - mean_i) / std_i``."""
        total = sum(self.groups)
        scale = (1.0 / self.std).repeat_interleave(self._group_sizes, output_size=total)
        shift = (-self.mean / self.std).repeat_interleave(self._group_sizes, output_size=total)
        return scale, shift

    # ------------------------------------------------------------------ fold
    @torch.no_grad()
    def fold(self) -> None:
        """Algorithm 1: scale the fusion conv's input slices by 1/std and switch to mode ``fold``.

        The mean term becomes a per-output-channel constant ``c``. It goes into the conv bias when
        there is one, else into the following BatchNorm's ``running_mean`` (exact in eval); in train
        mode BatchNorm removes it anyway. Zero padding of a 3x3 conv makes the border differ.
        """
        if self._is_folded:
            raise CalibrationError("this fusion site is already folded; folding twice would rescale twice")
        if not self._is_calibrated:
            raise CalibrationError("cannot fold an uncalibrated scale equalizer; run densefuse.calibrate first")
        if self._target is None:
            raise CalibrationError("no fusion conv is attached to this scale equalizer; nothing to fold into")
        conv, norm = self._target
        scale, shift = self.channel_affine()
        w = conv.weight
        if conv.groups == 1:
            w.mul_(scale.to(w).view(1, -1, 1, 1))
        elif conv.groups == conv.in_channels:  # depthwise: one row block per input channel
            mult = conv.out_channels // conv.in_channels
            w.mul_(scale.to(w).repeat_interleave(mult).view(-1, 1, 1, 1))
        else:
            raise CalibrationError(f"cannot fold into a grouped conv with groups={conv.groups}")
        self._absorb_offset(self._mean_offset(conv))
        self.folded.fill_(True)
        self._is_folded = True
        self.mode = "fold"

    def _mean_offset(self, conv: nn.Conv2d) -> Tensor:
        """Per-output-channel constant that the (already rescaled) ``conv`` adds for the mean term:
        the conv of a constant map holding each branch's mean, without padding."""
        kh, kw = conv.kernel_size
        dh, dw = conv.dilation
        w = conv.weight
        mean_map = self.mean.repeat_interleave(self._group_sizes, output_size=sum(self.groups))
        const = mean_map.to(w).view(1, -1, 1, 1).expand(1, -1, (kh - 1) * dh + 1, (kw - 1) * dw + 1)
        return F.conv2d(const, w, None, 1, 0, conv.dilation, conv.groups).flatten()

    def _absorb_offset(self, c: Tensor) -> None:
        """Remove the mean term ``c`` from the fusion conv's output: into its bias, or its BatchNorm's
        running mean. Subclasses whose conv feeds another linear op first override this."""
        conv, norm = self._target  # type: ignore[misc]
        absorb_offset(c, conv, norm)


def absorb_offset(c: Tensor, conv: nn.Conv2d, norm: Optional[nn.Module]) -> None:
    """Make ``conv`` (and the ``norm`` after it) output ``y - c``: bias when present, else BN running mean."""
    if conv.bias is not None:
        conv.bias.sub_(c.to(conv.bias))
    elif isinstance(norm, _BatchNorm) and norm.running_mean is not None:
        norm.running_mean.add_(c.to(norm.running_mean))


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise CalibrationError(f"unknown equalizer mode '{mode}'; choose one of {', '.join(MODES)}")
    return mode


def find_fold_target(module: nn.Module) -> tuple[nn.Conv2d, Optional[nn.Module]]:
    """First Conv2d in ``module`` and the BatchNorm that directly follows it (or None)."""
    mods = list(module.modules())
    for i, m in enumerate(mods):
        if isinstance(m, nn.Conv2d):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            norm = nxt if isinstance(nxt, _BatchNorm) and nxt.num_features == m.out_channels else None
            return m, norm
    raise ValueError(f"no Conv2d found in {type(module).__name__}")


# ---------------------------------------------------------------------- model-level API
def equalizers(model: nn.Module) -> Iterator[tuple[str, ScaleEqualizer]]:
    """Every (name, ScaleEqualizer) in ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, ScaleEqualizer):
            yield name, m


def site_name(name: str, eq: Optional[ScaleEqualizer] = None) -> str:
    """Report name of a site: the equalizer's ``label``, else the owning module's path."""
    if eq is not None and eq.label:
        return eq.label
    return name[: -len(".equalizer")] if name.endswith(".equalizer") else name


def set_mode(model: nn.Module, mode: str) -> None:
    """Set the mode of every equalizer in ``model``."""
    for _, eq in equalizers(model):
        eq.set_mode(mode)


def _images(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("image", "img", "input", "x"):
            if key in batch:
                return batch[key]
        raise CalibrationError(f"calibration batch dict has no 'image' key (keys: {sorted(batch)})")
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise CalibrationError(f"cannot take images from a calibration batch of type {type(batch).__name__}")


@contextmanager
def _observing(model: nn.Module) -> Iterator[list[tuple[str, ScaleEqualizer]]]:
    """Train-mode BN, no grad, every equalizer observing; restore BN buffers and train/eval modes after."""
    eqs = list(equalizers(model))
    if not eqs:
        raise CalibrationError("the model has no scale equalizers (build it with densefuse or densefuse.smp.equalize)")
    modes = [(m, m.training) for m in model.modules()]
    bn_state = [
        (m, {k: v.clone() for k, v in m._buffers.items() if v is not None})
        for m in model.modules()
        if isinstance(m, _BatchNorm)
    ]
    for _, eq in eqs:
        eq.reset_stats()
        eq.observing = True
    model.train()
    try:
        with torch.no_grad():
            yield eqs
    finally:
        for _, eq in eqs:
            eq.observing = False
        for m, bufs in bn_state:
            for k, v in bufs.items():
                m._buffers[k].copy_(v)
        for m, training in modes:
            m.training = training


def _run(model: nn.Module, batches: Iterable[Any], num_images: Optional[int],
         forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> int:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    for batch in batches:
        if forward is None:
            x = _images(batch).to(device, non_blocking=True)
            model(x)
        else:  # the task's forward: the model may take more than the image (depth: RGB + ground embedding)
            x = _images(batch)
            forward(model, batch)
        seen += x.shape[0]
        if num_images is not None and seen >= num_images:
            break
    if seen == 0:
        raise CalibrationError("calibration got no images (empty dataset or loader)")
    return seen


def _rows(eqs: list[tuple[str, ScaleEqualizer]], measured: list[tuple[Tensor, Tensor, Tensor]]) -> pd.DataFrame:
    rows = []
    for (name, eq), (_, mean, var) in zip(eqs, measured):
        for i, g in enumerate(eq.groups):
            std = math.sqrt(float(var[i]))
            active = eq.mode != "off" and eq._is_calibrated
            mu, sd = (float(eq.mean[i]), float(eq.std[i])) if active else (0.0, 1.0)
            ratio = eq.ratios[i] or (float("nan"), float("nan"))
            rows.append(
                {
                    "site": site_name(name, eq),
                    "branch": i,
                    "channels": g,
                    "ratio_h": ratio[0],
                    "ratio_w": ratio[1],
                    "mean": float(mean[i]),
                    "std": std,
                    "var_before": float(var[i]),
                    "mean_after": (float(mean[i]) - mu) / sd,
                    "std_after": std / sd,
                    "var_after": float(var[i]) / sd**2,
                    "mode": eq.mode,
                }
            )
    return pd.DataFrame(rows)


def calibrate(model: nn.Module, batches: Iterable[Any], num_images: Optional[int] = None,
              forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> pd.DataFrame:
    """Measure and freeze the per-branch mean/std of every fusion site in one pass.

    BatchNorm runs in train mode (batch statistics, as in training) under ``no_grad``; BN running
    stats and every module's train/eval mode are restored afterwards. ``batches`` yields image
    tensors, dicts with an ``"image"`` key, or tuples whose first item is the images.
    ``num_images=None`` uses every batch (Algorithm 1 uses the whole training set). ``forward(model,
    batch)`` calls the model on a batch (e.g. ``task.forward``); by default the model gets the images.

    Returns one row per (site, branch): upsample ratio, mean, std, variance before and after.
    """
    with _observing(model) as eqs:
        _run(model, batches, num_images, forward)
    measured = [eq.measured() for _, eq in eqs]  # one all-reduce per site under torch.distributed
    for (name, eq), stats in zip(eqs, measured):
        dead = eq.finish_calibration(stats)
        for i in dead:
            warnings.warn(
                f"fusion site '{site_name(name, eq)}' branch {i} is constant (std < {eq.eps}); it is left unscaled",
                stacklevel=2,
            )
    return _rows(eqs, measured)


def measure(model: nn.Module, batches: Iterable[Any], num_images: Optional[int] = None,
            forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> pd.DataFrame:
    """Like :func:`calibrate` but changes nothing: the std of every concat subject before and after
    equalization with the current (frozen) stats. ``after == before`` for mode ``off``."""
    with _observing(model) as eqs:
        _run(model, batches, num_images, forward)
    return _rows(eqs, [eq.measured() for _, eq in eqs])


def fold(model: nn.Module) -> nn.Module:
    """Fold every calibrated equalizer in ``model`` into its fusion conv (paper's Algorithm 1)."""
    eqs = list(equalizers(model))
    if not eqs:
        raise CalibrationError("the model has no scale equalizers to fold")
    if any(eq._is_folded for _, eq in eqs):
        raise CalibrationError("the model is already folded; folding twice would rescale the fusion convs twice")
    for name, eq in eqs:  # check every site first so a refusal leaves the model untouched
        if eq._target is None:
            raise CalibrationError(f"fusion site '{site_name(name, eq)}' has no conv to fold into; use mode 'explicit'")
        if not eq._is_calibrated:
            raise CalibrationError(f"fusion site '{site_name(name, eq)}' is not calibrated; run densefuse.calibrate first")
    for _, eq in eqs:
        eq.fold()
    return model
