"""DepthFormer's HAHI neck (GEDepth's ``model.neck``) in plain PyTorch.

HAHI ("hierarchical aggregation and heterogeneous interaction") sits between the encoder and GEDepth's
decoder and heads: a 1x1 Conv-BN-ReLU per level, multi-scale deformable *self*-attention over the four
transformer levels (strides 4..32) and deformable *cross*-attention from the stride-2 conv level into
them, then a 3x3 Conv-BN-ReLU on ``cat[level, attention output]`` per level. The deformable attention is
the grid-sample formulation (Deformable DETR's reference path), so no compiled op is needed.

Parameter and buffer names follow the original module (``lateral_convs.0.conv.weight``,
``self_attn.sampling_offsets.weight``, ...), so its state_dict loads as is.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvBNReLU(nn.Module):
    """Conv (no bias) - BatchNorm - ReLU, named ``conv`` / ``bn`` as mmcv's ``ConvModule``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


def sine_position_encoding(batch: int, height: int, width: int, num_feats: int, device: torch.device,
                           temperature: float = 10000.0) -> Tensor:
    """DETR's unnormalized sine encoding of an unpadded map: (B, 2*num_feats, H, W), y features first."""
    y = torch.arange(1, height + 1, dtype=torch.float32, device=device).view(1, height, 1).expand(batch, height, width)
    x = torch.arange(1, width + 1, dtype=torch.float32, device=device).view(1, 1, width).expand(batch, height, width)
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def embed(pos: Tensor) -> Tensor:
        p = pos[..., None] / dim_t
        return torch.stack((p[..., 0::2].sin(), p[..., 1::2].cos()), dim=4).flatten(3)

    return torch.cat((embed(y), embed(x)), dim=3).permute(0, 3, 1, 2).contiguous()


def deformable_sample(value: Tensor, shapes: Sequence[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Multi-scale deformable attention's sampling and weighting with ``F.grid_sample``.

    Args:
        value: (B, S, heads, C/heads), the levels' tokens concatenated (row-major per level).
        shapes: (H, W) of every level.
        locations: (B, Q, heads, levels, points, 2), normalized (x, y) in [0, 1].
        weights: (B, Q, heads, levels, points), softmaxed over levels x points.
    Returns (B, Q, C).
    """
    b, _, heads, dim = value.shape
    _, q, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample's [-1, 1] with align_corners=False
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].flatten(2).transpose(1, 2).reshape(b * heads, dim, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (B*heads, Q, points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    w = weights.transpose(1, 2).reshape(b * heads, 1, q, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * w).sum(-1)  # (B*heads, dim, Q)
    return out.view(b, heads * dim, q).transpose(1, 2).contiguous()


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's multi-scale deformable attention (batch first), with its residual and dropout:
    ``identity + dropout(out_proj(sample(value_proj(value), ref + offsets(query + pos))))``."""

    def __init__(self, embed_dims: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims {embed_dims} must be divisible by num_heads {num_heads}")
        self.embed_dims, self.num_heads, self.num_levels, self.num_points = embed_dims, num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.dropout = nn.Dropout(dropout)
        self.init_weights()

    def init_weights(self) -> None:
        """Deformable DETR's init: zero offsets whose bias points each head in its own direction (point
        ``i`` at distance ``i + 1``), uniform attention, Xavier-uniform projections."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.num_heads, 1, 1, 2)
        grid = grid.repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, value: Tensor, query_pos: Tensor, reference_points: Tensor,
                shapes: Sequence[tuple[int, int]]) -> Tensor:
        """``query`` (B,Q,C), ``value`` (B,S,C), ``reference_points`` (B,Q,levels,2) normalized (x, y)."""
        b, q, _ = query.shape
        identity = query
        query = query + query_pos
        v = self.value_proj(value).view(b, value.shape[1], self.num_heads, -1)
        offsets = self.sampling_offsets(query).view(b, q, self.num_heads, self.num_levels, self.num_points, 2)
        weights = self.attention_weights(query).view(b, q, self.num_heads, self.num_levels * self.num_points)
        weights = weights.softmax(-1).view(b, q, self.num_heads, self.num_levels, self.num_points)
        normalizer = torch.tensor([[w, h] for h, w in shapes], dtype=query.dtype, device=query.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        out = self.output_proj(deformable_sample(v, shapes, locations, weights))
        return self.dropout(out) + identity


def grid_reference_points(shapes: Sequence[tuple[int, int]], batch: int, device: torch.device) -> Tensor:
    """Every token's pixel centre, normalized to [0, 1], repeated for every level: (B, S, levels, 2)."""
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1) / w, ry.reshape(-1) / h), -1))
    ref = torch.cat(refs, 0)
    return ref[None, :, None].expand(batch, -1, len(shapes), -1)


class HAHINeck(nn.Module):
    """DepthFormer's ``HAHIHeteroNeck`` (GEDepth's ``model.neck``).

    Args:
        in_channels: channels of the five levels, the stride-2 conv level first.
        out_channels: channels of the five outputs (GEDepth: equal to ``in_channels``).
        embedding_dim: attention width (GEDepth: 512; the sine encoding has ``embedding_dim // 2`` per axis).
        num_heads, num_points: of both deformable attentions (GEDepth: 8 and 8).
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int] | None = None,
                 embedding_dim: int = 512, num_heads: int = 8, num_points: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        out_channels = [int(c) for c in (out_channels or in_channels)]
        if len(in_channels) != 5 or len(out_channels) != 5:
            raise ValueError(f"HAHI needs 5 levels (a conv level and 4 transformer levels), got {in_channels}")
        if in_channels[0] != out_channels[0]:
            raise ValueError("HAHI's conv level keeps its channels (in_channels[0] == out_channels[0])")
        self.in_channels, self.out_channels, self.embedding_dim = in_channels, out_channels, int(embedding_dim)
        e = self.embedding_dim
        self.lateral_convs = nn.ModuleList(ConvBNReLU(i, o) for i, o in zip(in_channels, out_channels))
        self.trans_proj = nn.ModuleList(ConvBNReLU(o, e) for o in out_channels[1:])
        self.trans_fusion = nn.ModuleList(ConvBNReLU(o + e, o, 3) for o in out_channels[1:])
        self.conv_proj = nn.Sequential(ConvBNReLU(in_channels[0], e))
        self.conv_fusion = nn.Sequential(ConvBNReLU(in_channels[0] + e, out_channels[0], 3))
        self.reference_points = nn.Linear(e, 2)
        self.level_embed = nn.Parameter(torch.empty(4, e))
        self.multi_att = MultiScaleDeformableAttention(e, num_heads, 4, num_points, dropout)
        self.self_attn = MultiScaleDeformableAttention(e, num_heads, 4, num_points, dropout)
        nn.init.normal_(self.level_embed)

    def init_weights(self) -> None:
        """GEDepth's (DepthFormer's) init: Xavier-uniform on every matrix and conv, normal level embedding,
        then the deformable attentions' own init."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is not None:
                nn.init.zeros_(m.bias)
            elif isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != 5:
            raise ValueError(f"HAHI expects 5 feature levels, got {len(feats)}")
        projected = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        conv_level, trans = projected[0], projected[1:]
        b = conv_level.shape[0]
        shapes = [(int(t.shape[-2]), int(t.shape[-1])) for t in trans]
        e = self.embedding_dim
        tokens = torch.cat([proj(t).flatten(2).transpose(1, 2) for proj, t in zip(self.trans_proj, trans)], 1)
        pos = torch.cat([sine_position_encoding(b, h, w, e // 2, tokens.device).to(tokens.dtype).flatten(2).transpose(1, 2)
                         + self.level_embed[i].view(1, 1, -1) for i, (h, w) in enumerate(shapes)], 1)
        # HI: deformable self-attention over the four transformer levels
        src = self.self_attn(tokens, tokens, pos, grid_reference_points(shapes, b, tokens.device).to(tokens.dtype),
                             shapes)
        # HA: deformable cross-attention from the conv level into them
        skip = self.conv_proj(conv_level)
        h, w = skip.shape[-2:]
        query = skip.flatten(2).transpose(1, 2)
        query_pos = sine_position_encoding(b, h, w, e // 2, skip.device).to(skip.dtype).flatten(2).transpose(1, 2)
        ref = self.reference_points(query_pos).sigmoid()[:, :, None].expand(-1, -1, len(shapes), -1)
        fused = self.multi_att(query, src, query_pos, ref, shapes)
        outs = [self.conv_fusion(torch.cat([fused.transpose(1, 2).reshape(b, e, h, w), conv_level], 1))]
        start = 0
        for fusion, t, (th, tw) in zip(self.trans_fusion, trans, shapes):
            part = src[:, start:start + th * tw].transpose(1, 2).reshape(b, e, th, tw)
            start += th * tw
            outs.append(fusion(torch.cat([t, part], 1)))
        return outs
