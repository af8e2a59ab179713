"""`densefuse train/eval/predict --task depth` in-process, on the synthetic scenes and on a fake KITTI tree."""
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from densefuse_tasks.depth import METRIC_NAMES, SyntheticRoad
from PIL import Image

from densefuse.cli import main

from .test_depth_geometry import CAM_TO_CAM, VELO_TO_CAM, write_calib

TINY = [
    "train.iters=4", "train.batch_size=2", "train.val_interval=4", "train.ckpt_interval=4", "train.log_interval=2",
    "calibration.num_images=4", "calibration.batch_size=2", "model.encoder.name=resnet10t",
    "model.decode_head.widths=[8,8,16,16,32]",
    "model.decode_head.attention_channels=8",
]
SYNTH = TINY + ["data.kwargs.num_train=8", "data.kwargs.num_val=3", "data.kwargs.size=[64,128]",
                "data.crop_size=[64,96]", "depth.predict_camera={fx: 77.0, fy: 77.0, cx: 63.5, cy: 27.0}"]


def sets(items):
    return [a for s in items for a in ("--set", s)]


def run(args):
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result


def train_and_eval(tmp_path, args):
    wd = tmp_path / "run"
    res = run(["train", *args, "--work-dir", str(wd), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert (wd / "metrics.csv").is_file() and (wd / "final.pth").is_file() and (wd / "latest.pth").is_file()
    assert (wd / "predictions.png").is_file() and (wd / "calibration.csv").is_file()
    logged = pd.read_csv(wd / "metrics.csv").iloc[-1]
    out = tmp_path / "eval.csv"
    res = run(["eval", "--checkpoint", str(wd / "final.pth"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    evaluated = pd.read_csv(out).iloc[0]
    for k in METRIC_NAMES:
        assert evaluated[k] == pytest.approx(logged[k], rel=1e-5, abs=1e-7), k
    assert "abs_rel" in res.output and "silog" in res.output
    return wd, logged


def test_train_eval_predict_synthetic(tmp_path):
    wd, logged = train_and_eval(tmp_path, ["--task", "depth", *sets(SYNTH)])
    assert 0 < logged["abs_rel"] < 10 and 0 <= logged["a1"] <= 1
    # predict on a plain image file: 16-bit depth PNG (metres x 256) and a colour picture
    img = SyntheticRoad(1, size=(64, 128), split="test").render(0)["image"]
    src = tmp_path / "frame.png"
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(src)
    res = run(["predict", str(src), "--checkpoint", str(wd / "final.pth"), "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    depth = np.asarray(Image.open(tmp_path / "pred" / "frame.png"))
    assert depth.dtype == np.uint16 and depth.shape == (64, 128) and depth.max() > 0
    assert np.asarray(Image.open(tmp_path / "pred" / "frame_vis.png")).shape[-1] == 3
    # predict evaluates as eval does: eval.tta.flip (GEDepth's flip TTA) reaches its output
    res = run(["predict", str(src), "--checkpoint", str(wd / "final.pth"), "--out", str(tmp_path / "flip"),
               "--set", "eval.tta.flip=true"])
    assert res.exit_code == 0, res.output
    flipped = np.asarray(Image.open(tmp_path / "flip" / "frame.png"))
    assert flipped.shape == depth.shape and not np.array_equal(flipped, depth)


def test_save_prediction_writes_kitti_png(tmp_path):
    from densefuse_tasks.depth import DepthTask

    pred = torch.full((1, 1, 4, 6), 12.5)
    paths = DepthTask({}).save_prediction(pred, tmp_path / "a" / "x")
    assert [p.name for p in paths] == ["x.png", "x_vis.png"]
    assert (np.asarray(Image.open(paths[0])) == 3200).all()


# ---------------------------------------------------------------------------------------------- KITTI
DRIVE = "2011_09_26_drive_0001_sync"
H, W = 72, 208  # small raw frames; the KB crop is shrunk to match


def fake_kitti(root, n=4, bad=None):
    """Official layout: raw images + calib per date, uint16 ground truth, split files."""
    raw = root / "input" / "2011_09_26"
    write_calib(raw, cam=CAM_TO_CAM, velo=VELO_TO_CAM)
    img_dir = raw / DRIVE / "image_02" / "data"
    gt_dir = root / "gt_depth" / DRIVE / "proj_depth" / "groundtruth" / "image_02"
    img_dir.mkdir(parents=True)
    gt_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        name = f"{i:010d}.png"
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(img_dir / name)
        depth = rng.uniform(2, 70, (H, W)) * (rng.random((H, W)) < 0.3)
        Image.fromarray((depth * 256).astype(np.uint16)).save(gt_dir / name)
        lines.append(f"2011_09_26/{DRIVE}/image_02/data/{name} {DRIVE}/proj_depth/groundtruth/image_02/{name} 721.5377")
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("\n".join(lines[:3]) + "\n")
    (root / "splits" / "test.txt").write_text("\n".join(lines[2:]) + f"\n2011_09_26/{DRIVE}/image_02/data/x.png None 721.5377\n")
    return root


def kitti_args(root):
    return ["--config", "depth/gedepth-vanilla_r50_1xb8-38.4k_kitti-352x704.yaml", *sets(TINY + [
        f"data.root={root}", "data.train_split=splits/train.txt", "data.val_split=splits/test.txt",
        "data.num_workers=0", "data.kwargs.kb_crop=[64,192]", "data.crop_size=[64,128]",
        "train.amp=off", "eval.tta.flip=true"])]


def test_train_eval_on_a_fake_kitti_tree(tmp_path):
    root = fake_kitti(tmp_path / "kitti")
    train_and_eval(tmp_path, kitti_args(root))


@pytest.mark.parametrize("fault", ["calib_file", "calib_line", "8bit", "missing_image", "size"])
def test_bad_kitti_input_is_one_clear_error(tmp_path, fault):
    root = fake_kitti(tmp_path / "kitti")
    raw = root / "input" / "2011_09_26"
    gt = root / "gt_depth" / DRIVE / "proj_depth" / "groundtruth" / "image_02" / "0000000000.png"
    if fault == "calib_file":
        (raw / "calib_velo_to_cam.txt").unlink()
        culprit = "calib_velo_to_cam.txt"
    elif fault == "calib_line":
        text = "\n".join(x for x in CAM_TO_CAM.splitlines() if not x.startswith("R_rect_00"))
        (raw / "calib_cam_to_cam.txt").write_text(text)
        culprit = "R_rect_00"
    elif fault == "8bit":
        Image.fromarray(np.full((H, W), 10, np.uint8)).save(gt)
        culprit = "0000000000.png"
    elif fault == "missing_image":
        (raw / DRIVE / "image_02" / "data" / "0000000001.png").unlink()
        culprit = "0000000001.png"
    else:
        Image.fromarray(np.zeros((H - 2, W), np.uint16)).save(gt)
        culprit = "0000000000.png"
    result = CliRunner().invoke(main, ["train", *kitti_args(root), "--work-dir", str(tmp_path / "w"), "--no-progress"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and culprit in errors[0], result.output
    assert "Traceback" not in result.output
