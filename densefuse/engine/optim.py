"""Optimizers (AdamW, SGD) and iteration-based schedules (poly with linear warmup)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.optim.lr_scheduler import LambdaLR

from ..errors import ConfigError

_NORMS = (_BatchNorm, nn.GroupNorm, nn.LayerNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_decay: bool) -> list[dict]:
    """Two groups: decayed weights, and (unless ``norm_decay``) norm parameters and biases without decay."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if not norm_decay and (isinstance(module, _NORMS) or name == "bias" or p.ndim <= 1):
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """``cfg`` is the ``optim`` section: type (adamw | sgd), lr, weight_decay, momentum, betas, norm_decay."""
    groups = param_groups(model, cfg["weight_decay"], cfg.get("norm_decay", True))
    kind = cfg["type"].lower()
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg.get("betas", (0.9, 0.999))))
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg.get("momentum", 0.9))
    raise ConfigError(f"unknown optim.type '{cfg['type']}' (use adamw or sgd)")


def lr_factor(it: int, total: int, cfg: Mapping[str, Any], base_lr: float) -> float:
    """LR multiplier at iteration ``it``: linear warmup from ``warmup_ratio`` over ``warmup_iters``
    (mmengine LinearLR), then poly decay ``(1 - t/T)^power`` towards ``min_lr`` (mmengine PolyLR)."""
    warm = int(cfg.get("warmup_iters", 0))
    kind = cfg.get("type", "poly")
    if kind not in ("poly", "constant"):
        raise ConfigError(f"unknown schedule.type '{kind}' (use poly or constant)")
    if kind == "constant":
        factor = 1.0
    else:
        t = min(max(it - warm, 0), max(total - warm, 1))
        span = max(total - warm, 1)
        min_factor = cfg.get("min_lr", 0.0) / base_lr if base_lr > 0 else 0.0
        factor = min_factor + (1 - min_factor) * (1 - t / span) ** cfg.get("power", 1.0)
    if it < warm:
        ratio = cfg.get("warmup_ratio", 1e-6)
        factor *= ratio + (1 - ratio) * it / warm
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any], total_iters: int) -> LambdaLR:
    base_lr = optimizer.param_groups[0]["lr"]
    return LambdaLR(optimizer, lambda it: lr_factor(it, total_iters, cfg, base_lr))
