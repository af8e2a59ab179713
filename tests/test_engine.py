"""Optimizer groups, poly schedule with warmup, atomic checkpoints."""
import os

import pytest
import torch
from torch import nn

from densefuse import DensefuseError
from densefuse.engine import build_optimizer, build_scheduler, load_checkpoint, save_checkpoint
from densefuse.engine.optim import lr_factor


def test_poly_with_linear_warmup_matches_mmengine_formula():
    cfg = {"type": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 10, "warmup_ratio": 1e-6}
    assert lr_factor(0, 100, cfg, 1.0) == pytest.approx(1e-6)
    assert lr_factor(5, 100, cfg, 1.0) == pytest.approx(1e-6 + (1 - 1e-6) * 0.5)
    assert lr_factor(10, 100, cfg, 1.0) == pytest.approx(1.0)
    assert lr_factor(55, 100, cfg, 1.0) == pytest.approx(0.5)
    assert lr_factor(100, 100, cfg, 1.0) == pytest.approx(0.0)
    cfg9 = {"type": "poly", "power": 0.9, "min_lr": 1e-4, "warmup_iters": 0}
    # eta_min + (lr0 - eta_min) * (1 - t/T)^p
    assert lr_factor(50, 100, cfg9, 0.01) * 0.01 == pytest.approx(1e-4 + (0.01 - 1e-4) * 0.5**0.9)


def test_scheduler_drives_optimizer_lr():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = build_optimizer(model, {"type": "sgd", "lr": 0.1, "weight_decay": 5e-4, "momentum": 0.9, "norm_decay": False})
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]
    assert len(opt.param_groups[1]["params"]) == 3  # conv bias, bn weight, bn bias
    sched = build_scheduler(opt, {"type": "poly", "power": 1.0, "warmup_iters": 0}, total_iters=10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


def test_adamw_and_unknown_optimizer():
    model = nn.Linear(2, 2)
    opt = build_optimizer(model, {"type": "adamw", "lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.99]})
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.99)
    with pytest.raises(DensefuseError, match="unknown optim.type 'adam'"):
        build_optimizer(model, {"type": "adam", "lr": 1e-3, "weight_decay": 0.0})


def test_checkpoint_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "ck.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "iter": 3, "config": {"a": [1, 2]}})
    assert load_checkpoint(path)["iter"] == 3
    assert torch.load(path, weights_only=True)["config"] == {"a": [1, 2]}

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"iter": 4, "bad": Boom()})
    assert load_checkpoint(path)["iter"] == 3  # the old file survives a failed save
    assert os.listdir(tmp_path) == ["ck.pth"]  # no temp files left behind


def test_corrupt_and_missing_checkpoints(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(DensefuseError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "bad.pth")
    with pytest.raises(DensefuseError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pth")
