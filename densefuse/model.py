"""Models built from a config: ``model.type`` names a builder in :data:`densefuse.registry.MODELS`.

``encoder_decoder`` is a timm encoder, a decoder (``model.decode_head``), a predictor and optionally
an auxiliary decoder + predictor (``model.auxiliary_head``). ``smp`` (a segmentation_models_pytorch
model with equalizers attached) is registered lazily so that importing densefuse does not import smp.
"""
from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import heads as _heads  # noqa: F401  (registers the built-in decoders and predictors)
from .config.loader import from_dict
from .config.schema import Origin, Section, get_dotted, plain, rule_from_default, type_name
from .encoders import TimmEncoder
from .errors import ConfigError, did_you_mean
from .registry import HEADS, MODELS, PREDICTORS, arguments

#: decoder arguments filled from ``model.*`` and the encoder, never written in a head section
DECODER_INJECTED = ("in_channels", "align_corners", "eq_mode", "eq_eps")
#: predictor arguments filled by the builder
PREDICTOR_INJECTED = ("in_channels", "num_classes")
#: the predictor used when a head section names none
DEFAULT_PREDICTOR = "cls_seg"
#: keys a head section may hold besides its decoder's and predictor's arguments (read elsewhere)
SECTION_EXTRAS: dict[str, dict[str, Any]] = {
    "model.decode_head": {},
    "model.auxiliary_head": {"loss_weight": 0.4},  # read by the task's loss
}


#: checkpoint key prefixes of densefuse 0.1 (classifier inside the heads) -> today's
LEGACY_PREFIXES = {"decode_head.cls_seg.": "predictor.", "auxiliary_head.cls_seg.": "aux_predictor."}


def _rename_legacy_keys(state_dict: dict, prefix: str, *args: Any) -> None:
    """load_state_dict pre-hook: checkpoints from before the decoder/predictor split load unchanged."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        for old, new in LEGACY_PREFIXES.items():
            if key.startswith(prefix + old):
                state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)


class EncoderDecoder(nn.Module):
    """``encoder -> decoder -> predictor`` (and ``auxiliary_head -> aux_predictor`` in training).

    ``forward(x)`` returns ``{"out": prediction}`` resized (bilinear) to the input size, plus ``"aux"``
    in train mode when there is an auxiliary head. The decoder is stored as ``decode_head`` (the name of
    its config section), so fusion sites are ``decode_head.<fusion>`` as before. State dicts saved before
    the classifier moved out of the heads (``decode_head.cls_seg.*``) load unchanged (see
    :data:`LEGACY_PREFIXES`).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        predictor: nn.Module,
        aux: Optional[nn.Module] = None,
        aux_predictor: Optional[nn.Module] = None,
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if (aux is None) != (aux_predictor is None):
            raise ValueError("an auxiliary decoder needs an auxiliary predictor (and vice versa)")
        self.encoder = encoder
        self.decode_head = decoder
        self.predictor = predictor
        self.auxiliary_head = aux
        self.aux_predictor = aux_predictor
        self.align_corners = align_corners
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)

    def features(self, x: Tensor) -> Tensor:
        """The decoder's fused feature map for images ``x``."""
        return self.decode_head(self.encoder(x))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.encoder(x)
        size = x.shape[-2:]
        out = {"out": self._up(self.predictor(self.decode_head(feats)), size)}
        if self.training and self.auxiliary_head is not None:
            out["aux"] = self._up(self.aux_predictor(self.auxiliary_head(feats)), size)
        return out

    def _up(self, y: Tensor, size: Any) -> Tensor:
        if not self.training and y.device.type == "cpu" and y.shape[1] > 1:
            # class logits at eval on the CPU: in channels-last memory the bilinear resizes (this one and the
            # evaluator's to the label size) and the per-pixel argmax over classes run 1.7x faster (150
            # classes, 32x43 -> 128x170 -> 256x339: 79 -> 46 ms, tools/bench_kernels.py); values agree to rounding
            y = y.contiguous(memory_format=torch.channels_last)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=self.align_corners)


def head_arguments(section: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Every key the head section ``spec`` accepts, with its default (``inspect.Parameter.empty`` if
    required): ``type``, ``predictor``, the decoder's and the predictor's own arguments and the section's
    extras. An unknown ``type`` or ``predictor`` is a ConfigError naming the key."""
    decoder = HEADS.get(spec.get("type"), key=f"{section}.type")
    predictor = PREDICTORS.get(spec.get("predictor", DEFAULT_PREDICTOR), key=f"{section}.predictor")
    out: dict[str, Any] = {"type": spec.get("type"), "predictor": DEFAULT_PREDICTOR}
    out.update(SECTION_EXTRAS.get(section, {}))
    for name, default in arguments(predictor).items():
        if name not in PREDICTOR_INJECTED:
            out[name] = default
    for name, default in arguments(decoder).items():
        if name not in DECODER_INJECTED:
            out[name] = default
    return out


def build_head(
    spec: Mapping[str, Any], section: str, in_channels: list[int], num_classes: int, common: Mapping[str, Any]
) -> tuple[nn.Module, nn.Module]:
    """(decoder, predictor) for one head section.

    The predictor is built first: mmseg creates ``conv_seg`` before the decoder's layers, so the same
    seed gives the same initial weights as mmseg (and as earlier densefuse versions).
    """
    spec = {k: v for k, v in spec.items() if k not in SECTION_EXTRAS.get(section, {})}
    decoder_cls = HEADS.get(spec.pop("type"), key=f"{section}.type")
    predictor_cls = PREDICTORS.get(spec.pop("predictor", DEFAULT_PREDICTOR), key=f"{section}.predictor")
    p_args = arguments(predictor_cls)
    p_kwargs = {k: spec.pop(k) for k in list(spec) if k in p_args and k not in PREDICTOR_INJECTED}
    if "num_classes" in p_args:
        p_kwargs["num_classes"] = num_classes
    channels = spec.get("channels", arguments(decoder_cls).get("channels"))
    predictor = None
    if isinstance(channels, int):
        predictor = predictor_cls(in_channels=channels, **p_kwargs)
    decoder = decoder_cls(in_channels=in_channels, **common, **spec)
    if predictor is None:
        predictor = predictor_cls(in_channels=decoder.out_channels, **p_kwargs)
    elif getattr(decoder, "out_channels", channels) != channels:
        raise ValueError(f"{type(decoder).__name__} returns {decoder.out_channels} channels, not {channels}")
    return decoder, predictor


HEAD_SECTIONS = ("model.decode_head", "model.auxiliary_head")


def _fits(value: Any, default: Any) -> bool:
    """Whether ``value`` has the kind of a head argument's default (no default: anything fits)."""
    if default is None or default is inspect.Parameter.empty or value is None:
        return True
    return rule_from_default(default).ok(value) or (isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool))


def check_heads(cfg: dict, inherited: Mapping, written: set[str], source: Origin) -> None:
    """Validate the head sections against the head they name, before any model is built.

    When the head type differs from the one the ``_base_`` files give (a switch by the top file or
    ``--set``), inherited keys the new head does not take (unknown, or of the wrong kind, e.g. UPerHead's
    ``in_index`` list for PSPHead) are dropped: the new head's defaults apply. Keys the user wrote (in
    the top file or ``--set``) are never dropped: a wrong one is an error saying what to change.
    """
    for section in HEAD_SECTIONS:
        spec = get_dotted(cfg, section)
        if not spec:
            continue
        base = get_dotted(inherited, section) or {}
        switched = base.get("type") is not None and spec.get("type") != base.get("type")
        try:
            accepted = head_arguments(section, spec)
        except ConfigError as e:  # an unknown type or predictor: name where that key came from
            key = "predictor" if f"{section}.predictor" in str(e) else "type"
            raise ConfigError(f"{source(f'{section}.{key}')}: {e}") from None
        choices = _head_choices(section, spec)
        kind = f"{section}.type '{spec.get('type')}'"
        for key in list(spec):
            path = f"{section}.{key}"
            ok = key in accepted and _fits(spec[key], accepted[key])
            bad_choice = key in accepted and key in choices and spec[key] not in choices[key]
            if ok and not bad_choice:
                continue
            if switched and path not in written and key in base:
                del spec[key]
                continue
            where = f"{source(path)}: "
            if bad_choice:  # whatever its type: the choices say what to write
                raise ConfigError(f"{where}'{path}' must be one of {', '.join(choices[key])}, "
                                  f"got {type_name(spec[key])} {spec[key]!r}"
                                  f"{did_you_mean(str(spec[key]), choices[key])}")
            if key not in accepted:
                hint = did_you_mean(key, accepted, section + ".")
                names = ", ".join(k for k in accepted if k != "type")
                raise ConfigError(f"{where}unknown config key '{path}' for {kind}{hint}; remove it "
                                  f"(that head takes: {names})")
            want = rule_from_default(accepted[key]).describe()
            raise ConfigError(f"{where}'{path}' must be {want} for {kind}, got {type_name(spec[key])} "
                              f"{spec[key]!r}; remove it to use the default {plain(accepted[key])!r}")
        missing = [k for k, default in accepted.items() if default is inspect.Parameter.empty and k not in spec]
        if missing:
            raise ConfigError(f"{source(section + '.type')}: {kind} needs '{section}.{missing[0]}' "
                              f"(required arguments: {', '.join(missing)})")
        need, why = getattr(HEADS.get(spec["type"]), "min_batch_size", lambda _: (1, ""))(spec)
        batch = cfg["train"]["batch_size"]
        if batch < need:
            raise ConfigError(f"{source('train.batch_size')}: train.batch_size={batch} is too small for {kind}: "
                              f"{why}; use train.batch_size >= {need}")


def _head_choices(section: str, spec: Mapping[str, Any]) -> dict[str, tuple]:
    """Allowed values a head declares for some of its arguments (``arg_choices``)."""
    return dict(getattr(HEADS.get(spec.get("type"), key=f"{section}.type"), "arg_choices", {}))



@MODELS.register("encoder_decoder", check=check_heads)
def build_encoder_decoder(cfg: Mapping[str, Any]) -> EncoderDecoder:
    """timm encoder + decoder + predictor (+ auxiliary decoder + predictor) from ``cfg.model``."""
    m = cfg["model"]
    eq = m["equalizer"]
    enc = m["encoder"]
    encoder = TimmEncoder(enc["name"], enc["out_indices"], enc["output_stride"], enc["pretrained"],
                          **dict(enc["kwargs"] or {}))
    common = {"align_corners": m["align_corners"], "eq_mode": eq["mode"], "eq_eps": eq["eps"]}
    decoder, predictor = build_head(m["decode_head"], "model.decode_head", encoder.channels, m["num_classes"], common)
    aux = aux_predictor = None
    if m.get("auxiliary_head"):
        aux, aux_predictor = build_head(m["auxiliary_head"], "model.auxiliary_head", encoder.channels,
                                        m["num_classes"], common)
    return EncoderDecoder(encoder, decoder, predictor, aux, aux_predictor, m["align_corners"])


MODELS.register_lazy("smp", "densefuse.smp:build_smp_model")


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """Build the model described by ``cfg.model`` with the builder ``model.type`` names (a plain dict is
    validated first, once, as a config file would be)."""
    if not isinstance(cfg, Section):
        cfg = from_dict(cfg)
    return MODELS.get(cfg["model"]["type"], key="model.type")(cfg)
