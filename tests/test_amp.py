"""Mixed precision: bf16 trains and evaluates on CPU; fp16 needs CUDA (a config error otherwise)."""
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from densefuse import ConfigError
from densefuse.cli import main
from densefuse.engine import load_checkpoint
from densefuse.engine.step import TrainStep, check_amp
from densefuse.tasks import Task

from .test_engine import CONFIG, TINY, tiny_cfg, train


def test_bf16_on_cpu_trains_and_evaluates(tmp_path):
    wd = tmp_path / "run"
    metrics = train(tiny_cfg("train.amp=bf16", "train.iters=4", "train.val_interval=4"), wd)
    assert math.isfinite(metrics["mIoU"]) and 0 <= metrics["mIoU"] <= 100
    final = load_checkpoint(wd / "final.pth")["model"]
    assert all(v.dtype != torch.bfloat16 for v in final.values())  # weights stay float32 under autocast
    assert "amp bf16" in (wd / "log.txt").read_text()


def test_fp16_without_cuda_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.amp: fp16 needs a CUDA device"):
        check_amp("fp16", torch.device("cpu"))
    args = ["train", "-c", CONFIG, "--work-dir", str(tmp_path / "run"), "--no-progress"]
    for o in [*TINY, "train.amp=fp16", "device=cpu"]:
        args += ["--set", o]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    err_lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert err_lines == ["error: train.amp: fp16 needs a CUDA device (device is cpu); use bf16 on CPU"]
    assert not (tmp_path / "run").exists()  # refused before anything is written


class _Toy(Task):
    name = "toy"
    primary_metric = "err"

    def build_dataset(self, cfg, split):
        raise AssertionError

    def build_transform(self, cfg, train):
        raise AssertionError

    def loss(self, outputs, batch):
        loss = (outputs - batch["target"]).square().mean()
        return loss, {"mse": float(loss.detach())}

    def metric(self, cfg):
        raise AssertionError

    def predict(self, outputs):
        return outputs


def test_step_autocasts_and_keeps_float32_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 1, 1))
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: 1.0)
    step = TrainStep(model, _Toy(), opt, sched, torch.device("cpu"), amp="bf16", grad_clip=1.0, channels_last=True)
    batch = {"image": torch.randn(2, 3, 8, 8), "target": torch.zeros(2, 1, 8, 8)}
    losses = [step([batch], i)[0] for i in range(5)]
    assert seen[0] == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert losses[-1] < losses[0]
    assert step.state_dict()["scaler"] == {}  # no loss scaling without fp16
