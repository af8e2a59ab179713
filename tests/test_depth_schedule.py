"""GEDepth's learning-rate schedule: mmcv CosineAnnealing over the whole run, scaled by a linear warmup."""
import math

import pytest
import torch

from densefuse.engine.optim import build_scheduler, lr_factor

GEDEPTH = {"type": "cosine", "min_lr": 1e-12, "warmup_iters": 25600, "warmup_ratio": 1e-3}


def mmcv_cosine_lr(it: int, base: float = 1e-4, total: int = 76800, warm: int = 25600, ratio: float = 1e-3,
                   min_lr_ratio: float = 1e-8) -> float:
    """mmcv 1.x ``CosineAnnealingLrUpdaterHook`` + linear warmup, transcribed (GEDepth's lr_config)."""
    target = base * min_lr_ratio
    regular = target + 0.5 * (base - target) * (math.cos(math.pi * it / total) + 1)
    if it >= warm:
        return regular
    k = (1 - it / warm) * (1 - ratio)
    return regular * (1 - k)


@pytest.mark.parametrize("it", [0, 1, 12800, 25599, 25600, 51200, 76799, 76800])
def test_cosine_matches_mmcv(it):
    assert lr_factor(it, 76800, GEDEPTH, 1e-4) * 1e-4 == pytest.approx(mmcv_cosine_lr(it), rel=1e-9, abs=1e-20)


def test_cosine_values_at_start_warmup_end_and_last_iteration():
    assert lr_factor(0, 76800, GEDEPTH, 1e-4) == pytest.approx(1e-3)  # warmup_ratio x cos(0) = 1e-3
    # at the end of warmup the cosine has already run a third of its course: (1 + cos(pi/3)) / 2
    assert lr_factor(25600, 76800, GEDEPTH, 1e-4) == pytest.approx(0.75, rel=1e-7)
    last = lr_factor(76799, 76800, GEDEPTH, 1e-4)
    assert last == pytest.approx(1e-8 + 0.5 * (1 + math.cos(math.pi * 76799 / 76800)), rel=1e-9)
    assert last < 1e-8 + 5e-10
    assert lr_factor(76800, 76800, GEDEPTH, 1e-4) == pytest.approx(1e-8)  # min_lr / lr = min_lr_ratio


def test_scheduler_applies_it():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    sched = build_scheduler(opt, GEDEPTH, 100)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-7)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(lr_factor(1, 100, GEDEPTH, 1e-4) * 1e-4)
