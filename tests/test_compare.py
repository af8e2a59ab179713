"""`compare`: configs with and without scale EQ over seeds, the paper's table; finished runs are reused."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

import densefuse
import densefuse.engine
from densefuse.cli import main
from densefuse.engine.compare import DEFAULT_SEEDS, compare, format_summary, paper_table, summarize
from densefuse.tasks import Task, register_task

BASE = Path(__file__).resolve().parent.parent / "configs" / "seg" / "synthetic_upernet_r18.yaml"
TINY = [
    "train.iters=2", "train.batch_size=2", "train.val_interval=2", "train.ckpt_interval=2", "train.log_interval=1",
    "calibration.num_images=4", "calibration.batch_size=2", "data.kwargs.num_train=8", "data.kwargs.num_val=2",
    "data.kwargs.size=[32,32]", "data.crop_size=[32,32]", "model.decode_head.channels=16",
    "model.auxiliary_head.channels=8",
]


def tiny(name, *extra):
    cfg = densefuse.load_config(BASE, [*TINY, *extra])
    cfg["name"] = name
    return cfg


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*")) if p.is_file()}


@register_task("toydepth")
class ToyDepth(Task):
    """Only what the summary reads: a primary metric where smaller is better."""

    primary_metric = "abs_rel"
    metric_direction = "min"

    def build_dataset(self, cfg, split):
        raise AssertionError("not used")

    def build_transform(self, cfg, train):
        raise AssertionError("not used")

    def loss(self, outputs, batch):
        raise AssertionError("not used")

    def metric(self, cfg):
        raise AssertionError("not used")

    def predict(self, outputs):
        raise AssertionError("not used")


def test_summary_is_the_papers_table_with_the_tasks_metric_and_direction():
    runs = pd.DataFrame({
        "config": ["uper"] * 4 + ["gedepth"] * 4,
        "mode": ["off", "off", "explicit", "explicit"] * 2,
        "seed": [0, 1, 0, 1] * 2,
        "mIoU": [40.0, 42.0, 43.0, 45.0, None, None, None, None],
        "abs_rel": [None] * 4 + [0.10, 0.12, 0.08, 0.10],
    })
    s = summarize(runs, {"uper": "seg", "gedepth": "toydepth"})
    uper = s[(s.config == "uper")].set_index("mode")
    assert uper.loc["off", "mean"] == 41.0 and uper.loc["explicit", "mean"] == 44.0
    assert uper.loc["explicit", "delta"] == pytest.approx(3.0) and uper.loc["off", "std"] == pytest.approx(2**0.5)
    assert set(s[s.config == "gedepth"]["metric"]) == {"abs_rel"}
    table = paper_table(s)
    assert list(table.columns) == ["config", "metric", "w/o EQ", "w/ EQ", "Δ", "seeds"]
    assert table.iloc[0].tolist() == ["uper", "mIoU ↑", "41.00 ± 1.41", "44.00 ± 1.41", "+3.00", 2]
    assert table.iloc[1].tolist() == ["gedepth", "abs_rel ↓", "0.11 ± 0.01414", "0.09 ± 0.01414", "-0.02", 2]
    assert "44.00 ± 1.41" in format_summary(s)
    three = pd.concat([runs.iloc[:4], runs.iloc[2:4].assign(mode="fold", mIoU=[44.0, 44.0])])
    t3 = paper_table(summarize(three, {"uper": "seg"}))
    assert list(t3.columns) == ["config", "metric", "w/o EQ", "w/ EQ", "Δ (w/ EQ)", "w/ EQ (fold)", "Δ (w/ EQ (fold))", "seeds"]
    assert DEFAULT_SEEDS == (0, 1, 2, 3, 4)


def test_depth_table_5_layout_over_the_tasks_nine_metrics():
    """w/o and w/ EQ, mean ± std over seeds, for every metric of the depth task's summary, in its order,
    with small values readable (abs_rel ~0.05 keeps 4 significant digits)."""
    from densefuse_tasks.depth.metrics import METRIC_NAMES

    rng = np.random.default_rng(0)
    rows = [{"config": "gedepth", "mode": m, "seed": k, "reused": False,
             **{n: float(v) for n, v in zip(METRIC_NAMES, rng.uniform(0.04, 0.06, len(METRIC_NAMES)))}}
            for m in ("off", "explicit") for k in range(5)]
    runs = pd.DataFrame(rows)
    s = summarize(runs, {"gedepth": "depth"}, metrics="all")
    assert list(dict.fromkeys(s["metric"])) == list(METRIC_NAMES) and set(s["seeds"]) == {5}
    table = paper_table(s)
    assert list(table["metric"]) == [n if n != "abs_rel" else "abs_rel ↓" for n in METRIC_NAMES]
    a = runs[runs["mode"] == "explicit"]["abs_rel"]
    row = table[table["metric"] == "abs_rel ↓"].iloc[0]
    assert row["w/ EQ"] == f"{a.mean():.4g} ± {a.std():.4g}"
    # by default: the primary metric, or the metrics a task declares for its table
    default = summarize(runs, {"gedepth": "depth"})["metric"].unique()
    assert [m.split(" ")[0] for m in default] == list(METRIC_NAMES)  # the task declares Table 5's nine
    ToyDepth.table_metrics = ("a1", "rmse")
    try:
        assert list(summarize(runs, {"gedepth": "toydepth"})["metric"].unique()) == ["a1", "rmse"]
    finally:
        del ToyDepth.table_metrics


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Root of a finished comparison of ``tiny_a`` (off / explicit, seeds 0 and 1), built in two calls."""
    root = tmp_path_factory.mktemp("cmp")
    cfg = tiny("tiny_a")
    first = compare([cfg], ["off", "explicit"], [0], root, log=lambda m: None)
    before = snapshot(root / "tiny_a")
    second = compare([cfg], ["off", "explicit"], [0, 1], root, log=lambda m: None)
    return root, first, before, second


def test_compare_reuses_finished_runs_and_extends_with_a_seed(compared):
    root, (runs, _), before, (runs2, summary2) = compared
    assert sorted(zip(runs["mode"], runs["seed"], runs["reused"])) == [("explicit", 0, False), ("off", 0, False)]
    assert runs["mIoU"].between(0, 100).all()
    for mode in ("off", "explicit"):
        run_dir = root / "tiny_a" / f"{mode}_seed0"
        saved = pd.read_csv(run_dir / "metrics.csv")
        assert saved["mIoU"].iloc[-1] == pytest.approx(runs[runs["mode"] == mode]["mIoU"].iloc[0])
        assert (run_dir / "result.json").is_file() and not list(run_dir.glob("*.pth"))  # only what the table needs
    assert not (root / "tiny_a" / "off_seed0" / "calibration.csv").exists()
    assert (root / "tiny_a" / "explicit_seed0" / "calibration.csv").exists()
    assert sorted(zip(runs2["mode"], runs2["seed"], runs2["reused"])) == [
        ("explicit", 0, True), ("explicit", 1, False), ("off", 0, True), ("off", 1, False)]
    now = snapshot(root / "tiny_a")
    assert all(now[k] == v for k, v in before.items())  # the finished runs were not touched
    assert (summary2["seeds"] == 2).all()
    assert runs2.set_index(["mode", "seed"]).loc[("off", 0), "mIoU"] == runs.set_index(["mode", "seed"]).loc[("off", 0), "mIoU"]
    losses = [pd.read_csv(root / "tiny_a" / f"off_seed{k}" / "metrics.csv")["loss"].iloc[-1] for k in (0, 1)]
    assert losses[0] != losses[1]  # different seeds give different runs
    assert (root / "summary.csv").exists() and (root / "runs.csv").exists()
    # other settings under the same root are refused rather than mixed into the table
    with pytest.raises(densefuse.ConfigError, match="different settings"):
        compare([tiny("tiny_a", "optim.lr=0.5")], ["off", "explicit"], [0], root, log=lambda m: None)


def test_a_failed_run_leaves_nothing_that_blocks_its_rerun(tmp_path, monkeypatch):
    class Finishing:
        def __init__(self, cfg, work_dir, **kwargs):
            self.work_dir, self.seed = Path(work_dir), cfg["seed"]

        def run(self):
            self.work_dir.mkdir(parents=True)
            (self.work_dir / "final.pth").write_bytes(b"weights")
            return {"mIoU": 50.0 + self.seed}

    class Failing:
        def __init__(self, cfg, work_dir, **kwargs):
            self.work_dir = Path(work_dir)

        def run(self):
            self.work_dir.mkdir(parents=True)
            (self.work_dir / "config.yaml").write_text("partial")
            raise RuntimeError("out of memory")

    monkeypatch.setattr(densefuse.engine, "Trainer", Failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        compare([tiny("tiny_f")], ["off", "explicit"], [0], tmp_path, log=lambda m: None)
    assert [p.name for p in (tmp_path / "tiny_f").iterdir()] == []
    monkeypatch.setattr(densefuse.engine, "Trainer", Finishing)
    runs, _ = compare([tiny("tiny_f")], ["off", "explicit"], [0], tmp_path, log=lambda m: None)
    assert len(runs) == 2 and not runs["reused"].any() and list(runs["mIoU"]) == [50.0, 50.0]
    assert sorted(p.name for p in (tmp_path / "tiny_f").iterdir()) == ["explicit_seed0", "off_seed0"]
    assert not list((tmp_path / "tiny_f").rglob("*.pth"))


def test_compare_cli_takes_several_configs_and_keeps_checkpoints_when_asked(compared, tmp_path):
    root = compared[0]
    for name in ("tiny_a", "cfg_b"):
        (tmp_path / f"{name}.yaml").write_text(f"_base_: ['{BASE}']\nname: {name}\n")
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'cfg_b.yaml'}\n")
    sets = [x for kv in TINY for x in ("--set", kv)]
    # tiny_a's runs are reused from the comparison above; cfg_b trains, keeping its checkpoints
    r = CliRunner().invoke(main, ["compare", "--config", str(tmp_path / "tiny_a.yaml"), "--config", str(tmp_path / "list.txt"),
                                  "--seeds", "0", "--work-dir", str(root), "--keep-checkpoints",
                                  "--no-progress", *sets], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("finished before -> reusing") == 2
    assert (root / "cfg_b" / "explicit_seed0" / "final.pth").is_file()
    assert (root / "cfg_b" / "off_seed0" / "final.pth").is_file()
    header = next(line for line in r.output.splitlines() if "w/o EQ" in line)
    assert [c.strip() for c in header.strip("|").split("|")] == ["config", "metric", "w/o EQ", "w/ EQ", "Δ", "seeds"]
    summary = pd.read_csv(root / "summary.csv")
    assert list(dict.fromkeys(summary["config"])) == ["tiny_a", "cfg_b"] and set(summary["metric"]) == {"mIoU"}
    r = CliRunner().invoke(main, ["compare", "--config", f"{tmp_path / 'tiny_a.yaml'},{tmp_path / 'cfg_b.yaml'}",
                                  "--seeds", "0", "--work-dir", str(root), "--no-progress", *sets],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert r.output.count("finished before -> reusing") == 4
