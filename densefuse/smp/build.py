"""Build an smp model from a densefuse config (``model.type: smp``) and attach its equalizers."""
from __future__ import annotations

import inspect
import warnings
from typing import Any, Mapping

from torch import nn

from ..errors import ConfigError, did_you_mean
from .attach import equalize

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

