"""Depth datasets: the synthetic scenes are deterministic and geometric; split files skip None lines."""
import pytest
import torch
from densefuse_tasks.depth import SyntheticRoad, read_split

from densefuse.errors import DataError


def test_synthetic_scenes_are_deterministic_and_ground_is_exact():
    a, b = SyntheticRoad(4, size=(48, 160), seed=3), SyntheticRoad(4, size=(48, 160), seed=3)
    s, t = a[2], b[2]
    assert all(torch.equal(s[k], t[k]) for k in s)
    assert not torch.equal(s["image"], SyntheticRoad(4, size=(48, 160), seed=4)[2]["image"])
    assert not torch.equal(s["image"], SyntheticRoad(4, size=(48, 160), seed=3, split="val")[2]["image"])
    d, g = s["depth"], s["ground"]
    assert (d[:, 0] == 0).float().mean() > 0.5  # the top row is mostly sky (no depth) or LiDAR gaps
    assert 0.05 < (d > 0).float().mean() < 0.5  # sparse, LiDAR-like
    road = (s["slope"] == 5) & (d > 0) & (g > 0)  # slope class 0 degrees: pixels on the flat ground
    assert road.sum() > 100
    exact = ((d[road] - g[road]).abs() / d[road] < 1e-4).float().mean()
    assert exact > 0.9  # the ground embedding is the true depth there (the rest: feet of objects within 0.5 deg)
    assert d.max() <= 80


def test_split_file_skips_none_and_reports_bad_lines(tmp_path):
    p = tmp_path / "split.txt"
    p.write_text("a/x.png gt/x.png 721.5\n\nb/y.png None 721.5\nc/z.png gt/z.png 721.5\n")
    assert read_split(p) == [("a/x.png", "gt/x.png"), ("c/z.png", "gt/z.png")]
    p.write_text("only_one_column.png\n")
    with pytest.raises(DataError, match="split.txt:1"):
        read_split(p)
    with pytest.raises(DataError, match="missing.txt"):
        read_split(tmp_path / "missing.txt")
