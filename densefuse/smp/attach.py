"""Attach :class:`SmpEqualizer` sites to an smp model through forward pre-hooks (smp is not edited)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..calibration import equalizers
from ..equalizer import FoldTarget, ScaleEqualizer, _check_mode
from ..errors import CalibrationError, ConfigError
from .probe import sites as _find_sites
from .sites import CONTAINER, Site


class SmpEqualizer(ScaleEqualizer):
    """A :class:`ScaleEqualizer` that knows its :class:`Site`; it lives in ``<root>.scale_equalizers``.

    Its fold target is looked up by the site's paths relative to ``<root>`` when :func:`densefuse.fold`
    runs, so it follows SyncBatchNorm conversion, DDP (``module.``) and ``torch.compile``
    (``_orig_mod.``) wrapping. For DeepLabV3+ ``block2`` the first op is a depthwise 3x3 conv followed
    by a bias-free 1x1 pointwise conv and a BatchNorm: the depthwise rows are scaled by ``1/std`` and
    the mean term, carried through the pointwise conv, goes into the BN running mean.
    """

    def __init__(self, site: Site, mode: str = "explicit", eps: float = 1e-5) -> None:
        super().__init__(site.groups, mode=mode, eps=eps)
        self.site = site
        self.label = site.consumer if site.fusion is None else f"{site.fusion}: {site.consumer}"
        self.centered = site.center
        #: the modules whose pre-hook applies this equalizer (plain list: not submodules)
        self._consumers: list[nn.Module] = []

    @torch.jit.unused
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)

    @torch.no_grad()
    def finish_calibration(self, measured: Optional[tuple[Tensor, Tensor, Tensor]] = None) -> list[int]:
        dead = super().finish_calibration(measured)
        if not self.site.center:  # scale-only addend (its layer has no bias to take a mean term)
            self.mean.zero_()
        return dead

    def sync_consumers(self) -> None:
        """Write the affine the forward applies now into the consumers' TorchScript buffers."""
        scale, shift = self.runtime_affine()
        for m in self._consumers:
            for name, value in ((SCALE, scale), (SHIFT, shift)):
                buf = getattr(m, name)
                buf.copy_(value.to(buf).view(buf.shape))

    def __prepare_scriptable__(self) -> "SmpEqualizer":
        # torch.jit.script calls this on every submodule before compiling: the scripted pre-hooks read
        # the consumers' buffers, so they must hold the current state.
        self.sync_consumers()
        return self

    def extra_repr(self) -> str:
        return f"consumer={self.site.consumer!r}, " + super().extra_repr()

    def fold_target(self, root: nn.Module, name: str) -> FoldTarget:
        """Resolve the site's conv / norm / pointwise paths in the smp model that holds this equalizer."""
        suffix = f"{CONTAINER}.{self.site.key}"
        if not (name == suffix or name.endswith("." + suffix)):
            raise CalibrationError(
                f"fusion site '{self.site.consumer}': its equalizer is at '{name}', not in a '{CONTAINER}' container"
            )
        owner = name[: -len(suffix)].rstrip(".")
        return resolve_target(root.get_submodule(owner) if owner else root, self.site)


def resolve_target(model: nn.Module, site: Site) -> FoldTarget:
    """The fold target of ``site`` in the smp ``model`` (paths relative to it), looked up now."""
    if site.conv is None:
        raise CalibrationError(f"fusion site '{site.consumer}' has no conv to fold into; use mode 'explicit'")
    mods: dict[str, Optional[nn.Module]] = {}
    for field in ("conv", "norm", "pointwise"):
        path = getattr(site, field)
        try:
            mods[field] = model.get_submodule(path) if path else None
        except AttributeError:
            raise CalibrationError(
                f"fusion site '{site.consumer}': its {field} '{path}' is not in {type(model).__name__}"
            ) from None
    return FoldTarget(mods["conv"], mods["norm"], mods["pointwise"])  # type: ignore[arg-type]


#: the consumer's ``__dict__`` entry that points to its equalizer (a plain attribute, not a submodule, so
#: the consumer's children, state_dict keys and a Sequential's iteration do not change)
EQ_ATTR = "densefuse_equalizer"
#: non-persistent per-channel buffers of the consumer that a TorchScript copy applies (see :func:`densefuse_equalize`)
SCALE, SHIFT = "densefuse_scale", "densefuse_shift"
#: key of the equalization record in a saved config: smp's hub config (keys starting with "_" are not
#: passed to the model's __init__) and a HuggingFace ``PretrainedConfig``
RECORD, HF_RECORD = "_densefuse", "densefuse_equalization"


@torch.jit.unused
def _eager_equalize(module: nn.Module, args: tuple[Tensor]) -> tuple[Tensor]:
    if not args:
        return args
    return (module.__dict__[EQ_ATTR](args[0]), *args[1:])


def densefuse_equalize(module: nn.Module, args: tuple[Tensor]) -> tuple[Tensor]:
    """Forward pre-hook of a consumer: replace its first argument ``x`` by ``eq(x)``.

    A plain function TorchScript can compile: scripted, it applies the per-channel buffers
    ``densefuse_scale`` / ``densefuse_shift`` (written from the equalizer when scripting starts); in eager
    mode, ``torch.compile`` and ``torch.export`` it calls the equalizer (observing, measuring, the frozen
    affine). The equalizer is a plain attribute of the consumer, so ``copy.deepcopy`` and pickling carry it.
    """
    if torch.jit.is_scripting():
        return (args[0] * module.densefuse_scale + module.densefuse_shift,)
    return _eager_equalize(module, args)


def _is_equalized(model: nn.Module) -> bool:
    return any(EQ_ATTR in m.__dict__ for m in model.modules())


def _attach(consumer: nn.Module, eq: SmpEqualizer) -> None:
    consumer.__dict__[EQ_ATTR] = eq
    shape = (-1,) if isinstance(consumer, nn.Linear) else (-1, 1, 1)  # Linear: channels last
    total = sum(eq.groups)
    consumer.register_buffer(SCALE, eq.std.new_ones(total).view(shape), persistent=False)
    consumer.register_buffer(SHIFT, eq.std.new_zeros(total).view(shape), persistent=False)
    consumer.register_forward_pre_hook(densefuse_equalize)
    eq._consumers.append(consumer)


def detach(model: nn.Module) -> list[SmpEqualizer]:
    """Remove every equalizer, hook, buffer and config record :func:`equalize` added; return the equalizers.

    The weights are left as they are: fold first (:func:`densefuse.export_plain` does both).
    """
    eqs = []
    for m in model.modules():
        eq = m.__dict__.pop(EQ_ATTR, None)
        if eq is None:
            continue
        eqs.append(eq)
        for k in [k for k, h in m._forward_pre_hooks.items() if h is densefuse_equalize]:
            del m._forward_pre_hooks[k]
        for name in (SCALE, SHIFT):
            m._buffers.pop(name, None)
    if CONTAINER in model._modules:
        del model._modules[CONTAINER]
    _set_record(model, None)
    return eqs


def _set_record(model: nn.Module, record: Optional[dict]) -> None:
    """Write (or, with None, drop) the equalization record where the model's save_pretrained saves its config:
    smp's hub-mixin config dict, or a HuggingFace ``PretrainedConfig`` attribute."""
    hub = getattr(model, "_hub_mixin_config", None)
    if isinstance(hub, dict):
        if record is None:
            hub.pop(RECORD, None)
        else:
            hub[RECORD] = record
    cfg = getattr(model, "config", None)
    if cfg is not None and not isinstance(cfg, dict) and hasattr(cfg, "to_dict"):
        if record is None:
            if hasattr(cfg, HF_RECORD):
                delattr(cfg, HF_RECORD)
        else:
            setattr(cfg, HF_RECORD, record)


def record_of(model: nn.Module, sites: Sequence[Site], mode: str, eps: float) -> dict:
    """The equalization record saved with the model's config: the sites, the mode and eps."""
    return {"version": 1, "mode": mode, "eps": eps, "sites": [asdict(s) for s in sites]}


def sites_from_record(record: dict) -> list[Site]:
    """The :class:`Site` list of a saved record (JSON turns tuples into lists)."""
    out = []
    for d in record.get("sites", []):
        d = dict(d)
        d["groups"] = tuple(int(g) for g in d["groups"])
        d["interpolated"] = tuple(bool(i) for i in d["interpolated"])
        out.append(Site(**d))
    return out


def equalize(
    model: nn.Module,
    mode: str = "explicit",
    eps: float = 1e-5,
    source: str = "auto",
    example_input: Optional[Tensor] = None,
    sites: Optional[Sequence[Site]] = None,
    sums: bool = False,
) -> nn.Module:
    """Attach a scale equalizer at every fusion site of an smp model (in place; returns ``model``).

    Args:
        model: an smp model (or any module, with ``source="probe"`` / ``"auto"``).
        mode: ``"explicit"`` (default), ``"off"`` (measure only) or ``"fold"`` (see :mod:`densefuse.equalizer`).
        eps: dead-branch guard of the equalizers.
        source: where the sites come from: ``"auto"`` (table, else probe), ``"table"`` or ``"probe"``.
        example_input: input for the probe (default one random 64x64 image).
        sites: use these sites instead (e.g. picked from ``probe(model, all_concats=True)``).
        sums: also equalize sum fusions whose addends end in a conv (see :func:`densefuse.smp.probe`).

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
    chosen = list(sites) if sites is not None else _find_sites(model, source, example_input, sums=sums)
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
            if site.conv is not None:  # check the fold target now; fold() looks it up again when it runs
                eq.check_fold_target(resolve_target(model, site), site.consumer)
        except (AttributeError, ValueError, CalibrationError) as e:
            raise ConfigError(f"bad fusion site '{site.consumer}' for {type(model).__name__}: {e}") from None
        container[site.key] = eq
        if any(c is consumer for c, _ in hooks):
            raise ConfigError(f"fusion site '{site.consumer}' is listed twice")
        hooks.append((consumer, eq))
    p = next(iter(model.parameters()), None)
    if p is not None:
        container.to(p.device)
    for consumer, eq in hooks:
        _attach(consumer, eq)
    model.add_module(CONTAINER, container)
    _set_record(model, record_of(model, chosen, mode, eps))
    return model


