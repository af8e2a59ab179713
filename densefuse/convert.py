"""Checkpoint conversion: mmseg / mmpretrain / timm weights into densefuse models, by key mapping.

Two uses:

* ImageNet backbones the paper's configs start from (mmseg-format Swin and Twins, mmcv ResNetV1c,
  mmpretrain ConvNeXt, or plain timm checkpoints) -> :class:`densefuse.encoders.TimmEncoder`
  (:func:`load_encoder_weights`, called by the encoder for ``model.encoder.pretrained: <file>``).
* Whole mmseg segmentor checkpoints (UPerNet / PSPNet / DeepLabV3(+) / FCN: ``backbone.*``,
  ``decode_head.*``, ``auxiliary_head.*``) -> a densefuse ``EncoderDecoder``
  (:func:`convert_mmseg_segmentor`, :func:`load_mmseg_segmentor`), so a model trained with mmseg can be
  evaluated, calibrated, equalized and trained further here.

Every key is accounted for: it is used, or it is a classifier / buffer key that densefuse does not have
(listed in :data:`IGNORED`). Anything else, and any densefuse parameter left without a value, is one
:class:`~densefuse.errors.ConfigError` listing the keys. Files are read with ``weights_only=True``.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .errors import ConfigError

PathLike = Union[str, Path]
StateDict = dict[str, Tensor]

#: mmseg decode/auxiliary head names -> densefuse names: (prefix or infix, replacements). The first
#: replacement whose result exists in the target model wins. ONE table: adjust it when head modules move.
HEAD_RENAMES: list[tuple[str, tuple[str, ...]]] = [
    ("fpn_bottleneck.", ("fpn_fusion.fuse.",)),
    ("sep_bottleneck.", ("sep_bottleneck.fuse.",)),
    ("bottleneck.", ("psp_fusion.fuse.", "bottleneck.fuse.")),
    ("conv_cat.", ("conv_cat.fuse.",)),
    (".depthwise_conv.", (".depthwise.",)),  # mmcv DepthwiseSeparableConvModule
    (".pointwise_conv.", (".pointwise.",)),
]

#: mmseg keeps each head's classifier inside the head; densefuse's EncoderDecoder has it in a predictor.
CLASSIFIERS: dict[str, str] = {"decode_head.conv_seg.": "predictor.conv_seg.",
                               "auxiliary_head.conv_seg.": "aux_predictor.conv_seg."}

#: Keys of a source checkpoint that densefuse has no place for, by design (classifiers, non-persistent buffers).
IGNORED = re.compile(r"(^|\.)(head|fc|classifier)\.|^norm\.|relative_position_index$|attn_mask$|^head_")

#: densefuse keys a converted checkpoint does not provide (equalizer statistics: calibrate after loading).
NOT_IN_SOURCE = re.compile(r"\.equalizer\.")


def load_state_file(path: PathLike) -> StateDict:
    """Tensors of a ``.pth`` / ``.safetensors`` checkpoint, read safely (``weights_only=True``).

    Unwraps ``state_dict`` / ``model`` / ``module`` containers. A missing, corrupt or non-weights file is one
    :class:`ConfigError` naming it.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"pretrained weights not found: {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the user's file: one clear line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot load weights from {path}: not a weights-only PyTorch/safetensors checkpoint "
                          f"({type(e).__name__}: {first[:200]})") from None
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConfigError(f"cannot load weights from {path}: it holds no mapping of names to tensors")
    out = {str(k): v for k, v in obj.items()}
    if out and all(k.startswith("module.") for k in out):  # saved from DDP
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


# --- backbones: mmseg / mmpretrain names -> timm names --------------------------------------------------------


def _unfold_to_cat(weight: Tensor) -> Tensor:
    """Inverse of mmseg's ``correct_unfold_*_order``: Swin patch merging in mmseg's nn.Unfold channel order ->
    the official / timm ``cat[x0, x1, x2, x3]`` order (last dim of a reduction weight, or a norm vector)."""
    if weight.ndim == 1:
        c = weight.shape[0]
        return weight.reshape(c // 4, 4).transpose(0, 1)[[0, 2, 1, 3]].reshape(c)
    out_c, in_c = weight.shape
    return weight.reshape(out_c, in_c // 4, 4).transpose(1, 2)[:, [0, 2, 1, 3]].reshape(out_c, in_c)


def _cat_to_unfold(weight: Tensor) -> Tensor:
    """timm / official Swin patch-merging order -> mmseg's nn.Unfold order (mmseg's ``swin2mmseg``)."""
    if weight.ndim == 1:
        c = weight.shape[0]
        return weight.reshape(4, c // 4)[[0, 2, 1, 3]].transpose(0, 1).reshape(c)
    out_c, in_c = weight.shape
    return weight.reshape(out_c, 4, in_c // 4)[:, [0, 2, 1, 3]].transpose(1, 2).reshape(out_c, in_c)


def _swin(sd: StateDict) -> tuple[StateDict, StateDict, list[str]]:
    out, norms, left = {}, {}, []
    for k, v in sd.items():
        m = re.match(r"^norm(\d)\.(weight|bias)$", k)
        if m:
            norms[f"{m.group(1)}.{m.group(2)}"] = v
            continue
        if k.startswith("patch_embed."):
            out[k.replace("patch_embed.projection.", "patch_embed.proj.")] = v
            continue
        m = re.match(r"^stages\.(\d+)\.(.*)$", k)
        if not m:
            left.append(k)
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest.startswith("downsample."):
            out[f"layers.{i + 1}.{rest}"] = _unfold_to_cat(v)
            continue
        rest = rest.replace("attn.w_msa.", "attn.").replace("ffn.layers.0.0.", "mlp.fc1.")
        rest = rest.replace("ffn.layers.1.", "mlp.fc2.")
        out[f"layers.{i}.{rest}"] = v
    return out, norms, left


def is_official_swin(sd: StateDict) -> bool:
    """Microsoft's original Swin format (``swin_large_patch4_window7_224_22k.pth``): patch merging at the
    *end* of a stage, so stage 0 has ``layers.0.downsample`` (timm puts it at the start of the next stage)."""
    return any(k.startswith("layers.0.downsample.") for k in sd) and not any(k.startswith("stages.") for k in sd)


def swin_official_to_timm(sd: StateDict) -> tuple[StateDict, StateDict, list[str]]:
    """Original Swin names -> timm: ``layers.N.downsample`` -> ``layers.N+1.downsample`` (same channel order);
    the buffers timm rebuilds (``relative_position_index``, ``attn_mask``), the final ``norm`` and the
    classifier ``head`` are returned as keys left over (ignored by name). No per-output norms in this format."""
    out, left = {}, []
    for k, v in sd.items():
        if k.endswith(("relative_position_index", "attn_mask")) or k.startswith(("head.", "norm.")):
            left.append(k)
            continue
        m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", k)
        out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}" if m else k] = v
    return out, {}, left


def _twins(sd: StateDict) -> tuple[StateDict, StateDict, list[str]]:
    out, norms, left = {}, {}, []
    for k, v in sd.items():
        m = re.match(r"^norm_list\.(\d)\.(weight|bias)$", k)
        if m:
            norms[f"{m.group(1)}.{m.group(2)}"] = v
        elif k.startswith("patch_embeds."):
            out[k.replace(".projection.", ".proj.")] = v
        elif k.startswith("position_encodings."):
            out[re.sub(r"^position_encodings\.(\d+)\.proj\.", r"pos_block.\1.proj.0.", k)] = v
        elif k.startswith("layers."):
            nk = "blocks." + k[len("layers."):]
            m = re.match(r"^(.*)\.attn\.attn\.in_proj_(weight|bias)$", nk)
            if m:  # nn.MultiheadAttention packs q and kv; timm keeps them apart
                c = v.shape[0] // 3
                out[f"{m.group(1)}.attn.q.{m.group(2)}"] = v[:c]
                out[f"{m.group(1)}.attn.kv.{m.group(2)}"] = v[c:]
                continue
            nk = nk.replace(".attn.attn.out_proj.", ".attn.proj.")
            nk = nk.replace(".ffn.layers.0.0.", ".mlp.fc1.").replace(".ffn.layers.1.", ".mlp.fc2.")
            out[nk] = v
        else:
            left.append(k)
    return out, norms, left


def _convnext(sd: StateDict) -> tuple[StateDict, StateDict, list[str]]:
    out, norms, left = {}, {}, []
    for k, v in sd.items():
        m = re.match(r"^norm(\d)\.(weight|bias)$", k)
        if m:
            norms[f"{m.group(1)}.{m.group(2)}"] = v
            continue
        nk = re.sub(r"^downsample_layers\.0\.", "stem.", k)
        nk = re.sub(r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample.", nk)
        nk = re.sub(r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2.", nk)
        nk = nk.replace(".depthwise_conv.", ".conv_dw.").replace(".pointwise_conv1.", ".mlp.fc1.")
        nk = nk.replace(".pointwise_conv2.", ".mlp.fc2.")
        if nk == k and not k.startswith("stages."):
            left.append(k)
        else:
            out[nk] = v
    return out, norms, left


_STEM_V1C = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6", "7": "bn1"}


def _resnet(sd: StateDict) -> tuple[StateDict, StateDict, list[str]]:
    out, left = {}, []
    for k, v in sd.items():
        m = re.match(r"^stem\.(\d+)\.(.*)$", k)
        if m and m.group(1) in _STEM_V1C:
            out[f"{_STEM_V1C[m.group(1)]}.{m.group(2)}"] = v
        elif k.startswith("layer") or k.startswith(("conv1.", "bn1.")):
            out[k] = v
        else:
            left.append(k)
    return out, {}, left


#: family -> (is this an mmseg/mmpretrain-format backbone?, converter to timm names)
_FAMILIES: dict[str, tuple[Callable[[StateDict], bool], Callable[[StateDict], tuple[StateDict, StateDict, list[str]]]]] = {
    "swin": (lambda sd: any(k.startswith("stages.") or ".w_msa." in k for k in sd), _swin),
    "twins": (lambda sd: any(k.startswith(("layers.", "position_encodings.")) for k in sd), _twins),
    "convnext": (lambda sd: any(k.startswith("downsample_layers.") for k in sd), _convnext),
    "resnet": (lambda sd: any(k.startswith("stem.") for k in sd), _resnet),
}


def backbone_to_timm(sd: StateDict, family: str) -> tuple[StateDict, StateDict, list[str]]:
    """Split a backbone state dict into (timm-named tensors, per-output norm tensors ``"<i>.weight"``, keys left).

    mmseg / mmpretrain format is recognised by its key names and converted; timm format passes through.
    """
    sd = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in sd.items()}
    if family == "swin" and is_official_swin(sd):
        return swin_official_to_timm(sd)
    if family in _FAMILIES and _FAMILIES[family][0](sd):
        return _FAMILIES[family][1](sd)
    return dict(sd), {}, []


def _feature_key(full: str, targets: Mapping[str, Any]) -> Optional[str]:
    """The name of timm key ``full`` inside a ``features_only`` wrapper (``layers.0.x`` -> ``layers_0.x``,
    ``x`` -> ``model.x``), or ``None`` when the wrapper does not keep it."""
    for cand in (full, "model." + full, re.sub(r"^([A-Za-z_]\w*?)\.(\d+)\.", r"\1_\2.", full)):
        if cand in targets:
            return cand
    return None


def encoder_state(encoder: nn.Module, sd: StateDict, source: str) -> tuple[StateDict, list[str]]:
    """Map a backbone checkpoint onto ``encoder`` (a TimmEncoder): (its state dict entries, ignored keys).

    Raises :class:`ConfigError` listing source keys that fit nowhere.
    """
    family = getattr(encoder, "family", "")
    timm_sd, norms, unconverted = backbone_to_timm(sd, family)
    targets = encoder.model.state_dict()
    out: StateDict = {}
    ignored = [k for k in unconverted if IGNORED.search(k)]
    left = [k for k in unconverted if not IGNORED.search(k)]
    for k, v in timm_sd.items():
        fk = _feature_key(k, targets)
        if fk is not None:
            out["model." + fk] = v
        elif IGNORED.search(k):
            ignored.append(k)
        else:
            left.append(k)
    out_norms = getattr(encoder, "out_norms", None)
    for k, v in norms.items():
        if out_norms is not None and int(k.split(".")[0]) < len(out_norms):
            out["out_norms." + k] = v
        else:
            ignored.append("norm" + k)
    if left:
        raise ConfigError(f"{source}: {_count(len(left), 'key')} without a parameter of encoder "
                          f"'{getattr(encoder, 'name', '?')}': {_listing(left)}")
    return out, ignored


def load_encoder_weights(encoder: nn.Module, path: PathLike) -> list[str]:
    """Load a backbone checkpoint (timm, mmseg or mmpretrain format) into ``encoder``; returns ignored keys.

    Every encoder parameter must receive a value except per-output norms missing from an ImageNet checkpoint
    (mmseg initialises those freshly too). Mis-shaped or unknown keys are one clear error.
    """
    state, ignored = encoder_state(encoder, load_state_file(path), str(path))
    own = encoder.state_dict()
    missing = [k for k in own if k not in state and not k.startswith("out_norms.") and not _is_buffer_stat(k)]
    if missing:
        raise ConfigError(f"{path}: no value for {_count(len(missing), 'encoder key')}: {_listing(missing)}")
    _check_shapes(state, own, str(path))
    encoder.load_state_dict(state, strict=False)
    return ignored


def _is_buffer_stat(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _check_shapes(state: Mapping[str, Tensor], own: Mapping[str, Tensor], source: str) -> None:
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
           if k in own and v.shape != own[k].shape]
    if bad:
        raise ConfigError(f"{source}: {_count(len(bad), 'tensor')} with the wrong shape: {_listing(bad)}")


def _count(n: int, noun: str) -> str:
    """``1 key`` / ``3 keys``: counts in messages read as English."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _listing(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


# --- whole segmentors ---------------------------------------------------------------------------------------


def _head_key(rest: str, prefix: str, targets: Mapping[str, Any]) -> Optional[str]:
    cands = [rest]
    for old, news in HEAD_RENAMES:
        nxt = []
        for c in cands:
            hit = old in c if old.startswith(".") else c.startswith(old)
            if hit:
                nxt += [c.replace(old, new, 1) for new in news]
            else:
                nxt.append(c)
        cands = nxt
    for c in cands:
        if f"{prefix}.{c}" in targets:
            return f"{prefix}.{c}"
    return None


def convert_mmseg_segmentor(sd: StateDict, model: nn.Module, source: str = "checkpoint") -> StateDict:
    """An mmseg segmentor state dict -> ``model``'s (a densefuse EncoderDecoder) state dict entries.

    ``backbone.*`` goes through the encoder's family converter, ``decode_head.*`` / ``auxiliary_head.*``
    through :data:`HEAD_RENAMES`. Unknown source keys, and densefuse keys without a value (other than the
    equalizer statistics, which calibration measures), raise one :class:`ConfigError` listing them.
    """
    targets = model.state_dict()
    out: StateDict = {}
    left: list[str] = []
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    enc_state, _ = encoder_state(model.encoder, backbone, source)  # type: ignore[arg-type]
    out.update({"encoder." + k: v for k, v in enc_state.items()})
    for k, v in sd.items():
        if k.startswith("backbone."):
            continue
        head, _, rest = k.partition(".")
        cls = next((new for old, new in CLASSIFIERS.items() if k.startswith(old)), None)
        if cls is not None and cls + k.split(".conv_seg.", 1)[1] in targets:
            out[cls + k.split(".conv_seg.", 1)[1]] = v
        elif head in ("decode_head", "auxiliary_head"):
            if getattr(model, head, None) is None:
                left.append(k)
                continue
            tk = _head_key(rest, head, targets)
            if tk is None:
                left.append(k)
            else:
                out[tk] = v
        elif head == "data_preprocessor" or IGNORED.search(k):
            continue
        else:
            left.append(k)
    if left:
        raise ConfigError(f"{source}: {_count(len(left), 'mmseg key')} without a densefuse parameter: {_listing(left)}")
    missing = [k for k in targets if k not in out and not NOT_IN_SOURCE.search(k) and not _is_buffer_stat(k)]
    if missing:
        raise ConfigError(f"{source}: no value for {_count(len(missing), 'densefuse key')}: {_listing(missing)}")
    _check_shapes(out, targets, source)
    return out


def load_mmseg_segmentor(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an mmseg segmentor checkpoint file into ``model`` (built from the matching densefuse config).
    The equalizers stay uncalibrated: run ``densefuse calibrate`` (or :func:`densefuse.calibrate`) next."""
    state = convert_mmseg_segmentor(load_state_file(path), model, str(path))
    model.load_state_dict(state, strict=False)
    return model


# --- the inverse mapping (densefuse -> mmseg names), used to write mmseg-format files and by the tests ----------


def _timm_to_mmseg_backbone(full: StateDict, family: str) -> StateDict:
    out: StateDict = {}
    for k, v in full.items():
        nk = k
        if family == "swin":
            m = re.match(r"^layers\.(\d+)\.downsample\.(.*)$", k)
            if m:
                out[f"stages.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = _cat_to_unfold(v)
                continue
            nk = re.sub(r"^layers\.", "stages.", nk).replace(".attn.", ".attn.w_msa.")
            nk = nk.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
            nk = nk.replace("patch_embed.proj.", "patch_embed.projection.")
        elif family == "twins":
            m = re.match(r"^blocks\.(.*)\.attn\.kv\.(weight|bias)$", k)
            if m:
                continue
            m = re.match(r"^blocks\.(.*)\.attn\.q\.(weight|bias)$", k)
            if m:
                kv = full[f"blocks.{m.group(1)}.attn.kv.{m.group(2)}"]
                out[f"layers.{m.group(1)}.attn.attn.in_proj_{m.group(2)}"] = torch.cat([v, kv])
                continue
            if nk.startswith("patch_embeds."):
                nk = nk.replace(".proj.", ".projection.")
            elif nk.startswith("pos_block."):
                nk = re.sub(r"^pos_block\.(\d+)\.proj\.0\.", r"position_encodings.\1.proj.", nk)
            else:
                glob = re.match(r"^blocks\.(\d+)\.(\d+)\.attn\.proj\.", k)
                if glob and f"blocks.{glob.group(1)}.{glob.group(2)}.attn.kv.weight" in full:
                    nk = nk.replace(".attn.proj.", ".attn.attn.out_proj.")
                nk = re.sub(r"^blocks\.", "layers.", nk)
                nk = nk.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
        elif family == "convnext":
            nk = re.sub(r"^stem\.", "downsample_layers.0.", nk)
            nk = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", nk)
            nk = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", nk)
            nk = nk.replace(".conv_dw.", ".depthwise_conv.").replace(".mlp.fc1.", ".pointwise_conv1.")
            nk = nk.replace(".mlp.fc2.", ".pointwise_conv2.")
        elif family == "resnet":
            inv = {v2: k2 for k2, v2 in _STEM_V1C.items()}
            m = re.match(r"^(conv1\.\d|bn1)\.(.*)$", k)
            if m:
                nk = f"stem.{inv[m.group(1)]}.{m.group(2)}"
        out[nk] = v
    return out


def to_mmseg_state_dict(model: nn.Module) -> StateDict:
    """A densefuse EncoderDecoder's weights under mmseg's names (``backbone.*``, ``decode_head.*``,
    ``auxiliary_head.*``), the inverse of :func:`convert_mmseg_segmentor`. Equalizer statistics are dropped."""
    enc = model.encoder
    family = getattr(enc, "family", "")
    sd = model.state_dict()
    full: StateDict = {}
    feat_targets = enc.model.state_dict()
    for fk in feat_targets:
        full_key = fk[len("model."):] if fk.startswith("model.") else re.sub(r"^([A-Za-z_]\w*?)_(\d+)\.", r"\1.\2.", fk)
        full[full_key] = sd["encoder.model." + fk]
    full = {k: v for k, v in full.items() if not k.endswith("relative_position_index")}
    out = {"backbone." + k: v for k, v in _timm_to_mmseg_backbone(full, family).items()}
    norm_name = "norm_list." if family == "twins" else "norm"
    for k, v in sd.items():
        if k.startswith("encoder.out_norms."):
            i, p = k[len("encoder.out_norms."):].split(".", 1)
            out[f"backbone.{norm_name}{i}.{p}"] = v
    inverse = [(news[i], old) for old, news in HEAD_RENAMES for i in range(len(news))]
    for k, v in sd.items():
        cls = next((old for old, new in CLASSIFIERS.items() if k.startswith(new)), None)
        if cls is not None:
            out[cls + k.split(".conv_seg.", 1)[1]] = v
            continue
        head, _, rest = k.partition(".")
        if head not in ("decode_head", "auxiliary_head") or NOT_IN_SOURCE.search(k):
            continue
        for new, old in inverse:
            if new.startswith("."):
                rest = rest.replace(new, old)
            elif rest.startswith(new):
                rest = old + rest[len(new):]
        out[f"{head}.{rest}"] = v
    return out


# --- mmseg 1.x training checkpoints, read without running anything from the file ------------------------------

#: Modules whose objects an mmseg/mmengine training checkpoint carries besides its weights (the message hub,
#: history buffers, numpy arrays and scalars). Their globals become inert :class:`_Stub` objects.
STUB_MODULES = ("mmengine", "mmseg", "mmcv", "mmpretrain", "mmdet", "numpy")

#: Globals rebuilt for real: tensors and their storages (the weights), and plain containers.
_REAL_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"), ("torch._utils", "_rebuild_parameter_with_state"),
    ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"),
    ("builtins", "bytearray"), ("_codecs", "encode"),  # protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')
}


class _Stub:
    """Stands for an object of a training framework densefuse does not import: takes its arguments and
    state and does nothing with them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state: Any) -> None:
        self.state = state


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a global that no checkpoint needs (``os.system``, ``builtins.eval``, ...)."""


def _stub_class(module: str, name: str) -> type:
    return type(name, (_Stub,), {"__module__": f"densefuse.stub.{module}"})


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors, storages and plain containers; globals of :data:`STUB_MODULES` become stubs; any
    other global is refused before it could be called."""

    def find_class(self, module: str, name: str) -> Any:
        import _compat_pickle

        # protocol-2 files spell Python 3 names the Python 2 way (__builtin__, copy_reg)
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in _REAL_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] in STUB_MODULES:
            return _stub_class(module, name)
        raise RefusedGlobal(f"refers to {module}.{name}, which no checkpoint needs")


class _RestrictedPickle:
    """The ``pickle_module`` given to ``torch.load``: its ``Unpickler`` and ``load`` are the restricted ones
    (torch's zip reader subclasses ``Unpickler``; its legacy reader calls ``load``)."""

    __name__ = "densefuse_restricted_pickle"
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def is_mmseg_layout(obj: Any) -> bool:
    """An mmseg (mmengine) checkpoint: ``{'meta': ..., 'state_dict': {'backbone.*', 'decode_head.*', ...}}``."""
    if not isinstance(obj, Mapping) or "model" in obj or not isinstance(obj.get("state_dict"), Mapping):
        return False
    keys = [str(k) for k in obj["state_dict"]]
    return any(k.startswith("backbone.") for k in keys) and any(k.startswith("decode_head.") for k in keys)


def mmseg_tensors(obj: Mapping[str, Any]) -> StateDict:
    """The tensors of an mmseg checkpoint's ``state_dict`` (everything else in the file is left behind)."""
    sd = obj["state_dict"]
    out = {str(k): v for k, v in sd.items() if isinstance(v, Tensor)}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def read_mmseg_checkpoint(path: PathLike) -> Optional[StateDict]:
    """The ``state_dict`` tensors of an mmseg checkpoint file, or None when the file is not one.

    mmseg 1.x training runs pickle their ``message_hub``, optimizer and scheduler state with mmengine and
    numpy objects, which ``weights_only=True`` refuses. This reader rebuilds only tensors and plain
    containers; mmengine/mmseg/numpy objects become inert stubs; any other global (``os.system``,
    ``builtins.eval``, ...) stops the read with :class:`RefusedGlobal` before anything is called.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = torch.load(Path(path), map_location="cpu", pickle_module=_RestrictedPickle,  # type: ignore[arg-type]
                         weights_only=False)  # noqa: S614 - the restricted unpickler above, not pickle's
    return mmseg_tensors(obj) if is_mmseg_layout(obj) else None
