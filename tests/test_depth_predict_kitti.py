"""`densefuse predict` on raw KITTI: the ground embedding from a date folder's calibration (--calib, or found
in a raw tree) and the KB crop of KITTI-trained models."""
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from densefuse_tasks.depth import read_kitti_calib
from PIL import Image

import densefuse
from densefuse.cli import main

from .test_depth_geometry import write_calib

CONFIG = "depth/gedepth-vanilla_r50_1xb8-38.4k_kitti-352x704.yaml"
SMALL = ["model.encoder.name=resnet10t", "model.decode_head.widths=[8,8,16,16,32]",
         "model.decode_head.attention_channels=8", "model.equalizer.mode=off", "data.root=unused",
         "eval.tta.flip=false"]
DRIVE = "2011_09_26_drive_0001_sync"


def sets(items):
    return [a for s in items for a in ("--set", s)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A small KITTI-config depth model's weights whose output depends on the ground embedding."""
    cfg = densefuse.load_config(CONFIG, SMALL)
    torch.manual_seed(0)
    model = densefuse.get_task("depth", cfg).build_model(cfg)
    with torch.no_grad():
        model.attention.out.bias.fill_(4.0)  # attention ~1: the output follows the ground depth where there is one
    path = tmp_path_factory.mktemp("ck") / "model.pth"
    torch.save({"model": model.state_dict()}, path)
    return path


def raw_tree(root):
    """<date>/<drive>/image_02/data/0000000000.png (375x1242, KITTI's size) with the date's calib files."""
    date = write_calib(root / "2011_09_26")
    img_dir = date / DRIVE / "image_02" / "data"
    img_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (375, 1242, 3), dtype=np.uint8)).save(img_dir / "0000000000.png")
    return date, img_dir / "0000000000.png"


def read_depth(path):
    return np.asarray(Image.open(path)).astype(np.float64) / 256.0


def test_predict_sample_uses_the_calibration_and_the_kb_crop(tmp_path):
    date, img = raw_tree(tmp_path / "raw")
    cfg = densefuse.load_config(CONFIG, SMALL)
    task = densefuse.get_task("depth", cfg)
    image = torch.from_numpy(np.array(Image.open(img))).permute(2, 0, 1).contiguous()
    for calib in (date, None):  # --calib, or found two folders above the drive
        s = task.predict_sample(image, img, calib)
        assert s["image"].shape == (3, 352, 1216) and s["ground"].shape == (1, 352, 1216)
        cam = read_kitti_calib(date, 1.65)
        full = cam.ground((375, 1242))
        top, left = 375 - 352, (1242 - 1216) // 2
        assert torch.equal(s["ground"][0], full[top:top + 352, left:left + 1216])
        assert torch.equal(s["image"], image[:, top:, left:left + 1216])
        assert torch.allclose(s["ground_inv"][0], cam.inverse_ground((375, 1242))[top:, left:left + 1216])
    # outside a raw tree and without --calib: the image alone (depth.predict_camera supplies the ground)
    lone = tmp_path / "lone.png"
    Image.open(img).save(lone)
    assert set(task.predict_sample(image, lone)) == {"image"}


def test_predict_with_a_kitti_calibration_folder(tmp_path, checkpoint):
    date, img = raw_tree(tmp_path / "raw")
    lone = tmp_path / "in" / "frame.png"
    lone.parent.mkdir()
    Image.open(img).save(lone)
    args = ["--checkpoint", str(checkpoint), "--config", CONFIG, *sets(SMALL)]
    res = CliRunner().invoke(main, ["predict", str(lone), "--calib", str(date), "--out", str(tmp_path / "a"), *args],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    got = read_depth(tmp_path / "a" / "frame.png")
    assert got.shape == (352, 1216)  # the KB crop
    # the model follows the ground embedding of this calibration on the road (attention ~ 1)
    cam = read_kitti_calib(date, 1.65)
    ground = cam.ground((375, 1242))[375 - 352:, 13:13 + 1216].double().numpy()
    road = (ground > 5) & (ground < 60)
    assert road.mean() > 0.3
    assert np.median(np.abs(got[road] - ground[road]) / ground[road]) < 0.05
    # the same image inside the raw tree finds the calibration by itself
    res = CliRunner().invoke(main, ["predict", str(img), "--out", str(tmp_path / "b"), *args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert np.array_equal(read_depth(tmp_path / "b" / "0000000000.png"), got)
    # a folder without the calib files is one clear error, nothing written
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["predict", str(lone), "--calib", str(empty), "--out", str(tmp_path / "c"), *args])
    assert res.exit_code == 2 and "calib_cam_to_cam.txt" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "c").exists()
