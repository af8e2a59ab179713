"""The CLI, in-process (click's CliRunner): a short training run, eval reproduces its mIoU, predict,
calibrate, inspect, and user errors as one ``error:`` line (exit 2) that leave the user's files alone."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from densefuse.cli import main, output_stems
from densefuse.engine.state import save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "seg"

FAST = [
    "--set", "train.iters=6", "--set", "train.batch_size=4", "--set", "train.val_interval=3",
    "--set", "train.ckpt_interval=3", "--set", "train.log_interval=2", "--set", "calibration.num_images=8",
    "--set", "data.kwargs.num_train=16", "--set", "data.kwargs.num_val=8", "--set", "data.kwargs.size=[64,64]",
    "--set", "data.crop_size=[64,64]",
]


def cli(*args):
    """Run the CLI in this process; programming errors propagate as tracebacks."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def snapshot(root):
    """Every file under ``root`` with its bytes (to show that nothing of the user's changed)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_user_error(result, *fragments):
    """Exit 2, stderr exactly one ``error:`` line containing every fragment, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run") / "wd"
    r = cli("train", "--task", "seg", "--work-dir", wd, "--no-progress", *FAST)
    assert r.exit_code == 0, r.output
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
    final = next(line for line in r.output.splitlines() if line.startswith("final: "))
    assert "'mIoU'" in final and "IoU." not in final


def test_eval_prints_the_summary_and_writes_tables(trained, tmp_path):
    wd, _ = trained
    last = pd.read_csv(wd / "metrics.csv").iloc[-1]
    r = cli("eval", "--checkpoint", wd / "final.pth", "--out", tmp_path / "eval.csv")
    assert r.exit_code == 0, r.output
    got = pd.read_csv(tmp_path / "eval.csv")
    assert list(got.columns) == ["mIoU", "mAcc", "aAcc"]  # the summary of compute(), nothing else
    assert got["mIoU"].iloc[0] == pytest.approx(last["mIoU"], abs=1e-6)
    per_class = pd.read_csv(tmp_path / "eval_per_class.csv")
    assert list(per_class.columns) == ["class", "IoU", "Acc"] and len(per_class) == 6
    assert per_class["IoU"].mean(skipna=True) == pytest.approx(last["mIoU"], abs=1e-6)
    assert f"{last['mIoU']:.2f}" in r.output and "| mIoU" in r.output
    before = snapshot(tmp_path)
    r = cli("eval", "--checkpoint", wd / "final.pth", "--out", tmp_path / "eval.csv")
    assert_user_error(r, "eval.csv already exists")
    assert snapshot(tmp_path) == before
    r = cli("eval", "--config", wd / "config.yaml", "--checkpoint", wd / "final.pth")
    assert r.exit_code == 0 and f"{last['mIoU']:.2f}" in r.output


def test_eval_does_not_need_the_pretrained_file_of_the_checkpoint(trained, tmp_path):
    """Every weight comes from the checkpoint: an ImageNet file named in its config but absent here is not read."""
    wd, _ = trained
    state = torch.load(wd / "final.pth", weights_only=True)
    state["config"]["model"]["encoder"]["pretrained"] = str(tmp_path / "gone.pth")
    save_checkpoint(tmp_path / "moved.pth", state)  # an edited checkpoint gets its new digest
    r = cli("eval", "--checkpoint", tmp_path / "moved.pth")
    assert r.exit_code == 0, r.output
    assert f"{pd.read_csv(wd / 'metrics.csv').iloc[-1]['mIoU']:.2f}" in r.output


SHIPPED = sorted(str(p.relative_to(CONFIGS.parent).with_suffix("")) for p in CONFIGS.parent.rglob("*.yaml")
                 if "_base_" not in p.parts)


@pytest.mark.parametrize("config", SHIPPED)
def test_shipped_configs_build_on_the_meta_device(config):
    """``densefuse compare`` builds every config's model, optimizer and schedule on the meta device before
    its first run; whatever fails there is raised, so every shipped config must build."""
    from densefuse.config import load_config
    from densefuse.engine.configs import build_on_meta

    build_on_meta(load_config(config, ["model.encoder.pretrained=null"]))


def test_work_dir_is_never_overwritten(trained):
    wd, _ = trained
    before = snapshot(wd)
    r = cli("train", "--work-dir", wd, "--no-progress", *FAST)
    assert_user_error(r, "already holds a run")
    assert snapshot(wd) == before


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["train", "--config", "does/not/exist.yaml"], ["config file not found: does/not/exist.yaml"]),
        (["train", "--set", "train.itres=3"], ["did you mean 'train.iters'"]),
        (["train", "--set", "train.iters=abc"], ["'train.iters' must be int"]),
        (["train", "--set", "nonexistent.key=1"], ["no config key 'nonexistent'"]),
        (["train", "--task", "segg"], ["unknown task 'segg' (did you mean 'seg'?)"]),
        (["eval", "--checkpoint", "missing.pth"], ["checkpoint not found: missing.pth"]),
        (["train", "--set", "device=gpu0"], ["'device'", "'gpu0'"]),
        (["train", "--set", "data.crop_size=[64]"], ["data.crop_size", "[64]"]),
        (["train", "--set", "model.num_classes=1"], ["model.num_classes", "at least 2"]),
        (["train", "--set", "data.augment.scale_range=[2.0,0.5]"], ["data.augment.scale_range"]),
        (["train", "--set", "seg.overlay_alpha=2.0"], ["seg.overlay_alpha"]),
        (["calibrate", "--num-images", "0"], ["--num-images must be at least 1, got 0"]),
        (["compare", "--modes", "off,bogus"], ["unknown equalizer mode(s) bogus"]),
        (["compare", "--seeds", "0,x"], ["--seeds", "'0,x'"]),
        (["compare", "--config", "nope.txt"], ["config list not found: nope.txt"]),
    ],
)
def test_user_errors_are_one_line(args, fragments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(cli(*args), *fragments)
    assert list(tmp_path.iterdir()) == []  # nothing written before the check


def test_user_error_in_a_real_process(tmp_path):
    """One subprocess smoke test: the installed entry point prints one line and exits 2."""
    r = subprocess.run([sys.executable, "-m", "densefuse.cli", "train", "--set", "train.itres=3"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "did you mean 'train.iters'?" in lines[0]


def test_unknown_config_key_in_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("_base_: []\ntrain:\n  iterz: 3\n")
    assert_user_error(cli("train", "--config", tmp_path / "bad.yaml"), "unknown config key 'train.iterz' (did you mean 'train.iters'?)")


def test_calibrate_and_inspect_commands(tmp_path):
    small = ["--set", "calibration.num_images=8", "--set", "data.kwargs.size=[64,64]", "--set", "data.crop_size=[64,64]"]
    r = cli("calibrate", *small, "--out", tmp_path / "c.csv")
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "c.csv")
    assert set(table["site"]) == {"decode_head.psp_fusion", "decode_head.fpn_fusion"}
    assert "| site" in r.output
    before = snapshot(tmp_path)
    assert_user_error(cli("calibrate", *small, "--out", tmp_path / "c.csv"), "already exists")
    assert snapshot(tmp_path) == before
    r = cli("inspect", "--set", "model.equalizer.mode=off", *small, "--out", tmp_path / "insp")
    assert r.exit_code == 0, r.output
    t = pd.read_csv(tmp_path / "insp" / "inspect.csv")
    assert (t["std_after"] - 1).abs().max() < 0.1
    fpn = t[t.site == "decode_head.fpn_fusion"]
    assert fpn["std"].max() / fpn["std"].min() > 1.1
    assert (tmp_path / "insp" / "inspect.png").stat().st_size > 1000


def test_resume_continues_from_latest_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C after the checkpoint at iteration 3 exits 130; ``--resume`` with the same settings goes on
    from 3; resuming the finished run again trains nothing more."""
    from densefuse.engine import step

    wd = tmp_path / "wd"
    original = step.TrainStep.__call__

    def interrupted(self, batches, iteration):
        if iteration == 4:
            raise KeyboardInterrupt
        return original(self, batches, iteration)

    monkeypatch.setattr(step.TrainStep, "__call__", interrupted)
    r = cli("train", "--work-dir", wd, "--no-progress", *FAST)
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted", (r.exit_code, r.output)
    assert torch.load(wd / "latest.pth", weights_only=True)["iter"] == 3 and not (wd / "final.pth").exists()
    monkeypatch.setattr(step.TrainStep, "__call__", original)
    calib = (wd / "calibration.csv").read_bytes()
    r = cli("train", "--work-dir", wd, "--no-progress", "--resume", *FAST)
    assert r.exit_code == 0, r.output
    assert "resumed from iteration 3" in (wd / "log.txt").read_text()
    assert list(pd.read_csv(wd / "metrics.csv")["iter"]) == [3, 6]
    assert torch.load(wd / "final.pth", weights_only=True)["iter"] == 6
    assert (wd / "calibration.csv").read_bytes() == calib  # the equalizer stats come from the checkpoint
    r = cli("train", "--work-dir", wd, "--no-progress", "--resume", *FAST)
    assert r.exit_code == 0 and list(pd.read_csv(wd / "metrics.csv")["iter"]) == [3, 6]
    assert_user_error(cli("train", "--work-dir", tmp_path / "empty", "--resume", *FAST), "nothing to resume")


def test_train_and_eval_an_smp_model_from_config(tmp_path):
    wd = tmp_path / "smp"
    r = cli("train", "--config", CONFIGS / "synthetic_smp_upernet_r18.yaml", "--work-dir", wd, "--no-progress",
            "--set", "model.smp.kwargs.decoder_channels=32", *FAST)
    assert r.exit_code == 0, r.output
    calib = pd.read_csv(wd / "calibration.csv")
    assert set(calib["site"]) == {"decoder.psp.out_conv", "decoder.fusion_block"}
    state = torch.load(wd / "final.pth", weights_only=True)
    assert any(k.startswith("scale_equalizers.") for k in state["model"])
    last = pd.read_csv(wd / "metrics.csv").iloc[-1]
    r = cli("eval", "--checkpoint", wd / "final.pth", "--out", wd / "eval.csv")
    assert r.exit_code == 0, r.output
    assert pd.read_csv(wd / "eval.csv").iloc[0]["mIoU"] == pytest.approx(last["mIoU"], abs=1e-6)


# --------------------------------------------------------------------------------------------------
# predict


def _write_image(path, size, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = torch.randint(0, 256, (*size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).numpy()
    Image.fromarray(arr).save(path)


def test_predict_writes_palette_class_maps_and_pictures(trained, tmp_path):
    from densefuse_tasks.seg.palettes import palette_for

    wd, _ = trained
    imgs = tmp_path / "imgs"
    _write_image(imgs / "a.png", (64, 80))
    _write_image(imgs / "b.jpg", (70, 64), seed=1)
    out = tmp_path / "pred"
    r = cli("predict", imgs, "--checkpoint", wd / "final.pth", "--out", out)
    assert r.exit_code == 0, r.output
    assert "wrote 4 files for 2 images" in r.output
    for stem, size in (("a", (64, 80)), ("b", (70, 64))):
        pred = Image.open(out / f"{stem}.png")
        # a palette PNG: the pixel values are the class ids, the palette the dataset's colours
        assert pred.size == (size[1], size[0]) and pred.mode == "P"
        ids = np.asarray(pred)
        assert ids.max() < 6
        pal = np.asarray(pred.getpalette()[:18]).reshape(6, 3)
        assert pal.tolist() == [list(c) for c in palette_for(6, "synthetic")]
        vis = Image.open(out / f"{stem}_vis.png")
        assert vis.size[0] == size[1] and vis.size[1] > size[0]  # the overlay with a legend below
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "a_vis.png", "b.png", "b_vis.png"]  # no staging left


def test_predict_outputs_are_unique_for_inputs_sharing_a_stem(trained, tmp_path):
    wd, _ = trained
    for name, seed in (("a/x.png", 0), ("a/x.jpg", 1), ("b/x.png", 2)):
        _write_image(tmp_path / "in" / name, (32, 32), seed)
    out = tmp_path / "out"
    r = cli("predict", tmp_path / "in" / "a", tmp_path / "in" / "b", "--checkpoint", wd / "final.pth", "--out", out)
    assert r.exit_code == 0, r.output
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert written == ["a/x_jpg.png", "a/x_jpg_vis.png", "a/x_png.png", "a/x_png_vis.png", "b/x.png", "b/x_vis.png"]
    assert "wrote 6 files for 3 images" in r.output
    # each output is the prediction of its own input (the three images differ)
    maps = [np.asarray(Image.open(out / n)) for n in ("a/x_jpg.png", "a/x_png.png", "b/x.png")]
    assert all(m.shape == (32, 32) for m in maps)
    rel = output_stems([Path("q/a/x.png"), Path("q/a/x.jpg"), Path("q/b/x.png")])
    assert [s.as_posix() for s in rel] == ["a/x_png", "a/x_jpg", "b/x"]


def test_predict_never_overwrites_and_reports_bad_inputs(trained, tmp_path):
    wd, _ = trained
    _write_image(tmp_path / "imgs" / "a.png", (32, 40))
    _write_image(tmp_path / "imgs" / "b.png", (32, 40), seed=1)
    out = tmp_path / "pred"
    assert cli("predict", tmp_path / "imgs" / "a.png", "--checkpoint", wd / "final.pth", "--out", out).exit_code == 0
    before = snapshot(out)
    r = cli("predict", tmp_path / "imgs", "--checkpoint", wd / "final.pth", "--out", out)
    assert_user_error(r, "a.png already exists; not overwriting it")
    assert snapshot(out) == before  # b's files were not written either: all or nothing
    (tmp_path / "broken.png").write_bytes(b"not an image")
    r = cli("predict", tmp_path / "imgs" / "b.png", tmp_path / "broken.png", "--checkpoint", wd / "final.pth",
            "--out", tmp_path / "p2")
    assert_user_error(r, "broken.png")
    assert not (tmp_path / "p2").exists()  # the output folder it created is gone again
    assert_user_error(cli("predict", tmp_path / "missing.png", "--checkpoint", wd / "final.pth", "--out", tmp_path / "p3"),
                      "input not found")


# --------------------------------------------------------------------------------------------------
# data errors through the CLI: one line naming the file and the value


def _ade_tree(root, size=(32, 32)):
    for i in range(2):
        name = f"ADE_train_{i:08d}"
        _write_image(root / "images" / "training" / f"{name}.jpg", size, seed=i)
        lab = np.full(size, i + 1, dtype=np.uint8)
        lab[0, :3] = 0
        (root / "annotations" / "training").mkdir(parents=True, exist_ok=True)
        Image.fromarray(lab, mode="L").save(root / "annotations" / "training" / f"{name}.png")
    return root


def _ade_config(tmp_path, root, workers=0):
    cfg = tmp_path / "ade_tiny.yaml"
    cfg.write_text(
        f"_base_: ['{CONFIGS / '_base_' / 'upernet_r18.yaml'}', '{CONFIGS / '_base_' / 'ade20k.yaml'}']\n"
        f"data:\n  root: {root}\n  num_workers: {workers}\n  crop_size: [32, 32]\n"
        "calibration:\n  num_images: 2\n  batch_size: 2\n"
    )
    return cfg


def _calibrate_fails(tmp_path, cfg, *fragments):
    data_before = snapshot(tmp_path)
    r = cli("calibrate", "--config", cfg, "--out", tmp_path / "calib.csv")
    line = assert_user_error(r, *fragments)
    assert snapshot(tmp_path) == data_before  # nothing changed, nothing written
    return line


def test_corrupt_jpeg_in_a_worker_is_one_line_naming_the_file(tmp_path):
    root = _ade_tree(tmp_path / "ade")
    bad = root / "images" / "training" / "ADE_train_00000001.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    line = _calibrate_fails(tmp_path, _ade_config(tmp_path, root, workers=1), "cannot decode image file", str(bad))
    assert "DataLoader worker" not in line and "Original Traceback" not in line


def test_label_out_of_range_reports_the_files_value(tmp_path):
    root = _ade_tree(tmp_path / "ade")
    lab_path = root / "annotations" / "training" / "ADE_train_00000000.png"
    lab = np.asarray(Image.open(lab_path)).copy()
    lab[5, 5] = 200
    Image.fromarray(lab, mode="L").save(lab_path)
    line = _calibrate_fails(tmp_path, _ade_config(tmp_path, root), str(lab_path), ": 200")
    values = line.split(str(lab_path), 1)[1]  # the temp path itself may hold any number (pytest-199)
    assert "199" not in values and "reduce_zero_label" in values


def test_image_label_size_mismatch_names_both_files(tmp_path):
    root = _ade_tree(tmp_path / "ade")
    img = root / "images" / "training" / "ADE_train_00000001.jpg"
    _write_image(img, (30, 32))
    lab = root / "annotations" / "training" / "ADE_train_00000001.png"
    _calibrate_fails(tmp_path, _ade_config(tmp_path, root), str(img), str(lab))
