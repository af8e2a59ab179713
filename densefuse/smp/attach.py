"""Attach :class:`SmpEqualizer` sites to an smp model through forward pre-hooks (smp is not edited)."""
from __future__ import annotations

from typing import Optional, Sequence

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
        self.label = site.consumer

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
    chosen = list(sites) if sites is not None else _find_sites(model, source, example_input)
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
        hooks.append((consumer, eq))
    p = next(iter(model.parameters()), None)
    if p is not None:
        container.to(p.device)
    for consumer, eq in hooks:
        consumer.register_forward_pre_hook(_EqualizeHook(eq))
    model.add_module(CONTAINER, container)
    return model


