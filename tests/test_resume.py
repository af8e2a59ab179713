"""Exact resume: a run killed with SIGKILL and resumed ends bit-identical to the uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from densefuse import ConfigError, DensefuseError
from densefuse.engine import load_checkpoint

from .test_engine import TINY, tiny_cfg, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs TINY in a child process and kills it with SIGKILL: at iteration KILL_AT (0-based, before its
# step), or, with KILL_IN_SAVE=n, halfway through writing the n-th latest.pth.
DRIVER = textwrap.dedent("""
    import io, os, signal, sys, torch
    import densefuse
    from densefuse.engine import Trainer, state, step

    work_dir, kill_at, kill_in_save, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    overrides = sys.argv[5:]
    torch.set_num_threads(threads)  # as in the test process: float sums depend on the thread count
    cfg = densefuse.load_config(os.path.join({root!r}, "configs/seg/synthetic_upernet_r18.yaml"), overrides=overrides)

    original_step = step.TrainStep.__call__
    def killing_step(self, batches, iteration):
        if iteration == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return original_step(self, batches, iteration)
    step.TrainStep.__call__ = killing_step

    saves = [0]
    original_save, original_torch_save = state.Checkpointer.save, torch.save
    def counting_save(self, st, iteration):
        saves[0] += 1
        return original_save(self, st, iteration)
    def half_save(obj, f, *a, **k):
        if saves[0] == kill_in_save and isinstance(obj, dict) and "rng" in obj:
            buf = io.BytesIO()
            original_torch_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original_torch_save(obj, f, *a, **k)
    state.Checkpointer.save = counting_save
    torch.save = half_save
    Trainer(cfg, work_dir, progress=False, log=lambda m: None).run()
""").format(root=ROOT)


#: the thread count tests/conftest.py sets, which the shared reference run trains with: float sums depend
#: on it, and a tool imported in-process by another test (tools/bench_pipeline.py) may have changed it
THREADS = min(2, os.cpu_count() or 1)


@pytest.fixture(autouse=True)
def same_threads_as_the_reference():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


def run_killed(work_dir, kill_at=-1, kill_in_save=-1, overrides=()):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(work_dir), str(kill_at), str(kill_in_save),
                           str(THREADS), *TINY,
                           *overrides], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def reference(tiny_run):
    """The uninterrupted run (shared with test_engine; its keep_last=2 changes no weight or metric)."""
    return tiny_run[0]


@pytest.fixture(scope="module")
def killed_at_4(tmp_path_factory):
    """One run killed before iteration index 4 (latest.pth at 3): each test resumes or damages its own copy."""
    wd = tmp_path_factory.mktemp("killed") / "run"
    run_killed(wd, kill_at=4)
    return wd


def copy_run(src, tmp_path):
    """A private copy of a killed run's work dir (its flock died with the process; nothing holds a path)."""
    return shutil.copytree(src, tmp_path / "run", symlinks=True)


def assert_same_run(a, b):
    wa, wb = load_checkpoint(a / "final.pth")["model"], load_checkpoint(b / "final.pth")["model"]
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma, mb = pd.read_csv(a / "metrics.csv"), pd.read_csv(b / "metrics.csv")
    assert list(ma["iter"]) == [2, 4, 6, 8] and list(mb["iter"]) == [2, 4, 6, 8]  # one row per evaluation
    pd.testing.assert_frame_equal(ma.drop(columns="time_s"), mb.drop(columns="time_s"), check_exact=True)
    assert mb["time_s"].is_monotonic_increasing  # time continues across the resume


@pytest.mark.parametrize("workers", [0, 2], ids=["main-process", "2-workers"])
@pytest.mark.parametrize("kill_at", [4, 3], ids=["inside-interval", "right-after-save"])
def test_sigkill_and_resume_is_bit_identical(tmp_path, reference, killed_at_4, kill_at, workers):
    """Checkpoints every 3 iterations: killed before iteration 5 (index 4) the run redoes iteration 4;
    killed before index 3 it resumes right after the save at 3. With DataLoader workers the resumed run's
    fresh workers draw each sample's crop from its stream position, as the killed run's workers did; the
    reference was trained without workers, so this also shows workers change nothing."""
    if kill_at == 4 and workers == 0:
        wd = copy_run(killed_at_4, tmp_path)
    else:
        wd = tmp_path / "run"
        run_killed(wd, kill_at=kill_at, overrides=[f"data.num_workers={workers}"])
    assert load_checkpoint(wd / "latest.pth")["iter"] == 3
    assert not (wd / "final.pth").exists()
    train(tiny_cfg(f"data.num_workers={workers}"), wd, resume=True)
    assert_same_run(reference, wd)
    log = (wd / "log.txt").read_text()
    assert "resumed from iteration 3" in log
    assert log.count("calibrated ") == 1  # the equalizer statistics come from the checkpoint


def test_data_loader_workers_change_no_result(tmp_path, reference):
    """The random crops are drawn per sample from (seed, stream position), not from a worker's stream."""
    train(tiny_cfg("train.keep_last=2", "data.num_workers=2"), tmp_path / "run")
    assert_same_run(reference, tmp_path / "run")


def test_sigkill_while_saving_leaves_a_loadable_latest(tmp_path, reference):
    wd = tmp_path / "run"
    run_killed(wd, kill_in_save=2)  # the second save (iteration 6) is cut in half
    temps = [n for n in os.listdir(wd) if n.startswith(".latest.pth.")]
    assert temps, "the killed save should have left its temp file"
    assert load_checkpoint(wd / "latest.pth")["iter"] == 3
    train(tiny_cfg(), wd, resume=True)
    assert not [n for n in os.listdir(wd) if n.startswith(".latest.pth.")]  # stale temp file cleaned
    assert_same_run(reference, wd)


def test_an_empty_or_damaged_metrics_csv_does_not_block_resume(tmp_path, reference, killed_at_4):
    """The metric history lives in latest.pth; metrics.csv is rewritten from it, never parsed."""
    wd = copy_run(killed_at_4, tmp_path)
    (wd / "metrics.csv").write_text("")
    train(tiny_cfg(), wd, resume=True)
    assert_same_run(reference, wd)


def test_resume_with_another_config_names_the_keys(tmp_path, reference, killed_at_4):
    wd = copy_run(killed_at_4, tmp_path)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in wd.iterdir())
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.002.*train\.iters: 8 -> 10"):
        train(tiny_cfg("optim.lr=0.002", "train.iters=10"), wd, resume=True)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in wd.iterdir()) == before
    # keys documented as safe may change
    train(tiny_cfg("train.log_interval=4", "eval.batch_size=1"), wd, resume=True)
    assert_same_run(reference, wd)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_latest_is_a_clear_error_and_nothing_is_overwritten(tmp_path, reference, killed_at_4, damage):
    wd = copy_run(killed_at_4, tmp_path)
    data = (wd / "latest.pth").read_bytes()
    (wd / "latest.pth").write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x00garbage" * 10)
    copies = {p.name: p.read_bytes() for p in wd.glob("iter_*.pth")}
    assert copies  # the independent copy of the damaged latest.pth
    for name in copies:
        (wd / name).unlink()
    before = {p.name: p.read_bytes() for p in wd.iterdir() if p.is_file()}
    with pytest.raises(DensefuseError, match=r"cannot read checkpoint .*latest\.pth \(corrupt or truncated\?\).*"
                                             r"no intact iter_<N>\.pth"):
        train(tiny_cfg(), wd, resume=True)
    assert {p.name: p.read_bytes() for p in wd.iterdir() if p.is_file()} == before
    # with its iter_<N>.pth copy back, --resume falls back to it and ends as the uninterrupted run
    for name, data in copies.items():
        (wd / name).write_bytes(data)
    train(tiny_cfg(), wd, resume=True)
    assert_same_run(reference, wd)


def test_nothing_to_resume(tmp_path):
    with pytest.raises(DensefuseError, match="nothing to resume"):
        train(tiny_cfg(), tmp_path / "empty", resume=True)
    assert not (tmp_path / "empty").exists()


def test_checkpoint_holds_every_part_of_the_state(reference):
    state = torch.load(reference / "latest.pth", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "iter", "loop", "rng", "config", "world_size"):
        assert key in state
    rng = state["rng"][0]
    assert set(rng) == {"python", "numpy", "torch", "cuda"}
    assert state["loop"]["history"][-1]["iter"] == 8
