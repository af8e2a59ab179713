"""End-to-end CLI: a short training run, eval reproduces its mIoU, and user errors are one line."""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

FAST = [
    "--set", "train.iters=6", "--set", "train.batch_size=4", "--set", "train.val_interval=3",
    "--set", "train.ckpt_interval=3", "--set", "train.log_interval=2", "--set", "calibration.num_images=8",
    "--set", "data.kwargs.num_train=16", "--set", "data.kwargs.num_val=8", "--set", "data.kwargs.size=[64,64]",
    "--set", "data.crop_size=[64,64]",
]


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "densefuse.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run") / "wd"
    r = run("train", "--task", "seg", "--work-dir", str(wd), "--no-progress", *FAST)
    assert r.returncode == 0, r.stderr
    return wd, r


def test_train_writes_metrics_and_checkpoints(trained):
    wd, r = trained
    metrics = pd.read_csv(wd / "metrics.csv")
    assert list(metrics["iter"]) == [3, 6]
    assert {"mIoU", "mAcc", "aAcc", "loss", "lr"} <= set(metrics.columns)
    for f in ("config.yaml", "calibration.csv", "latest.pth", "final.pth", "log.txt", "predictions.png"):
        assert (wd / f).is_file(), f
    state = torch.load(wd / "final.pth", weights_only=True)
    assert state["iter"] == 6
    assert bool(state["model"]["decode_head.fpn_fusion.equalizer.calibrated"])
    calib = pd.read_csv(wd / "calibration.csv")
    assert len(calib) == 9


def test_eval_reproduces_training_miou(trained):
    wd, _ = trained
    last = pd.read_csv(wd / "metrics.csv").iloc[-1]
    r = run("eval", "--checkpoint", str(wd / "final.pth"), "--out", str(wd / "eval.csv"))
    assert r.returncode == 0, r.stderr
    got = pd.read_csv(wd / "eval.csv").iloc[0]
    assert got["mIoU"] == pytest.approx(last["mIoU"], abs=1e-6)
    assert got["aAcc"] == pytest.approx(last["aAcc"], abs=1e-6)
    r2 = run("eval", "--config", str(wd / "config.yaml"), "--checkpoint", str(wd / "final.pth"))
    assert r2.returncode == 0, r2.stderr
    assert f"{last['mIoU']:.2f}" in r2.stdout


def test_work_dir_is_never_overwritten(trained):
    wd, _ = trained
    before = (wd / "metrics.csv").read_bytes()
    r = run("train", "--work-dir", str(wd), "--no-progress", *FAST)
    assert r.returncode == 2
    assert "already holds a run" in r.stderr
    assert (wd / "metrics.csv").read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--config", "does/not/exist.yaml"], "config file not found: does/not/exist.yaml"),
        (["train", "--set", "train.itres=3"], "did you mean 'train.iters'"),
        (["train", "--set", "train.iters=abc"], "'train.iters' must be int"),
        (["train", "--set", "nonexistent.key=1"], "no config key 'nonexistent'"),
        (["train", "--task", "segg"], "unknown task 'segg' (did you mean 'seg'?)"),
        (["eval", "--checkpoint", "missing.pth"], "checkpoint not found: missing.pth"),
    ],
)
def test_user_errors_are_one_line(args, message, tmp_path):
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]


def test_unknown_config_key_in_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("_base_: []\ntrain:\n  iterz: 3\n")
    r = run("train", "--config", str(tmp_path / "bad.yaml"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown config key 'train.iterz' (did you mean 'train.iters'?)" in r.stderr


def test_calibrate_and_inspect_commands(tmp_path):
    r = run("calibrate", "--set", "calibration.num_images=8", "--set", "data.kwargs.size=[64,64]",
            "--set", "data.crop_size=[64,64]", "--out", str(tmp_path / "c.csv"))
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(tmp_path / "c.csv")
    assert set(table["site"]) == {"decode_head.psp_fusion", "decode_head.fpn_fusion"}
    assert "| site" in r.stdout
    r = run("calibrate", "--set", "calibration.num_images=8", "--out", str(tmp_path / "c.csv"))
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run("inspect", "--set", "model.equalizer.mode=off", "--set", "calibration.num_images=8",
            "--set", "data.kwargs.size=[64,64]", "--set", "data.crop_size=[64,64]", "--out", str(tmp_path / "insp"))
    assert r.returncode == 0, r.stderr
    t = pd.read_csv(tmp_path / "insp" / "inspect.csv")
    assert (t["std_after"] - 1).abs().max() < 0.1
    fpn = t[t.site == "decode_head.fpn_fusion"]
    assert fpn["std"].max() / fpn["std"].min() > 1.1
    assert (tmp_path / "insp" / "inspect.png").stat().st_size > 1000


def test_resume_continues_from_latest_checkpoint(tmp_path):
    wd = tmp_path / "wd"
    short = [a if a != "train.iters=6" else "train.iters=3" for a in FAST]
    r = run("train", "--work-dir", str(wd), "--no-progress", *short)
    assert r.returncode == 0, r.stderr
    calib = (wd / "calibration.csv").read_bytes()
    r = run("train", "--work-dir", str(wd), "--no-progress", "--resume", *FAST)
    assert r.returncode == 0, r.stderr
    assert "resumed from iteration 3" in (wd / "log.txt").read_text()
    assert list(pd.read_csv(wd / "metrics.csv")["iter"]) == [3, 6]
    assert torch.load(wd / "final.pth", weights_only=True)["iter"] == 6
    assert (wd / "calibration.csv").read_bytes() == calib  # the equalizer stats come from the checkpoint
    r = run("train", "--work-dir", str(tmp_path / "empty"), "--resume", *FAST)
    assert r.returncode == 2 and "nothing to resume" in r.stderr


def test_train_and_eval_an_smp_model_from_config(tmp_path):
    wd = tmp_path / "smp"
    r = run("train", "--config", "configs/seg/synthetic_smp_upernet_r18.yaml", "--work-dir", str(wd), "--no-progress",
            "--set", "model.smp.kwargs.decoder_channels=32", *FAST)
    assert r.returncode == 0, r.stderr
    calib = pd.read_csv(wd / "calibration.csv")
    assert set(calib["site"]) == {"decoder.psp.out_conv", "decoder.fusion_block"}
    state = torch.load(wd / "final.pth", weights_only=True)
    assert any(k.startswith("scale_equalizers.") for k in state["model"])
    assert "decoder.fusion_block.0.weight" in state["model"]  # smp's own keys are unchanged
    last = pd.read_csv(wd / "metrics.csv").iloc[-1]
    r = run("eval", "--checkpoint", str(wd / "final.pth"), "--out", str(wd / "eval.csv"))
    assert r.returncode == 0, r.stderr
    assert pd.read_csv(wd / "eval.csv").iloc[0]["mIoU"] == pytest.approx(last["mIoU"], abs=1e-6)


def test_predict_writes_class_maps_and_pictures(trained, tmp_path):
    from PIL import Image

    wd, _ = trained
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = torch.Generator().manual_seed(0)
    for name, size in (("a.png", (64, 80)), ("b.jpg", (70, 64))):
        arr = torch.randint(0, 256, (*size, 3), generator=rng, dtype=torch.uint8).numpy()
        Image.fromarray(arr).save(imgs / name)
    out = tmp_path / "pred"
    r = run("predict", str(imgs), "--checkpoint", str(wd / "final.pth"), "--out", str(out))
    assert r.returncode == 0, r.stderr
    for stem, size in (("a", (64, 80)), ("b", (70, 64))):
        pred = Image.open(out / f"{stem}.png")
        assert pred.size == (size[1], size[0]) and pred.mode == "L"
        assert np.asarray(pred).max() < 6  # class ids of the 6-class synthetic model
        assert Image.open(out / f"{stem}_vis.png").size == (size[1], size[0])
    before = (out / "a.png").read_bytes()
    r = run("predict", str(imgs / "a.png"), "--checkpoint", str(wd / "final.pth"), "--out", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (out / "a.png").read_bytes() == before
    (tmp_path / "broken.png").write_bytes(b"not an image")
    r = run("predict", str(tmp_path / "broken.png"), "--checkpoint", str(wd / "final.pth"), "--out", str(tmp_path / "p2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "broken.png" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run("predict", str(tmp_path / "missing.png"), "--checkpoint", str(wd / "final.pth"), "--out", str(tmp_path / "p3"))
    assert r.returncode == 2 and "input not found" in r.stderr
