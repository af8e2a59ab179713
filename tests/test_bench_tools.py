"""The benchmark tools that need more than this machine: the GPU suite's CPU dry run and the densefuse half
of the mmseg comparison, run on tiny sizes (they check that every code path runs, not the timings)."""
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _run(tool, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / f"{tool}.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


def test_gpu_suite_dry_run_runs_every_part(tmp_path):
    out = tmp_path / "gpu_suite.csv"
    res = _run("gpu_suite", "--dry-run", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    df = pd.read_csv(out)
    notes = df["note"].fillna("")
    assert not notes.str.startswith("failed").any() and not notes.str.contains("budget").any(), df.to_string()
    assert set(df["part"]) == {"step", "equalizer", "data", "eval", "collective"}
    measured = df[df["value"].notna()]
    assert (measured["value"] > 0).all()
    steps = measured[measured["part"] == "step"]["case"]
    for case in ("densefuse TrainStep b2 NCHW", "plain loop b2 NCHW", "densefuse TrainStep b2 channels-last",
                 "plain loop b2 channels-last", "densefuse TrainStep b2 NCHW compile=aot_eager",
                 "plain loop b2 NCHW compile=aot_eager"):
        assert case in set(steps), case
    for model in ("UPerNet-R50", "UPerNet-ConvNeXt-T"):
        eq = measured[(measured["part"] == "equalizer") & (measured["model"] == model)]["case"]
        assert {c.rsplit("=", 1)[1] for c in eq} == {"off", "explicit", "fold"}
        assert len(measured[(measured["part"] == "eval") & (measured["model"] == model)]) == 3
    assert len(measured[measured["part"] == "data"]) == 2
    coll = df[df["part"] == "collective"]
    assert coll["case"].str.startswith("gloo").all() and "result correct: True" in set(coll["note"].fillna(""))
    assert "| part" in res.stdout  # the Markdown table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_gpu_suite_without_cuda_fails_fast_with_one_line(tmp_path):
    res = _run("gpu_suite", "--out", str(tmp_path / "x.csv"))
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no CUDA device" in res.stderr and "--dry-run" in res.stderr
    assert not (tmp_path / "x.csv").exists()


def test_bench_vs_mmseg_densefuse_only(tmp_path):
    out = tmp_path / "vs.csv"
    res = _run("bench_vs_mmseg", "--densefuse-only", "--rows", "UPerNet Swin-T", "--size", "32", "--batch", "2",
               "--iters", "1", "--warmup", "0", "--images", "2", "--rounds", "1", "--out", str(out))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    df = pd.read_csv(out)
    assert list(df["measure"]) == ["step", "step+data", "infer whole", "infer slide", "infer flip",
                                   "peak RSS after inference", "peak RSS"]
    assert (df["densefuse"] > 0).all() and "mmseg" not in df.columns
    runs = pd.read_csv(out.with_suffix(".runs.csv"))
    assert set(runs["side"]) == {"densefuse"}


def test_bench_vs_mmseg_needs_a_side():
    res = _run("bench_vs_mmseg")
    assert res.returncode == 2 and "--mmseg-python" in res.stderr

