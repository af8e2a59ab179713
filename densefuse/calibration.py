"""Calibrate, measure and fold the scale equalizers of a model.

:func:`calibrate` measures every fusion site's per-branch mean/std in dependency order, so that a
site downstream of another (UPerHead's FPN fusion after its PPM fusion, a decoder that chains
fusions) is measured on the features it really gets once the upstream sites equalize.
:func:`measure` observes the live forward. :func:`fold` looks every site's conv up when it runs.

All three accept any model whose fusion sites are :class:`~densefuse.equalizer.ScaleEqualizer`
modules: densefuse models (one per :class:`~densefuse.Fusion`) and smp models after
:func:`densefuse.smp.equalize`, also when wrapped (DDP's ``module``, ``torch.compile``'s ``_orig_mod``).
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Callable, Optional, Union

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from .equalizer import FoldTarget, ScaleEqualizer, _SiteTrace, valid_pixels
from .errors import CalibrationError

__all__ = ["calibrate", "equalizers", "fold", "measure", "set_mode", "site_name"]

Forward = Callable[[nn.Module, Any], Any]
#: batches: an iterable of batches, or a function returning a fresh iterable (called once per pass)
Batches = Union[Iterable[Any], Callable[[], Iterable[Any]]]
#: stochastic-depth modules switched off like dropout while calibrating/measuring (timm's names)
_DROP_LIKE = ("DropPath", "DropBlock2d")


# ---------------------------------------------------------------------- model-level helpers
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


def _valid(batch: Any) -> Optional[Tensor]:
    """The batch's ``valid`` mask (B, 1, H, W), False on padding; None when it has none."""
    v = batch.get("valid") if isinstance(batch, dict) else None
    return v if isinstance(v, Tensor) else None


def _check_num_images(num_images: Optional[int]) -> None:
    if num_images is not None and (isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1):
        raise CalibrationError(
            f"num_images must be a positive number of images (or None for every batch), got {num_images!r}"
        )


def _site_list(model: nn.Module) -> list[tuple[str, ScaleEqualizer]]:
    eqs = list(equalizers(model))
    if not eqs:
        raise CalibrationError("the model has no scale equalizers (build it with densefuse or densefuse.smp.equalize)")
    return eqs


class _Batches:
    """The calibration batches, replayable for a second pass.

    A function is called once per pass; a list, DataLoader or other re-iterable is iterated again;
    a one-shot iterator (a generator) is kept in memory during the first pass when more passes follow.
    """

    def __init__(self, batches: Batches) -> None:
        self._factory: Optional[Callable[[], Iterable[Any]]] = None
        self._once: Optional[Iterator[Any]] = None
        if isinstance(batches, Iterator):
            self._once = batches
        elif isinstance(batches, Iterable):
            self._factory = lambda: batches
        elif callable(batches):
            self._factory = batches
        else:
            raise CalibrationError(f"calibration batches must be an iterable of batches, got {type(batches).__name__}")
        self.keep = True
        self._cache: list[Any] = []

    def first(self) -> Iterator[Any]:
        if self._factory is not None:
            yield from self._factory()
            return
        assert self._once is not None
        for b in self._once:
            if self.keep:
                self._cache.append(b)
            yield b

    def again(self) -> Iterator[Any]:
        return iter(self._factory()) if self._factory is not None else iter(self._cache)

    def drop_cache(self) -> None:
        self.keep = False
        self._cache.clear()


@contextmanager
def _recording(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm, dropout and drop-path off, no grad; BN buffers, train/eval flags and the
    equalizers' recording flags restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    bn_state = [
        (m, {k: v.clone() for k, v in m._buffers.items() if v is not None})
        for m in model.modules()
        if isinstance(m, _BatchNorm)
    ]
    model.train()
    for m in model.modules():
        if isinstance(m, _DropoutNd) or type(m).__name__ in _DROP_LIKE:
            m.eval()
    eqs = [eq for _, eq in equalizers(model)]
    try:
        with torch.no_grad():
            yield
    finally:
        for eq in eqs:
            eq.observing = eq.measuring = eq.emulate_fold = False
            eq._trace = None
        for m, bufs in bn_state:
            for k, v in bufs.items():
                m._buffers[k].copy_(v)
        for m, training in modes:
            m.training = training


def _run(model: nn.Module, batches: Iterable[Any], num_images: Optional[int], forward: Optional[Forward],
         first: Optional[Callable[[Any], None]] = None) -> int:
    """Feed batches until ``num_images`` (whole batches); ``first(batch)`` runs the first one instead."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    seen = 0
    for batch in batches:
        x = _images(batch)
        with valid_pixels(_valid(batch)):
            if first is not None and seen == 0:
                first(batch)
            elif forward is None:
                model(x.to(device, non_blocking=True))
            else:  # the task's forward: the model may take more than the image (depth: RGB + ground embedding)
                forward(model, batch)
        seen += x.shape[0]
        if num_images is not None and seen >= num_images:
            break
    if seen == 0:
        raise CalibrationError("calibration got no images (empty dataset or loader)")
    return seen


def _call(model: nn.Module, batch: Any, forward: Optional[Forward]) -> None:
    if forward is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        model(_images(batch).to(device, non_blocking=True))
    else:
        forward(model, batch)


def _trace_levels(model: nn.Module, eqs: list[ScaleEqualizer], batch: Any, forward: Optional[Forward]) -> list[int]:
    """Run ``batch`` once with every site observing and return each site's level in the site graph.

    Every site adds a zero scalar leaf to its output; a site's input reaches back (through autograd)
    to the leaves of the sites upstream of it. Parameters stop requiring grad meanwhile, so the graph
    holds only what lies downstream of a site. Level 0: no active (mode != off) upstream site;
    level k: the deepest active upstream site is at level k - 1.
    """
    leaves: dict[int, int] = {}
    traces = [_SiteTrace(k, leaves) for k in range(len(eqs))]
    params = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in params:
            p.requires_grad_(False)
        for eq, t in zip(eqs, traces):
            eq._trace = t
        with torch.enable_grad():
            _call(model, batch, forward)
    finally:
        for eq in eqs:
            eq._trace = None
        for p, flag in params:
            p.requires_grad_(flag)
    upstream = [{j for j in t.sources if j != k and eqs[j].mode != "off"} for k, t in enumerate(traces)]
    level = [0] * len(eqs)
    for _ in range(len(eqs)):  # longest path in the DAG (a cycle cannot raise a level past n - 1)
        changed = False
        for k, ups in enumerate(upstream):
            new = max((level[j] + 1 for j in ups), default=0)
            if new > level[k] and new < len(eqs):
                level[k], changed = new, True
        if not changed:
            break
    return level


# ---------------------------------------------------------------------- calibrate
def calibrate(model: nn.Module, batches: Batches, num_images: Optional[int] = None,
              forward: Optional[Forward] = None) -> pd.DataFrame:
    """Measure and freeze the per-branch mean/std of every fusion site, in dependency order.

    Pass 1 runs every batch with every site passing its input through and summing its moments; the
    first batch is also traced to find the site graph (which sites' outputs reach which sites'
    inputs; see :func:`_trace_levels`). Sites with no upstream site are frozen after pass 1. Each
    further pass runs the batches again with the frozen sites equalizing, and freezes the sites whose
    upstream sites are all frozen: one pass per level of the site graph. So every site is measured
    on what it gets in the real forward, and independent sites (PSPNet, DeepLabV3) need one pass.
    Sites in mode ``off`` are measured but change nothing downstream; calibrated sites in mode
    ``fold`` equalize explicitly (the folded conv computes the same, up to zero-padded borders).

    BatchNorm runs in train mode (batch statistics, as in training) with dropout and drop-path off,
    under ``no_grad``; BN running stats and every module's train/eval mode are restored afterwards.
    Under torch.distributed each site's sums are all-reduced once, in the pass that freezes it.
    A batch dict with ``valid`` (B, 1, H, W), False on padded pixels, counts only the positions of each
    fusion branch whose area-pooled validity is 1 (:func:`densefuse.fusion.valid_pixels`): padding does
    not enter the statistics.

    Args:
        model: a model with :class:`ScaleEqualizer` sites (densefuse or :func:`densefuse.smp.equalize`).
        batches: image tensors, dicts with an ``"image"`` key, or tuples whose first item is the
            images; or a function returning such an iterable (called once per pass, which keeps a
            one-shot loader out of memory). A list or DataLoader is iterated once per pass; a one-shot
            iterator is kept in memory for the later passes.
        num_images: stop after this many images (whole batches); ``None`` uses every batch (Algorithm
            1 uses the whole training set). Fewer available images calibrate with a warning.
        forward: ``forward(model, batch)`` calls the model (e.g. ``task.forward``); default ``model(images)``.

    Returns one row per (site, branch): upsample ratio, mean, std, variance before and after, mode
    and the ``pass`` that froze it; ``table.attrs`` holds ``passes`` and ``images``.
    """
    _check_num_images(num_images)
    named = _site_list(model)
    eqs = [eq for _, eq in named]
    for name, eq in named:
        if eq.is_folded:
            raise CalibrationError(
                f"fusion site '{site_name(name, eq)}' is already folded; calibrating again would fold twice"
            )
    source = _Batches(batches)
    level = [0] * len(eqs)
    rows: list[dict[str, Any]] = []
    with _recording(model):
        for eq in eqs:
            eq.reset_stats()
            eq.observing = True
            eq.emulate_fold = True

        def traced_first(batch: Any) -> None:
            level[:] = _trace_levels(model, eqs, batch, forward)
            if max(level) == 0:
                source.drop_cache()

        trace = len(eqs) > 1 and any(eq.mode != "off" for eq in eqs)
        seen = _run(model, source.first(), num_images, forward, traced_first if trace else None)
        if num_images is not None and seen < num_images:
            warnings.warn(f"calibration asked for {num_images} images but the batches held only {seen}; "
                          f"calibrated on {seen}", stacklevel=2)
        passes = max(level) + 1
        for p in range(passes):
            if p > 0:
                for k, eq in enumerate(eqs):
                    if level[k] >= p:
                        eq.reset_stats()
                _run(model, source.again(), num_images, forward)
            for k, (name, eq) in enumerate(named):
                if level[k] != p:
                    continue
                sums = eq.reduced_sums()  # one all-reduce per site under torch.distributed
                stats = eq.measured(sums)
                dead = eq.finish_calibration(stats)
                eq.observing = False
                for i in dead:
                    warnings.warn(f"fusion site '{site_name(name, eq)}' branch {i} is constant (std < {eq.eps}); "
                                  "it is left unscaled", stacklevel=2)
                rows.extend(_calibration_rows(name, eq, stats, p + 1))
        source.drop_cache()
    order = {site_name(n, eq): i for i, (n, eq) in enumerate(named)}
    table = pd.DataFrame(rows)
    table = table.sort_values(["site", "branch"], key=lambda c: c.map(order) if c.name == "site" else c,
                              kind="stable").reset_index(drop=True)
    table.attrs["passes"] = passes
    table.attrs["images"] = seen
    return table


def _calibration_rows(name: str, eq: ScaleEqualizer, stats: tuple[Tensor, Tensor, Tensor],
                      pass_no: int) -> list[dict[str, Any]]:
    _, mean, var = stats
    rows = []
    for i in range(eq.num_groups):
        mu, sd = (float(eq.mean[i]), float(eq.std[i])) if eq.active else (0.0, 1.0)
        rows.append(_row(name, eq, i, float(mean[i]), float(var[i]), (float(mean[i]) - mu) / sd,
                         float(var[i]) / sd**2) | {"pass": pass_no})
    return rows


def _row(name: str, eq: ScaleEqualizer, i: int, mean: float, var: float, mean_after: float,
         var_after: float) -> dict[str, Any]:
    ratio = eq.ratios[i] or (float("nan"), float("nan"))
    return {
        "site": site_name(name, eq),
        "branch": i,
        "channels": eq.groups[i],
        "ratio_h": ratio[0],
        "ratio_w": ratio[1],
        "mean": mean,
        "std": math.sqrt(var),
        "var_before": var,
        "mean_after": mean_after,
        "std_after": math.sqrt(var_after),
        "var_after": var_after,
        "mode": eq.mode,
    }


# ---------------------------------------------------------------------- measure
def measure(model: nn.Module, batches: Batches, num_images: Optional[int] = None,
            forward: Optional[Forward] = None) -> pd.DataFrame:
    """Observe the live forward and change nothing: per site and branch, what reaches the site
    (``mean``/``std``/``var_before``: the site's own equalizer off, every other site as it is) and
    what its fusion conv effectively sees (``*_after``: the site as it is).

    Same conditions as :func:`calibrate` (train-mode BN, dropout off, no grad, state restored); one
    pass. A folded site's conv does the scaling itself, so its ``after`` applies the frozen affine
    to what enters the conv. Uncalibrated sites pass their input through (``after == before``), as
    do sites in mode ``off``. Columns as :func:`calibrate`'s table plus ``calibrated``.
    """
    _check_num_images(num_images)
    named = _site_list(model)
    with _recording(model):
        for _, eq in named:
            eq.reset_stats()
            eq.measuring = True
            eq.emulate_fold = True
        seen = _run(model, _Batches(batches).first(), num_images, forward)
        rows = []
        for name, eq in named:
            sums = eq.reduced_sums()  # one all-reduce per site under torch.distributed
            _, mean, var = eq.measured(sums)
            _, mean_a, var_a = eq.measured(sums, after=True)
            for i in range(eq.num_groups):
                rows.append(_row(name, eq, i, float(mean[i]), float(var[i]), float(mean_a[i]), float(var_a[i]))
                            | {"calibrated": eq.is_calibrated})
    table = pd.DataFrame(rows)
    table.attrs["images"] = seen
    return table


# ---------------------------------------------------------------------- fold
def fold(model: nn.Module) -> nn.Module:
    """Fold every calibrated equalizer in ``model`` into its fusion conv (paper's Algorithm 1).

    Each site's conv (and the BatchNorm or bias that takes the mean term) is looked up now, in the
    model as it is: right after ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``, inside a DDP
    wrapper or a ``torch.compile`` module, or after loading a state_dict into a fresh model. Every
    site is checked before any weight changes; a site whose conv cannot be found or cannot take the
    fold raises :class:`CalibrationError`.
    """
    named = list(equalizers(model))
    if not named:
        raise CalibrationError("the model has no scale equalizers to fold")
    if any(eq.is_folded for _, eq in named):
        raise CalibrationError("the model is already folded; folding twice would rescale the fusion convs twice")
    targets: list[FoldTarget] = []
    for name, eq in named:  # check every site first so a refusal leaves the model untouched
        site = site_name(name, eq)
        if not eq.is_calibrated:
            raise CalibrationError(f"fusion site '{site}' is not calibrated; run densefuse.calibrate first")
        try:
            target = eq.fold_target(model, name)
        except CalibrationError as e:
            msg = str(e)
            raise CalibrationError(msg if f"'{site}'" in msg else f"fusion site '{site}': {msg}") from None
        eq.check_fold_target(target, site)
        targets.append(target)
    for (_, eq), target in zip(named, targets):
        eq.fold(target)
    return model
