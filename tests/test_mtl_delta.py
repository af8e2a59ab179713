"""Δm on constructed cases: sign by metric direction, the two averages, paired seeds with mean ± std."""
import math

import pandas as pd
import pytest
from densefuse_tasks.mtl import delta_m, paired_delta_m, relative_gains

DIRS = {"seg": {"mIoU": "max", "pixAcc": "max"}, "depth": {"abs_rel": "min"}}
SINGLE = {"seg": {"mIoU": 40.0, "pixAcc": 80.0}, "depth": {"abs_rel": 0.20}}
MTL = {"seg": {"mIoU": 44.0, "pixAcc": 76.0}, "depth": {"abs_rel": 0.19}}


def test_delta_m_signs_and_averages():
    g = relative_gains(MTL, SINGLE, DIRS).set_index(["task", "metric"])["gain"]
    assert g[("seg", "mIoU")] == pytest.approx(10.0)  # +4 / 40
    assert g[("seg", "pixAcc")] == pytest.approx(-5.0)  # -4 / 80
    assert g[("depth", "abs_rel")] == pytest.approx(5.0)  # lower is better: -(0.19 - 0.2) / 0.2
    assert delta_m(MTL, SINGLE, DIRS) == pytest.approx((10 - 5 + 5) / 3)
    assert delta_m(MTL, SINGLE, DIRS, average="tasks") == pytest.approx(((10 - 5) / 2 + 5) / 2)
    assert delta_m(SINGLE, SINGLE, DIRS) == 0.0


def test_missing_metric_or_zero_baseline():
    with pytest.raises(KeyError, match="multi-task results lack depth/abs_rel"):
        delta_m({"seg": MTL["seg"]}, SINGLE, DIRS)
    with pytest.raises(ValueError, match="divides"):
        delta_m(MTL, {**SINGLE, "depth": {"abs_rel": 0.0}}, DIRS)


def _long(tables, **extra):
    return [{"seed": s, "model": m, "task": t, "metric": k, "value": v, **extra}
            for (s, m), tab in tables.items() for t, ms in tab.items() for k, v in ms.items()]


def test_paired_seeds_mean_and_std():
    mtl1 = {"seg": {"mIoU": 42.0, "pixAcc": 80.0}, "depth": {"abs_rel": 0.20}}  # seed 1: +5, 0, 0 -> 5/3
    rows = _long({(0, "mtl"): MTL, (0, "single"): SINGLE, (1, "mtl"): mtl1, (1, "single"): SINGLE}, eq="explicit")
    rows += _long({(0, "mtl"): SINGLE, (0, "single"): SINGLE, (1, "mtl"): mtl1, (1, "single"): SINGLE}, eq="off")
    per_seed, summary = paired_delta_m(pd.DataFrame(rows), DIRS, by=["eq"])
    d = per_seed.set_index(["eq", "seed"])["delta_m"]
    assert d[("explicit", 0)] == pytest.approx(10 / 3) and d[("explicit", 1)] == pytest.approx(5 / 3)
    assert d[("off", 0)] == 0.0
    s = summary.set_index("eq")
    assert s.loc["explicit", "delta_m_mean"] == pytest.approx(2.5)
    assert s.loc["explicit", "delta_m_std"] == pytest.approx(math.sqrt(2 * (5 / 6) ** 2))  # ddof 1
    assert s.loc["off", "delta_m_mean"] == pytest.approx(5 / 6) and list(s["seeds"]) == [2, 2]


def test_unpaired_seed_is_an_error():
    rows = _long({(0, "mtl"): MTL, (0, "single"): SINGLE, (1, "mtl"): MTL})
    with pytest.raises(ValueError, match="seed 1 has no single results"):
        paired_delta_m(pd.DataFrame(rows), DIRS)
    per_seed, summary = paired_delta_m(pd.DataFrame(rows[: len(rows) * 2 // 3]), DIRS)
    assert len(per_seed) == 1 and math.isnan(summary["delta_m_std"].iloc[0])
