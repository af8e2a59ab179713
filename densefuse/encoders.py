"""timm ``features_only`` encoders returning NCHW feature lists with their channels and strides.

Besides any timm name, the encoders of the paper's tables are available under mmseg-like names
(:data:`PAPER_ENCODERS`: ``swin-t``, ``twins-svt-s``, ``convnext-t``, ``r101-d8``, ...). They set the timm
model, the recipe's drop_path, the valid feature levels and mmseg's per-output norms (Swin ``norm0-3``,
Twins ``norm_after_stage``, ConvNeXt LayerNorm2d): without those norms the heads see raw features whose
scale differs from mmseg's, which changes the very disequilibrium the equalizer corrects.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

#: timm families whose features come out NHWC or need a fixed image size unless told otherwise.
_ANY_SIZE_KWARGS = {"swin": {"dynamic_img_size": True}}


@dataclass(frozen=True)
class EncoderSpec:
    """A paper encoder: the timm model and the mmseg recipe's settings around it."""

    timm_name: str
    out_indices: tuple[int, ...]
    drop_path_rate: float = 0.0
    out_norm: Optional[str] = None  # "ln": a LayerNorm over channels on every output (eps below)
    norm_eps: float = 1e-5
    output_stride: Optional[int] = None
    kwargs: dict = field(default_factory=dict)
    family: str = ""  # swin | twins | convnext | resnet: the checkpoint-conversion and layer-decay rules


#: Swin's patch size: mmseg pads any input to a multiple of it, timm's patch embedding refuses other sizes
SWIN_PATCH = 4
_SWIN = dict(out_indices=(0, 1, 2, 3), drop_path_rate=0.3, out_norm="ln", family="swin")
_TWINS = dict(out_indices=(0, 1, 2, 3), out_norm="ln", family="twins")
# mmpretrain ConvNeXt: LayerNorm2d(eps=1e-6) on every output, layer_scale_init_value=1.0 in the recipes
_CONVNEXT = dict(out_indices=(0, 1, 2, 3), out_norm="ln", norm_eps=1e-6, family="convnext",
                 kwargs={"ls_init_value": 1.0})
# mmseg ResNetV1c-D8: deep stem, strides (1,2,1,1), dilations (1,1,2,4) = timm resnet*c with output_stride 8
_RESNET_D8 = dict(out_indices=(1, 2, 3, 4), output_stride=8, family="resnet")

#: mmseg-like encoder names of the paper's rows -> their specification.
PAPER_ENCODERS: dict[str, EncoderSpec] = {
    "swin-t": EncoderSpec("swin_tiny_patch4_window7_224", **_SWIN),
    "swin-s": EncoderSpec("swin_small_patch4_window7_224", **_SWIN),
    "swin-b": EncoderSpec("swin_base_patch4_window7_224", **_SWIN),
    "twins-svt-s": EncoderSpec("twins_svt_small", drop_path_rate=0.2, **_TWINS),
    "twins-svt-b": EncoderSpec("twins_svt_base", drop_path_rate=0.2, **_TWINS),
    "twins-svt-l": EncoderSpec("twins_svt_large", drop_path_rate=0.3, **_TWINS),
    "convnext-t": EncoderSpec("convnext_tiny", drop_path_rate=0.4, **_CONVNEXT),
    "convnext-s": EncoderSpec("convnext_small", drop_path_rate=0.3, **_CONVNEXT),
    "convnext-b": EncoderSpec("convnext_base", drop_path_rate=0.4, **_CONVNEXT),
    "r50-d8": EncoderSpec("resnet50c", **_RESNET_D8),
    "r101-d8": EncoderSpec("resnet101c", **_RESNET_D8),
}


def encoder_family(name: str) -> str:
    """``swin | twins | convnext | resnet`` for a paper name or a timm name ('' when unknown)."""
    if name in PAPER_ENCODERS:
        return PAPER_ENCODERS[name].family
    for fam in ("swin", "twins", "convnext", "resnet"):
        if name.startswith(fam):
            return fam
    return ""


class OutputNorms(nn.ModuleList):
    """One channel LayerNorm per output level (mmseg's ``norm{i}`` / ``norm_list``), on NCHW maps."""

    def __init__(self, channels: Sequence[int], eps: float) -> None:
        from timm.layers import LayerNorm2d

        super().__init__(LayerNorm2d(c, eps=eps) for c in channels)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:  # type: ignore[override]
        return [norm(f) for norm, f in zip(self, feats)]


def timm_cache_file(timm_name: str) -> Optional[Path]:
    """The pretrained file of ``timm_name`` if the HF hub or torch hub cache already holds it (no download)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    if cfg is None:
        return None
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(cfg.hf_hub_id, fname)
            if isinstance(hit, str) and os.path.isfile(hit):
                return Path(hit)
    if cfg.url:
        from torch.hub import get_dir

        hit = Path(get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if hit.is_file():
            return hit
    return None


def _missing_cache_message(timm_name: str) -> str:
    import timm

    cfg = timm.models.get_pretrained_cfg(timm_name)
    where = cfg.hf_hub_id if cfg is not None and cfg.hf_hub_id else (cfg.url if cfg is not None else "?")
    return (f"pretrained weights for '{timm_name}' are not in the timm/Hugging Face cache "
            f"(model.encoder.pretrained: true); densefuse never downloads. On a machine with internet run "
            f"`python -c \"import timm; timm.create_model('{timm_name}', pretrained=True)\"` (fetches {where} "
            f"into ~/.cache/huggingface), or set model.encoder.pretrained to a local .pth/.safetensors file "
            f"(timm, or mmseg/mmpretrain format: it is converted)")


PRETRAINED_KEY = "model.encoder.pretrained"


def weights_path(timm_name: str, pretrained: Union[str, bool, None]) -> Optional[Path]:
    """The file ``model.encoder.pretrained`` stands for: none for ``None``/``False``, timm's cached file
    for ``True``, else the named file, which must exist and be a file (one :class:`ConfigError` each)."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        hit = timm_cache_file(timm_name)
        if hit is None:
            raise ConfigError(_missing_cache_message(timm_name))
        return hit
    path = Path(str(pretrained)).expanduser()
    if not path.exists():
        raise ConfigError(_missing_file_message(str(pretrained)))
    if not path.is_file():
        raise ConfigError(f"pretrained weights {pretrained} ({PRETRAINED_KEY}) is not a file")
    return path


def check_pretrained(pretrained: Union[str, bool, None], name: str) -> Optional[Path]:
    """The weights file ``model.encoder.pretrained`` names for encoder ``name``, checked without building
    anything: it exists, is a file, and reads as a weights-only checkpoint (``.safetensors``: its header;
    else ``torch.load(weights_only=True)``, memory-mapped so a large file costs little). ``True``: the
    file in timm's local cache. ``None``/``False``: no file. Any problem is one :class:`ConfigError`
    naming the file and the key; nothing in a malicious file runs."""
    timm_name = name
    if pretrained is True:
        import timm

        spec = PAPER_ENCODERS.get(name)
        timm_name = spec.timm_name if spec else name
        if not timm.is_model(timm_name):
            return None  # the encoder's own check names the unknown encoder
    path = weights_path(timm_name, pretrained)
    if path is None or pretrained is True:
        return path
    try:
        _read_weights(path)
    except OSError as e:
        raise ConfigError(f"cannot read pretrained weights {pretrained} ({PRETRAINED_KEY}): {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse is the user's file: one clear line
        raise ConfigError(f"cannot load weights from {pretrained} ({PRETRAINED_KEY}): not a weights-only "
                          f"PyTorch/safetensors checkpoint ({type(e).__name__}: {_reason(e)})") from None
    return path


def _reason(error: Exception) -> str:
    """The part of a load error that names what is wrong with the file (torch's weights-only refusal
    first explains its defaults and how to load unsafely, which is not advice for a file we refuse)."""
    import re

    text = str(error).strip()
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = found.group(1) if found else (text.splitlines() or [type(error).__name__])[0]
    return line.split(". ")[0].strip()[:200]


def _read_weights(path: Path) -> None:
    """Read ``path`` as weights (safetensors header, or a weights-only ``torch.load``); raise on anything else."""
    import torch

    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return
    try:  # zip-format checkpoints (torch >= 1.6) map lazily; legacy ones cannot be memory-mapped
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"it holds a {type(obj).__name__}, not a mapping of names to tensors")


def _missing_file_message(pretrained: str) -> str:
    return (f"pretrained weights not found: {pretrained} ({PRETRAINED_KEY}): download it "
            f"(the paper configs' files are listed in docs/paper.md, 'Pretrained weights'), or give "
            f"another local .pth/.safetensors file (timm, mmseg or mmpretrain format), `true` for "
            f"timm's weights in the local cache, or null")


class TimmEncoder(nn.Module):
    """A timm backbone as a list of NCHW features.

    Args:
        name: a paper name from :data:`PAPER_ENCODERS` (``swin-t``, ``convnext-b``, ``r101-d8``, ...) or a timm
            model name (``resnet50``, ``convnext_tiny``, ``swin_tiny_patch4_window7_224``, ...).
        out_indices: which feature levels to return (timm's indices; resnet 1..4 = layer1..4, Swin/Twins/ConvNeXt
            0..3); ``None`` = the family's default. An index out of range is a :class:`ConfigError` naming the range.
        output_stride: 8 or 16 dilates the last stages (resnet, convnext); ``None`` keeps the name's default.
        pretrained: a local ``.pth``/``.safetensors`` file (timm, or an mmseg/mmpretrain backbone checkpoint,
            converted by :mod:`densefuse.convert`), ``True`` for timm's weights from the local HF/torch hub
            cache, or ``None``/``False`` for random init. Nothing is ever downloaded.
        out_norm: ``"ln"`` adds a LayerNorm on every output (paper names set it), ``None`` disables it.
        **kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``img_size``, ...); they override the
            paper name's defaults.
    """

    def __init__(
        self,
        name: str,
        out_indices: Optional[Sequence[int]] = None,
        output_stride: Optional[int] = None,
        pretrained: Union[str, bool, None] = None,
        out_norm: Union[str, None, bool] = "default",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import timm  # deferred: importing timm costs ~1.5 s, which CLI error paths should not pay

        spec = PAPER_ENCODERS.get(name)
        timm_name = spec.timm_name if spec else name
        if not timm.is_model(timm_name):
            raise ConfigError(f"unknown timm encoder 'model.encoder.name: {name}' (or a paper encoder: "
                              f"{', '.join(PAPER_ENCODERS)})")
        extra: dict[str, Any] = {}
        for prefix, kw in _ANY_SIZE_KWARGS.items():
            if timm_name.startswith(prefix):
                extra.update(kw)
        if spec is not None:
            if spec.drop_path_rate:
                extra["drop_path_rate"] = spec.drop_path_rate
            extra.update(spec.kwargs)
            if output_stride is None:
                output_stride = spec.output_stride
            if out_indices is None:
                out_indices = spec.out_indices
        extra.update(kwargs)
        if output_stride not in (None, 32):
            if output_stride not in (8, 16):
                raise ConfigError(f"model.encoder.output_stride must be 8, 16 or 32, got {output_stride}")
            extra["output_stride"] = output_stride
        if out_indices is None:
            out_indices = _default_out_indices(timm_name)
        out_indices = tuple(int(i) for i in out_indices)
        if not out_indices:
            raise ConfigError("model.encoder.out_indices must not be empty")
        weights = weights_path(timm_name, pretrained)
        try:
            self.model = timm.create_model(timm_name, features_only=True, out_indices=out_indices, **extra)
        except (IndexError, AssertionError) as e:  # timm's raw error for a feature level it does not have
            _check_out_indices(timm_name, out_indices)
            raise ConfigError(f"encoder '{name}' with out_indices {list(out_indices)}: {e}") from None
        except TypeError as e:
            if "output_stride" in str(e):
                raise ConfigError(f"encoder '{name}' does not support output_stride={output_stride}") from None
            raise ConfigError(f"encoder '{name}': {e}") from None
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = list(info.reduction())
        self._nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self.name = name
        self.timm_name = timm_name
        self.family = encoder_family(name)
        if out_norm == "default":
            out_norm = spec.out_norm if spec else None
        if out_norm not in (None, False, "ln"):
            raise ConfigError(f"model.encoder out_norm must be 'ln' or null, got {out_norm!r}")
        eps = spec.norm_eps if spec else 1e-5
        self.out_norms = OutputNorms(self.channels, eps) if out_norm == "ln" else None
        if spec is not None and self.family in ("swin", "twins"):
            use_mmseg_windows(self.model, self.family)
        # mmseg's Twins applies ``norm_after_stage`` inside the backbone: the normed map feeds the next stage
        # (Swin's and ConvNeXt's output norms only touch the outputs). One norm per stage, as mmseg's norm_list.
        self._inline_norms = self.out_norms is not None and self.family == "twins"
        if self._inline_norms:
            self.out_norms = OutputNorms(list(self.model.model.embed_dims), eps)
        self._out_indices = out_indices
        if weights is not None:
            from .convert import load_encoder_weights

            try:
                load_encoder_weights(self, weights)
            except ConfigError as e:  # name the config key that gave the file
                raise ConfigError(f"model.encoder.pretrained: {e}") from None

    def forward(self, x: Tensor) -> list[Tensor]:
        if self._inline_norms:
            return self._twins_forward(x)
        if self.family == "swin":  # mmseg's AdaptivePadding("corner"): zeros below and right to the 4-pixel patch
            x = F.pad(x, (0, -x.shape[-1] % SWIN_PATCH, 0, -x.shape[-2] % SWIN_PATCH))
        feats = self.model(x)
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        feats = list(feats)
        if self.out_norms is not None:
            feats = self.out_norms(feats)
        return feats


    def _twins_forward(self, x: Tensor) -> list[Tensor]:
        """timm Twins' stages with mmseg's ``norm_after_stage``: each stage's map is normed before the next."""
        net = self.model.model
        take = {i % len(net.blocks) for i in self._out_indices}
        feats = []
        stages = zip(net.patch_embeds, net.pos_drops, net.blocks, net.pos_block, self.out_norms)
        for i, (embed, drop, blocks, pos_block, norm) in enumerate(stages):
            x, size = embed(x)
            x = drop(x)
            for j, block in enumerate(blocks):
                x = block(x, size)
                if j == 0:
                    x = pos_block(x, size)  # the position encoding (PEG) after each stage's first block
            x = norm(x.reshape(x.shape[0], *size, -1).permute(0, 3, 1, 2).contiguous())
            if i in take:
                feats.append(x)
        return feats


def _swin_shift_mask(hp: int, wp: int, ws: int, shift: int, device: torch.device) -> Tensor:
    """mmseg's SW-MSA mask on the padded (hp, wp) map: (windows, ws*ws, ws*ws), -100 across shifted regions."""
    region = torch.zeros((1, hp, wp, 1), device=device)
    cuts = (slice(0, -ws), slice(-ws, -shift), slice(-shift, None))
    for i, (h, w) in enumerate((h, w) for h in cuts for w in cuts):
        region[:, h, w, :] = i
    windows = region.view(1, hp // ws, ws, wp // ws, ws, 1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


def _mmseg_swin_attn(block: nn.Module, x: Tensor, masks: Optional[dict] = None) -> Tensor:
    """(Shifted) window attention of one timm Swin block the way mmseg's ``ShiftWindowMSA`` does it: pad the map
    to whole windows first, then roll by the block's shift (also when the map is no larger than a window, where
    timm drops the shift), masking only across the rolled regions (padded tokens are attended to).
    ``masks`` caches the shift masks by map size, device and dtype."""
    from timm.models.swin_transformer import window_partition, window_reverse

    b, h, w, c = x.shape
    ws = block.attn.window_size[0]
    shift = block.target_shift_size[0]
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    mask = None
    if shift > 0:
        x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        key = (hp, wp, x.device, x.dtype)
        mask = masks.get(key) if masks is not None else None
        if mask is None:
            mask = _swin_shift_mask(hp, wp, ws, shift, x.device).to(x.dtype)
            if masks is not None:
                masks[key] = mask
    windows = block.attn(window_partition(x, (ws, ws)).view(-1, ws * ws, c), mask=mask)
    x = window_reverse(windows.view(-1, ws, ws, c), (ws, ws), hp, wp)
    if shift > 0:
        x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
    return x[:, :h, :w, :].contiguous()


def _mmseg_twins_lsa(attn: nn.Module, x: Tensor, size: tuple[int, int]) -> Tensor:
    """Locally-grouped attention of timm Twins the way mmseg's ``LSAEntity`` does it: the map is padded to whole
    windows and padded tokens are masked (-1000) from real ones, but (mmseg's indexing) only when both the
    bottom and the right need padding; with padding on one side only, nothing is masked, as in mmseg."""
    b, n, c = x.shape
    h, w = size
    ws, heads = attn.ws, attn.num_heads
    pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
    x = F.pad(x.view(b, h, w, c), (0, 0, 0, pad_r, 0, pad_b))
    hp, wp = h + pad_b, w + pad_r
    gh, gw = hp // ws, wp // ws
    mask = None
    if pad_b > 0 and pad_r > 0:
        pad = torch.zeros((1, hp, wp), device=x.device, dtype=x.dtype)
        pad[:, h:, :] = 1
        pad[:, :, w:] = 1
        pad = pad.reshape(1, gh, ws, gw, ws).transpose(2, 3).reshape(1, gh * gw, ws * ws)
        diff = pad.unsqueeze(2) - pad.unsqueeze(3)
        mask = diff.masked_fill(diff != 0, -1000.0).unsqueeze(2)  # (1, windows, 1, ws*ws, ws*ws)
    x = x.reshape(b, gh, ws, gw, ws, c).transpose(2, 3)
    qkv = attn.qkv(x).reshape(b, gh * gw, ws * ws, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    x = x.transpose(2, 3).reshape(b, gh, gw, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
    x = x[:, :h, :w, :].reshape(b, n, c)
    return attn.proj_drop(attn.proj(x))


class _SwinBlockForward:
    """Bound as a timm Swin block's ``_attn`` (picklable, unlike a lambda)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block
        self.masks: dict = {}

    def __call__(self, x: Tensor) -> Tensor:
        return _mmseg_swin_attn(self.block, x, self.masks)

    def __getstate__(self) -> dict:
        return {"block": self.block, "masks": {}}


def use_mmseg_windows(model: nn.Module, family: str) -> int:
    """Switch timm Swin / Twins window attention to mmseg's border handling; returns how many modules changed.

    Swin: pad to whole windows, then shift (timm shifts first and pads after, and drops the shift of a block
    whose map fits in one window at the 224 pretraining size, i.e. every second block of the last stage).
    Twins: mmseg's padding mask in the locally-grouped attention. Both matter at the paper's 512x512 crops
    (maps of 128, 64, 32, 16 are no multiple of 7). Parameters and state_dict keys are unchanged.
    """
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if family == "swin" and name == "SwinTransformerBlock":
            module._attn = _SwinBlockForward(module)
            changed += 1
        elif family == "twins" and name == "LocallyGroupedAttn":
            module.forward = functools.partial(_mmseg_twins_lsa, module)
            changed += 1
    return changed


def _num_levels(timm_name: str) -> int:
    """How many feature levels timm's ``features_only`` model of ``timm_name`` has (built on the meta device)."""
    import timm
    import torch

    with torch.device("meta"):
        m = timm.create_model(timm_name, features_only=True, pretrained=False)
    return len(m.feature_info)


def _default_out_indices(timm_name: str) -> tuple[int, ...]:
    n = _num_levels(timm_name)
    return tuple(range(max(n - 4, 0), n))


def _check_out_indices(timm_name: str, out_indices: tuple[int, ...]) -> None:
    n = _num_levels(timm_name)
    bad = [i for i in out_indices if not -n <= i < n]
    if bad:
        raise ConfigError(f"model.encoder.out_indices {list(out_indices)} invalid for '{timm_name}': it has {n} "
                          f"feature levels, valid indices are 0..{n - 1}")
