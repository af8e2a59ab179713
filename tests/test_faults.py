"""Faults during training: non-finite gradients, damaged checkpoints, a full disk, running out of memory.

Each leaves the last good checkpoint loadable and finite, and each is one ``error:`` line (exit 2)."""
import errno
import os

import pytest
import torch

from densefuse.engine import Trainer
from densefuse.engine import state as state_mod
from densefuse.engine.state import read_checkpoint
from densefuse.engine.step import NonFiniteError, TrainStep

from .test_cli import assert_user_error, cli
from .test_engine import CONFIG, TINY, tiny_cfg, train

TINY6 = ["train.iters=6", "train.ckpt_interval=3", "train.val_interval=3"]


def _finite(path):
    st = read_checkpoint(path)  # also verifies the digest
    assert all(torch.isfinite(t).all() for t in st["model"].values() if t.is_floating_point())
    return st


@pytest.fixture
def nan_gradient_at(monkeypatch):
    """Make the gradient of the step with 0-based index ``k`` nan while its loss stays finite."""

    def install(k):
        original = TrainStep.__call__

        def call(self, batches, iteration):
            if iteration != k:
                return original(self, batches, iteration)
            loss_fn = self.task.loss

            def loss(outputs, batch):
                value, parts = loss_fn(outputs, batch)
                anchor = next(p for p in self.model.parameters() if p.requires_grad).sum()
                anchor.register_hook(lambda g: g * float("nan"))
                return value + 0.0 * anchor, parts  # value unchanged, gradient nan

            self.task.loss = loss
            try:
                return original(self, batches, iteration)
            finally:
                del self.task.loss

        monkeypatch.setattr(TrainStep, "__call__", call)

    return install


def test_nan_gradient_at_a_checkpoint_iteration_stops_before_anything_is_written(tmp_path, nan_gradient_at):
    nan_gradient_at(5)  # the step that ends iteration 6, a checkpoint and evaluation iteration
    cfg = tiny_cfg(*TINY6, "train.keep_last=1")
    with pytest.raises(NonFiniteError, match="gradient norm became nan at iteration 6 .*finite"):
        train(cfg, tmp_path / "run")
    st = _finite(tmp_path / "run" / "latest.pth")
    assert st["iter"] == 3
    assert _finite(tmp_path / "run" / "iter_0000003.pth")["iter"] == 3  # keep_last=1 did not prune it
    assert not (tmp_path / "run" / "iter_0000006.pth").exists()


def test_nan_gradient_with_skip_drops_the_step_and_trains_on(tmp_path, nan_gradient_at):
    nan_gradient_at(5)
    cfg = tiny_cfg(*TINY6, "train.nonfinite=skip")
    lines = []
    Trainer(cfg, tmp_path / "run", progress=False, log=lines.append).run()
    st = _finite(tmp_path / "run" / "latest.pth")
    assert st["iter"] == 6 and st["loop"]["skipped"] == 1
    assert any("iteration 6: gradient norm nan; step skipped (1 so far" in m for m in lines), lines
    _finite(tmp_path / "run" / "best.pth")
    _finite(tmp_path / "run" / "final.pth")


def test_a_nan_loss_stops_with_one_line(tmp_path, monkeypatch):
    original = TrainStep.__call__

    def nan_loss_at_2(self, batches, iteration):
        if iteration != 1:
            return original(self, batches, iteration)
        loss_fn = self.task.loss
        self.task.loss = lambda outputs, batch: (lambda v, p: (v + float("nan"), p))(*loss_fn(outputs, batch))
        try:
            return original(self, batches, iteration)
        finally:
            del self.task.loss

    monkeypatch.setattr(TrainStep, "__call__", nan_loss_at_2)
    args = ["train", "--config", CONFIG, *sum((["--set", o] for o in [*TINY, *TINY6]), []), "--work-dir", tmp_path / "run"]
    line = assert_user_error(cli(*args), "loss became nan at iteration 2; stopped before the weights changed")
    assert "processes" not in line
    assert not (tmp_path / "run" / "latest.pth").exists()


@pytest.mark.parametrize("nonfinite", ["stop", "skip"])
def test_a_grad_scaler_overflow_is_not_a_non_finite_step_but_a_nan_loss_is(nonfinite):
    """fp16's grad scaler (exercised on CPU without fp16 autocast): a finite loss whose scaled gradients
    overflow is the scaler's business (it skips the step and halves its scale); a nan loss is a non-finite step."""
    from torch import nn

    from .test_amp import _Toy

    torch.manual_seed(0)
    model = nn.Conv2d(3, 1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = TrainStep(model, _Toy(), opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0), torch.device("cpu"),
                     nonfinite=nonfinite)
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    zeros = torch.zeros(2, 1, 4, 4)
    weights = [p.detach().clone() for p in model.parameters()]
    step([{"image": torch.full((2, 3, 4, 4), 1e18), "target": zeros}], 0)  # finite loss, scaled gradient inf
    assert step.skipped is None and step.scaler.get_scale() == 2.0**15
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    nan = {"image": torch.ones(2, 3, 4, 4), "target": torch.full_like(zeros, float("nan"))}
    if nonfinite == "stop":
        with pytest.raises(NonFiniteError, match="loss became nan at iteration 2; stopped before the weights changed"):
            step([nan], 1)
    else:
        step([nan], 1)
        assert step.skipped == "loss nan" and step.scaler.get_scale() == 2.0**15  # the scaler untouched
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    if nonfinite == "skip":
        step([{"image": torch.ones(2, 3, 4, 4), "target": zeros}], 2)  # trains on
        assert step.skipped is None and not torch.equal(weights[0], model.weight)


def test_skip_stops_past_the_limit(tmp_path, nan_gradient_at):
    nan_gradient_at(1)
    cfg = tiny_cfg(*TINY6, "train.nonfinite=skip", "train.nonfinite_limit=0")
    with pytest.raises(NonFiniteError, match="more than train.nonfinite_limit=0"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "latest.pth").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    with pytest.raises(Exception, match="not finite"):
        state_mod.save_checkpoint(tmp_path / "x.pth", {"model": {"w": torch.tensor([1.0, float("inf")])}})
    assert not (tmp_path / "x.pth").exists()


RUN8 = [*TINY6, "train.iters=8", "train.keep_last=1"]


@pytest.fixture(scope="module")
def six_iters(tmp_path_factory):
    """An 8-iteration run stopped during iteration 7: latest.pth and its independent copy iter_0000006.pth."""
    wd = tmp_path_factory.mktemp("faults") / "run"
    original = TrainStep.__call__

    def stop_at_7(self, batches, iteration):
        if iteration == 6:
            raise KeyboardInterrupt
        return original(self, batches, iteration)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainStep, "__call__", stop_at_7)
        with pytest.raises(KeyboardInterrupt):
            train(tiny_cfg(*RUN8), wd)
    return wd


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # the middle of the file: tensor bytes
    path.write_bytes(bytes(data))


def test_checkpoints_carry_a_digest_and_iter_files_are_independent(six_iters):
    latest, copy = six_iters / "latest.pth", six_iters / "iter_0000006.pth"
    assert os.stat(latest).st_ino != os.stat(copy).st_ino and os.stat(latest).st_nlink == 1
    assert read_checkpoint(latest)["digest"].startswith("sha256:")
    assert latest.read_bytes() == copy.read_bytes()


def test_a_flipped_byte_in_latest_is_found_and_resume_falls_back_to_iter_n(six_iters, tmp_path):
    wd = _copy_run(six_iters, tmp_path / "run")
    _flip_byte(wd / "latest.pth")
    with pytest.raises(state_mod.CheckpointError, match="damaged|corrupt"):
        read_checkpoint(wd / "latest.pth")
    _finite(wd / "iter_0000006.pth")  # the copy was not hit
    lines = []
    Trainer(tiny_cfg(*RUN8), wd, resume=True, progress=False, log=lines.append).run()
    assert any("latest.pth is damaged; resuming from iter_0000006.pth" in m for m in lines), lines
    assert _finite(wd / "latest.pth")["iter"] == 8


def test_a_damaged_checkpoint_names_the_newest_intact_one(six_iters, tmp_path):
    wd = _copy_run(six_iters, tmp_path / "run")
    _flip_byte(wd / "latest.pth")
    line = assert_user_error(cli("eval", "--checkpoint", wd / "latest.pth"), "latest.pth", "iter_0000006.pth")
    assert "weights_only=False" not in line


def test_zeroed_latest_gives_no_unsafe_advice(six_iters, tmp_path):
    wd = _copy_run(six_iters, tmp_path / "run")
    (wd / "latest.pth").write_bytes(b"\0" * 4096)
    line = assert_user_error(cli("eval", "--checkpoint", wd / "latest.pth"), "cannot read checkpoint")
    assert "weights_only" not in line


def test_deleted_latest_and_missing_config_resume_from_iter_n(six_iters, tmp_path):
    wd = _copy_run(six_iters, tmp_path / "run")
    (wd / "latest.pth").unlink()
    (wd / "config.yaml").unlink()
    lines = []
    Trainer(tiny_cfg(*RUN8), wd, resume=True, progress=False, log=lines.append).run()
    assert any("latest.pth is missing; resuming from iter_0000006.pth" in m for m in lines), lines
    assert any("config.yaml was missing" in m for m in lines), lines
    assert (wd / "config.yaml").is_file() and read_checkpoint(wd / "latest.pth")["iter"] == 8


def test_a_work_dir_in_use_is_said_to_be_in_use(six_iters, tmp_path):
    import fcntl

    wd = _copy_run(six_iters, tmp_path / "run")
    fd = os.open(wd / ".densefuse.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        line = assert_user_error(cli("train", "--config", CONFIG, *sum((["--set", o] for o in TINY), []),
                                     "--work-dir", wd), "another densefuse run is using")
        assert "--resume" not in line
    finally:
        os.close(fd)


@pytest.mark.parametrize("how", ["oserror", "torch"])
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays(tmp_path, monkeypatch, how):
    saves, original = [0], torch.save

    def full_disk_save(obj, f, *a, **k):
        if isinstance(obj, dict) and "rng" in obj:
            saves[0] += 1
            if saves[0] == 2:
                f.write(b"x" * 1000)
                if how == "oserror":
                    raise OSError(errno.ENOSPC, "No space left on device")
                raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
                                   "file data/12: file write failed")
        return original(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk_save)
    wd = tmp_path / "run"
    args = ["train", "--config", CONFIG, *sum((["--set", o] for o in [*TINY, *TINY6]), []), "--work-dir", wd]
    assert_user_error(cli(*args), "disk full while writing", "latest.pth", "MB free", "previous latest.pth is intact")
    assert _finite(wd / "latest.pth")["iter"] == 3
    assert not [p for p in wd.iterdir() if p.name.startswith(".latest.pth.")]  # no temp file left


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 68719476736 bytes. Error code 12 (Cannot allocate memory)"),
])
def test_out_of_memory_names_the_batch_and_crop_size(tmp_path, monkeypatch, error):
    def fail(self, batches, iteration):
        raise error

    monkeypatch.setattr(TrainStep, "__call__", fail)
    args = ["train", "--config", CONFIG, *sum((["--set", o] for o in TINY), []), "--work-dir", tmp_path / "run"]
    assert_user_error(cli(*args), "out of memory at training iteration 1", "train.batch_size (now 2)",
                      "data.crop_size (now [32, 32])")


def test_out_of_memory_in_eval_names_its_batch_size_and_mode(six_iters, monkeypatch):
    import densefuse.engine as engine

    def fail(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(engine, "evaluate_full", fail)
    assert_user_error(cli("eval", "--checkpoint", six_iters / "latest.pth"), "out of memory evaluating",
                      "eval.batch_size (now 2)", "eval.mode")


def test_calibration_shows_progress_like_training(tmp_path, capsys):
    Trainer(tiny_cfg("train.iters=1"), tmp_path / "run", progress=True, log=lambda m: None).run()
    err = capsys.readouterr().err
    assert "calibrate (pass 1)" in err and "8/8" in err and "train" in err
    assert "calibrating" in (tmp_path / "run" / "log.txt").read_text()
