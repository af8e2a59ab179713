"""`compare`: the same model with and without scale EQ over seeds, one table."""
import pandas as pd
import pytest

import densefuse
from densefuse.engine.compare import compare, format_summary, summarize
from tests.test_cli import FAST, run


def test_summarize_means_stds_and_deltas():
    runs = pd.DataFrame({"mode": ["off", "off", "explicit", "explicit"], "seed": [0, 1, 0, 1],
                         "mIoU": [40.0, 42.0, 43.0, 45.0]})
    s = summarize(runs)
    assert list(s.index) == ["off", "explicit"]
    assert s.loc["off", "mIoU"] == 41.0 and s.loc["explicit", "mIoU"] == 44.0
    assert s.loc["explicit", "mIoU_delta"] == pytest.approx(3.0)
    assert s.loc["off", "mIoU_std"] == pytest.approx(2**0.5)
    assert "44.00 ± 1.41 (+3.00)" in format_summary(s)


def test_compare_trains_every_mode_and_seed(tmp_path):
    overrides = [a for a in FAST if a != "--set"]
    cfg = densefuse.load_config("configs/seg/synthetic_upernet_r18.yaml", overrides)
    runs, summary = compare(cfg, ["off", "explicit"], [0, 1], tmp_path, log=lambda m: None)
    assert sorted(zip(runs["mode"], runs["seed"])) == [("explicit", 0), ("explicit", 1), ("off", 0), ("off", 1)]
    assert runs["mIoU"].between(0, 100).all()
    for mode in ("off", "explicit"):
        for seed in (0, 1):
            saved = pd.read_csv(tmp_path / f"{mode}_seed{seed}" / "metrics.csv")
            row = runs[(runs["mode"] == mode) & (runs["seed"] == seed)].iloc[0]
            assert saved["mIoU"].iloc[-1] == pytest.approx(row["mIoU"])
    # the baseline run has no calibration, the equalized one does
    assert not (tmp_path / "off_seed0" / "calibration.csv").exists()
    assert (tmp_path / "explicit_seed0" / "calibration.csv").exists()
    # different seeds give different runs
    losses = [pd.read_csv(tmp_path / f"off_seed{k}" / "metrics.csv")["loss"].iloc[-1] for k in (0, 1)]
    assert losses[0] != losses[1]
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "runs.csv").exists()
    with pytest.raises(densefuse.ConfigError, match="already holds a run"):
        compare(cfg, ["off"], [0], tmp_path, log=lambda m: None)


def test_compare_cli_rejects_bad_modes(tmp_path):
    r = run("compare", "--modes", "off,bogus", "--work-dir", str(tmp_path / "c"))
    assert r.returncode == 2 and "unknown equalizer mode(s) bogus" in r.stderr and "Traceback" not in r.stderr
