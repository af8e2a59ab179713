"""GEDepth-style monocular depth model: timm encoder (+ RGB conv stem when its first level is at
stride 4), ground depth as an extra input channel, optionally DepthFormer's HAHI neck (``model.neck``),
DenseDepth decoder, ground attention (and slope); GEDepth's or PyTorch's init (``model.init``)."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densefuse.config import check_kwargs
from densefuse.encoders import TimmEncoder
from densefuse.errors import ConfigError
from densefuse.registry import MODELS

from .geometry import GROUND_MAX_DEPTH, adapt_ground, slope_bins
from .hahi import HAHINeck
from .heads import DenseDepthHead, LevelSumHead

GROUND_MODES = ("vanilla", "adaptive", "none")
#: ``model.type`` of the depth model (a builder in densefuse's MODELS registry)
MODEL_TYPE = "gedepth"
#: accepted keys of ``model.decode_head`` for the depth model
HEAD_KEYS = ("type", "widths", "stem_channels", "attention_channels")
#: accepted keys of ``model.neck`` (GEDepth's HAHI: 512 wide, 8 heads, 8 points)
NECK_KEYS = ("type", "embedding_dim", "num_heads", "num_points", "dropout")
NECK_DEFAULTS = {"type": "hahi", "embedding_dim": 512, "num_heads": 8, "num_points": 8, "dropout": 0.1}
#: ``model.init`` values: GEDepth's (mmcv) initialisation, or PyTorch's defaults
INITS = ("gedepth", "torch")


def check_neck_config(neck: Optional[Mapping[str, Any]]) -> Optional[dict[str, Any]]:
    """``model.neck`` with defaults filled in (None: no neck); unknown keys or values are ConfigError."""
    if neck is None:
        return None
    check_kwargs("model.neck", neck, NECK_KEYS)
    out = {**NECK_DEFAULTS, **neck}
    if out["type"] != "hahi":
        raise ConfigError(f"model.neck.type must be 'hahi' (DepthFormer's HAHI, as GEDepth) or model.neck null, "
                          f"got '{out['type']}'")
    for key in ("embedding_dim", "num_heads", "num_points"):
        v = out[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"model.neck.{key} must be a positive int, got {v!r}")
    if out["embedding_dim"] % (2 * out["num_heads"]):
        raise ConfigError(f"model.neck.embedding_dim ({out['embedding_dim']}) must be a multiple of 2 x num_heads "
                          f"({out['num_heads']})")
    if not isinstance(out["dropout"], (int, float)) or isinstance(out["dropout"], bool) or not 0 <= out["dropout"] < 1:
        raise ConfigError(f"model.neck.dropout must be in [0, 1), got {out['dropout']!r}")
    return out


def init_gedepth(model: "GEDepth") -> None:
    """GEDepth's initialisation of what densefuse builds itself (the encoder keeps its own or pretrained
    weights): mmcv ``ConvModule``'s MSRA init in the decoder (kaiming normal, fan_out, bias 0; leaky_relu
    a=0.01 before a LeakyReLU, relu for the 1x1 bottleneck), PyTorch's default on the depth conv (GEDepth's
    plain ``nn.Conv2d``), Xavier-uniform (bias 0) in the ground-attention and slope necks, and HAHI's own."""
    head = model.decode_head
    nn.init.kaiming_normal_(head.bottleneck.weight, a=0, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(head.bottleneck.bias)
    for fusion in head.fusions:
        for m in fusion.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=head.negative_slope, mode="fan_out", nonlinearity="leaky_relu")
                nn.init.zeros_(m.bias)
    for neck in (model.attention, model.slope):
        for m in (neck.modules() if neck is not None else ()):
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
    if model.neck is not None:
        model.neck.init_weights()


def check_head_config(head: Mapping[str, Any]) -> None:
    """``model.decode_head`` of the depth model: known keys, ``type: densedepth`` (ConfigError otherwise)."""
    check_kwargs("model.decode_head", head, HEAD_KEYS)
    if head.get("type", "densedepth") != "densedepth":
        raise ConfigError(f"model.decode_head.type must be 'densedepth' for the depth task, got '{head.get('type')}'")
    widths = head.get("widths")
    if widths is not None and (not isinstance(widths, (list, tuple))
                               or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths)):
        raise ConfigError(f"model.decode_head.widths must be a list of positive ints or null, got {widths!r}")
    for key in ("stem_channels", "attention_channels"):
        v = head.get(key, 64)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ConfigError(f"model.decode_head.{key} must be a positive int, got {v!r}")


def expand_input_conv(module: nn.Module, extra: int = 1) -> nn.Conv2d:
    """Give the first 3-channel Conv2d in ``module`` ``extra`` more input channels whose weights are 0,
    so pretrained RGB weights (already loaded) still compute the same function at initialization."""
    for name, conv in module.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            new = nn.Conv2d(3 + extra, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:, :3].copy_(conv.weight)
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], new)
            return new
    raise ConfigError("the encoder has no 3-channel input conv to add the ground-depth channel to")


class GEDepth(nn.Module):
    """Depth ``D = (1 - y) * R + y * G + min_depth`` (GEDepth); ``ground_embedding="none"`` gives plain
    DenseDepth, ``D = R + min_depth``.

    ``forward(image, ground)``: ``image`` (B,3,H,W) normalized, ``ground`` (B,1,H,W) flat-ground depth in
    metres (0 = no ground). Returns ``{"out": D (B,1,H,W), "residual": R, "attention": y,
    "slope_logits": (B,bins,H,W) (adaptive)}`` at input resolution; in eval mode ``out`` is clamped to
    ``[min_depth, max_depth]``.

    R, y and the slope logits come at 1/2 resolution and are upsampled (R bilinear with
    align_corners=True, y and logits with align_corners=False, as GEDepth); G is used at full
    resolution, so on ground pixels with ``y = 1`` the output is exactly the ground depth.
    """

    def __init__(self, encoder: TimmEncoder, ground_embedding: str = "vanilla", widths: Optional[Sequence[int]] = None,
                 mode: str = "explicit", eps: float = 1e-5, stem_channels: int = 64, attention_channels: int = 64,
                 camera_height: float = 1.65, min_depth: float = 1e-3, max_depth: float = 80.0,
                 num_slope_bins: int = 11, slope_range: float = 5.0, neck: Optional[Mapping[str, Any]] = None,
                 init: str = "torch") -> None:
        super().__init__()
        if ground_embedding not in GROUND_MODES:
            raise ConfigError(f"depth.ground_embedding must be one of {', '.join(GROUND_MODES)}, got '{ground_embedding}'")
        self.ground_embedding = ground_embedding
        self.camera_height, self.min_depth, self.max_depth = float(camera_height), float(min_depth), float(max_depth)
        self.encoder = encoder
        strides = list(encoder.strides)
        channels = list(encoder.channels)
        self.stem: Optional[nn.Module] = None
        if strides and strides[0] == 4:  # Swin / ConvNeXt: a conv stem on RGB adds the stride-2 level
            self.stem = nn.Sequential(nn.Conv2d(3, stem_channels, 7, 2, 3, bias=False), nn.BatchNorm2d(stem_channels),
                                      nn.ReLU(inplace=True))
            strides, channels = [2] + strides, [stem_channels] + channels
        if strides != [2, 4, 8, 16, 32]:
            raise ConfigError(f"the depth model needs encoder features at strides 2, 4, 8, 16, 32 (or 4..32); "
                              f"'{encoder.name}' gives {strides}: check model.encoder.out_indices")
        self.channels = channels
        neck = check_neck_config(neck)
        self.neck: Optional[HAHINeck] = None
        if neck is not None:  # GEDepth: HAHI keeps every level's channels, so the heads are unchanged
            self.neck = HAHINeck(channels, channels, neck["embedding_dim"], neck["num_heads"], neck["num_points"],
                                 float(neck["dropout"]))
        if ground_embedding != "none":
            expand_input_conv(encoder.model, 1)
        self.decode_head = DenseDepthHead(channels, widths, mode=mode, eps=eps)
        self.attention = LevelSumHead(channels, attention_channels, 1) if ground_embedding != "none" else None
        self.slope = LevelSumHead(channels, attention_channels, num_slope_bins) if ground_embedding == "adaptive" else None
        self.register_buffer("slope_bins", slope_bins(num_slope_bins, slope_range), persistent=False)
        if init not in INITS:
            raise ConfigError(f"model.init must be one of {', '.join(INITS)}, got {init!r}")
        self.init = init
        if init == "gedepth":
            init_gedepth(self)

    @property
    def uses_ground(self) -> bool:
        return self.ground_embedding != "none"

    def features(self, image: Tensor, ground: Optional[Tensor]) -> list[Tensor]:
        x = image
        if self.uses_ground:
            if ground is None:
                raise ValueError("this depth model needs the ground depth map (ground_embedding is "
                                 f"'{self.ground_embedding}')")
            x = torch.cat([image, ground.to(image.dtype) / GROUND_MAX_DEPTH], dim=1)
        feats = self.encoder(x)
        if self.stem is not None:
            feats = [self.stem(image)] + feats
        if self.neck is not None:
            feats = self.neck(feats)
        return feats

    def forward(self, image: Tensor, ground: Optional[Tensor] = None,
                ground_inv: Optional[Tensor] = None) -> dict[str, Tensor]:
        """``ground_inv``: ``1/G`` of the unclipped plane (adaptive mode bends it, as GEDepth bends its
        unclipped map); without it ``1/G`` comes from ``ground`` with 0 where ``ground`` is 0, which is
        the same below the horizon only."""
        feats = self.features(image, ground)
        size = image.shape[-2:]
        r = F.interpolate(self.decode_head(feats), size=size, mode="bilinear", align_corners=True)
        out = {"residual": r}
        if not self.uses_ground:
            depth = r + self.min_depth
        else:
            assert ground is not None and self.attention is not None
            y = torch.sigmoid(F.interpolate(self.attention(feats), size=size, mode="bilinear", align_corners=False))
            g = ground.to(r.dtype)
            if self.slope is not None:
                logits = F.interpolate(self.slope(feats), size=size, mode="bilinear", align_corners=False)
                theta = (logits.softmax(1) * self.slope_bins.to(logits.dtype).view(1, -1, 1, 1)).sum(1, keepdim=True)
                if ground_inv is None:
                    ground_inv = torch.where(g > 0, 1.0 / g.clamp_min(1e-6), torch.zeros_like(g))
                g = adapt_ground(ground_inv.to(r.dtype), theta, self.camera_height)
                out["slope_logits"] = logits
                out["slope_deg"] = theta
            depth = (1 - y) * r + y * g + self.min_depth
            out["attention"] = y
        if not self.training:
            depth = depth.clamp(self.min_depth, self.max_depth)
        out["out"] = depth
        return out


@MODELS.register(MODEL_TYPE)
def build_depth_model(cfg: Mapping[str, Any]) -> GEDepth:
    """The depth model of a resolved config (``model.encoder``, ``model.decode_head``, ``model.equalizer``
    and the task section ``depth``); registered as ``model.type: gedepth``."""
    m, d = cfg["model"], cfg["depth"]
    head = m["decode_head"]
    enc = m["encoder"]
    encoder = TimmEncoder(enc["name"], enc["out_indices"], enc["output_stride"], enc["pretrained"],
                          **dict(enc["kwargs"] or {}))
    eq = m["equalizer"]
    return GEDepth(encoder, d["ground_embedding"], head.get("widths"), eq["mode"], eq["eps"],
                   int(head.get("stem_channels", 64)), int(head.get("attention_channels", 64)),
                   d["camera_height"], d["min_depth"], d["max_depth"], d["slope_bins"], d["slope_range"],
                   m["neck"], m["init"] or "torch")
