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
    with pytest.raises(DensefuseError, match="'optim.type' must be one of adamw, sgd, got str 'adam'"):
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


# --------------------------------------------------------------------------------------------------
# the trainer on a tiny synthetic setup (shared by test_resume / test_amp / test_distributed)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "seg", "synthetic_upernet_r18.yaml")
#: 32x32 images, a small encoder, 16-channel heads, no dropout: a run takes seconds on a CPU
TINY = [
    "model.encoder.name=resnet10t", "model.decode_head.channels=16", "model.auxiliary_head.channels=16",
    "model.decode_head.dropout=0.0", "model.auxiliary_head.dropout=0.0",
    "data.crop_size=[32,32]", "data.kwargs.size=[32,32]", "data.kwargs.num_train=32", "data.kwargs.num_val=4",
    "calibration.num_images=8", "calibration.batch_size=4", "eval.batch_size=2",
    "train.iters=8", "train.batch_size=2", "train.val_interval=2", "train.ckpt_interval=3", "train.log_interval=1",
    "schedule.warmup_iters=0",
]


def tiny_cfg(*overrides):
    import densefuse

    return densefuse.load_config(CONFIG, overrides=[*TINY, *overrides])


def train(cfg, work_dir, resume=False):
    from densefuse.engine import Trainer

    return Trainer(cfg, work_dir, resume=resume, progress=False, log=lambda _m: None).run()


def test_run_writes_its_files_and_best_follows_the_metric_direction(tiny_run):
    import pandas as pd

    from densefuse.tasks import get_task

    wd, metrics = tiny_run  # tiny_cfg("train.keep_last=2"), trained once per session (tests/conftest.py)
    names = sorted(os.listdir(wd))
    for f in ("config.yaml", "log.txt", "metrics.csv", "per_class.csv", "calibration.csv", "latest.pth",
              "best.pth", "final.pth", "predictions.png"):
        assert f in names
    assert [n for n in names if n.startswith("iter_")] == ["iter_0000006.pth", "iter_0000008.pth"]  # keep_last 2
    assert not [n for n in names if n.startswith(".") and n != ".densefuse.lock"]
    hist = pd.read_csv(wd / "metrics.csv")
    assert list(hist["iter"]) == [2, 4, 6, 8]
    assert "mIoU" in metrics and "seed 0" in (wd / "log.txt").read_text()
    best = load_checkpoint(wd / "best.pth")
    assert best["metrics"]["mIoU"] == pytest.approx(hist["mIoU"].max())
    assert best["iter"] == int(hist["iter"][hist["mIoU"].idxmax()])
    assert "done: best mIoU" in (wd / "log.txt").read_text()
    per_class = pd.read_csv(wd / "per_class.csv")
    assert list(per_class.columns[:3]) == ["iter", "class", "IoU"] and len(per_class) == 6
    assert set(per_class["iter"]) == {8}
    task = get_task("seg")
    assert task.is_better(2.0, 1.0) and not task.is_better(1.0, 2.0)
    # checkpoints follow the umask like every other file, not the temp file's 0600
    assert (os.stat(wd / "latest.pth").st_mode & 0o777) == (os.stat(wd / "config.yaml").st_mode & 0o777)


def test_work_dir_with_foreign_files_is_refused_and_untouched(tmp_path):
    wd = tmp_path / "mine"
    wd.mkdir()
    (wd / "final.pth").write_bytes(b"user weights")
    (wd / "metrics.csv").write_text("user,data\n")
    with pytest.raises(DensefuseError, match="did not create"):
        train(tiny_cfg(), wd)
    assert sorted(os.listdir(wd)) == ["final.pth", "metrics.csv"]
    assert (wd / "final.pth").read_bytes() == b"user weights"


def test_failed_start_does_not_block_a_rerun(tmp_path, monkeypatch):
    from densefuse.engine.trainer import Trainer
    from densefuse.errors import DataError

    wd = tmp_path / "run"
    with pytest.raises(DensefuseError):  # the datasets are built before the run dir: nothing is created
        train(tiny_cfg("data.type=ade20k", "data.root=/nonexistent", "data.kwargs={}"), wd)
    assert not wd.exists()

    def corrupt_image(*args, **kwargs):  # a file found corrupt only when read, after config.yaml
        raise DataError("corrupt image: x.jpg")

    monkeypatch.setattr(Trainer, "_calibrate", corrupt_image)
    with pytest.raises(DataError):
        train(tiny_cfg(), wd)
    assert (wd / "config.yaml").exists() and not (wd / "latest.pth").exists()
    monkeypatch.undo()
    train(tiny_cfg("train.iters=2", "train.val_interval=2"), wd)
    assert (wd / "final.pth").exists()
    with pytest.raises(DensefuseError, match="already holds a run"):
        train(tiny_cfg("train.iters=2"), wd)


def test_second_run_into_a_locked_work_dir_is_refused(tmp_path):
    from densefuse.engine.runtime import WorkDir

    wd = tmp_path / "run"
    first = WorkDir(wd)
    first.open(tiny_cfg(), resume=False)
    try:
        with pytest.raises(DensefuseError, match="another densefuse run is using"):
            train(tiny_cfg(), wd)
    finally:
        first.close()


def test_train_values_are_checked_before_any_work(tmp_path):
    with pytest.raises(DensefuseError, match="'train.accum_steps' must be int >= 1"):
        train(tiny_cfg("train.accum_steps=0"), tmp_path / "a")
    with pytest.raises(DensefuseError, match="'train.amp' must be one of"):
        train(tiny_cfg("train.amp=fp32"), tmp_path / "b")
    assert not os.listdir(tmp_path)


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    """accum_steps=2 of batch 2 takes the same samples as one batch of 4; without BN in train mode
    the gradient is the same, so with SGD the weights agree closely."""
    import torch

    common = ["optim.type=sgd", "optim.lr=0.01", "train.iters=2", "train.val_interval=2",
              "data.augment.scale_range=[1,1]", "data.augment.flip=false", "model.equalizer.mode=off"]
    a = tiny_cfg(*common, "train.batch_size=4")
    b = tiny_cfg(*common, "train.batch_size=2", "train.accum_steps=2")
    train(a, tmp_path / "a")
    train(b, tmp_path / "b")
    wa = load_checkpoint(tmp_path / "a" / "final.pth")["model"]
    wb = load_checkpoint(tmp_path / "b" / "final.pth")["model"]
    conv = [k for k in wa if k.endswith("conv_seg.weight")][0]
    assert not torch.equal(wa[conv], load_checkpoint(tmp_path / "a" / "latest.pth")["model"][conv] * 0)
    # BN batch statistics differ between 2 and 4 images, so compare loosely but not trivially
    assert torch.allclose(wa[conv], wb[conv], atol=5e-3)


def test_tensorboard_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(DensefuseError, match="tensorboard package is not installed"):
        train(tiny_cfg("train.tensorboard=true"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_resume_config_differences_leave_out_safe_keys():
    from densefuse.engine.state import config_differences

    a = {"train": {"iters": 8, "log_interval": 1}, "data": {"num_workers": 0}, "seed": 0}
    b = {"train": {"iters": 9, "log_interval": 5}, "data": {"num_workers": 4}, "seed": 1}
    assert config_differences(a, b) == ["seed", "train.iters"]


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path, capsys, monkeypatch):
    import re
    import sys

    from densefuse.engine import Trainer
    from densefuse.engine.logger import RunLogger

    def run(progress):
        shown = []
        with RunLogger(tmp_path, True, progress, shown.append) as logger:
            logger.start(0, 4)
            for done in range(1, 5):
                logger.iteration(done, 1.5, 0.01, 2, report=done % 2 == 0)
            logger.info("done: summary")
        out = capsys.readouterr()
        return shown, out.out, out.err

    shown, out, err = run(progress=True)
    assert re.search(r"train: 100%.*4/4 \[\d\d:\d\d<\d\d:\d\d", err)  # tqdm's bar with elapsed<ETA
    assert shown == [] and out == "done: summary\n"  # iteration lines only in the file; messages above the bar
    shown, out, err = run(progress=False)
    assert err == "" and out == ""
    assert [re.sub(r"[\d.]+ img/s", "N img/s", s) for s in shown] == [
        "iter 2/4 loss 1.500000 lr 1.000e-02 N img/s eta 0:00:00",
        "iter 4/4 loss 1.500000 lr 1.000e-02 N img/s eta 0:00:00", "done: summary"]
    assert len(re.findall(r"iter \d/4 loss", (tmp_path / "log.txt").read_text())) == 4
    # the Trainer shows the bar only when stderr is a terminal
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert Trainer(tiny_cfg(), tmp_path / "tty").progress
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not Trainer(tiny_cfg(), tmp_path / "pipe").progress


def test_tensorboard_gets_the_training_and_evaluation_scalars(tmp_path, monkeypatch):
    """With the package installed, ``train.tensorboard`` writes ``tensorboard/``: a recording writer
    stands in for ``torch.utils.tensorboard.SummaryWriter`` (the package is optional)."""
    import importlib.util
    import sys
    import types

    written, dirs = [], []

    class Writer:
        def __init__(self, log_dir):
            dirs.append(log_dir)

        def add_scalar(self, tag, value, step):
            written.append((tag, step))

        def close(self):
            written.append(("closed", None))

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "tensorboard" else real(name, *a))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(tiny_cfg("train.tensorboard=true", "train.iters=2", "train.val_interval=2"), tmp_path / "run")
    assert dirs == [str(tmp_path / "run" / "tensorboard")]
    assert ("train/loss", 1) in written and ("train/lr", 2) in written
    assert ("val/mIoU", 2) in written and ("train/loss_mean", 2) in written
    assert written[-1] == ("closed", None)


def test_best_checkpoint_follows_the_depth_metric_down(tmp_path):
    """Depth's primary metric, abs_rel, is better when smaller: best.pth holds its minimum."""
    import pandas as pd

    import densefuse

    cfg = densefuse.load_config("depth/gedepth-vanilla_r18_1xb4-300_synthetic-64x192", overrides=[
        "train.iters=4", "train.batch_size=2", "train.val_interval=1", "train.ckpt_interval=4", "optim.lr=0.001",
        "calibration.num_images=4", "calibration.batch_size=2", "model.encoder.name=resnet10t",
        "model.decode_head.widths=[8,8,16,16,32]", "model.decode_head.attention_channels=8",
        "data.kwargs.num_train=8", "data.kwargs.num_val=2", "data.kwargs.size=[64,128]", "data.crop_size=[64,96]"])
    train(cfg, tmp_path / "run")
    hist = pd.read_csv(tmp_path / "run" / "metrics.csv").set_index("iter")["abs_rel"]
    assert hist.idxmin() != hist.idxmax()  # the direction matters in this run
    best = load_checkpoint(tmp_path / "run" / "best.pth")
    assert best["iter"] == hist.idxmin() and best["metrics"]["abs_rel"] == pytest.approx(hist.min())


@pytest.mark.parametrize("mode", ["explicit", "fold"])
def test_equalized_branches_stay_standardized_under_bf16_autocast(mode):
    """The equalizer promise (every branch enters its fusion conv at mean 0 / std 1) holds in the bf16
    forward that ``train.amp: bf16`` runs: statistics frozen in float32, measured on the live bf16 forward
    of the same images. bf16 keeps 8 significant bits, so the convolutions before each site move its
    statistics by about 1%; before the equalizer the branches have std 0.45-0.6 here."""
    import densefuse
    from densefuse.calibration import calibrate, fold, measure
    from densefuse.engine.step import autocast
    from tests.conftest import synthetic_batches

    cfg = tiny_cfg(f"model.equalizer.mode={mode}")
    torch.manual_seed(0)
    model = densefuse.get_task("seg", cfg).build_model(cfg)
    images = synthetic_batches(cfg, n_batches=2, batch_size=4)
    calibrate(model, images)
    if mode == "fold":
        fold(model)

    def bf16_forward(m, x):
        with autocast(torch.device("cpu"), torch.bfloat16):
            out = m(x)
        assert out["out"].dtype == torch.bfloat16  # the forward really ran in bf16
        return out

    table = measure(model, images, forward=bf16_forward)
    assert len(table) >= 6
    assert table["mean_after"].abs().max() <= 0.05
    assert (table["std_after"] - 1).abs().max() <= 0.05
    assert (table["std"] - 1).abs().min() > 0.3  # the equalizer, not the data, makes them std 1
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if n.endswith(("equalizer.mean", "equalizer.std")))


def test_step_clips_gradients_and_feeds_channels_last_images():
    from densefuse.engine.step import TrainStep
    from tests.test_amp import _Toy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 1, 1))
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    before = [p.detach().clone() for p in model.parameters()]
    batch = {"image": torch.randn(2, 3, 8, 8) * 10, "target": torch.full((2, 1, 8, 8), 50.0)}
    raw = torch.autograd.grad(_Toy().loss(model(batch["image"]), batch)[0], list(model.parameters()))
    assert float(torch.cat([g.flatten() for g in raw]).norm()) > 50  # far above the clip
    seen.clear()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # the step is the (clipped) gradient itself
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    step = TrainStep(model, _Toy(), opt, sched, torch.device("cpu"), grad_clip=0.5, channels_last=True)
    step([batch], 0)
    moved = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert float(moved.norm()) == pytest.approx(0.5, rel=1e-4)
    assert seen == [True]
