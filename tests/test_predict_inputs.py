"""What ``predict`` reads (folders walked, suffixes in any case, skipped files named, a pixel limit from the
header) and that every command taking ``--checkpoint`` builds from the checkpoint's own config."""
import numpy as np
import pytest
import torch
from PIL import Image

import densefuse
from densefuse.tasks import get_task

from .test_cli import assert_user_error, cli

SMALL = ["model.equalizer.mode=off", "model.decode_head.channels=16", "model.auxiliary_head.channels=8",
         "data.kwargs.size=[32,32]", "data.crop_size=[32,32]", "data.kwargs.num_train=4", "data.kwargs.num_val=2",
         "calibration.batch_size=2"]


def _checkpoint(path, config, overrides):
    cfg = densefuse.load_config(config, overrides)
    torch.manual_seed(0)
    model = get_task(cfg["task"], cfg).build_model(cfg)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def seg_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("ck") / "seg.pth", "seg/synthetic_upernet_r18", SMALL)


def _image(path, size=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(
        path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")


def test_a_folder_is_walked_with_its_subfolders_and_skipped_files_are_named(seg_ckpt, tmp_path):
    split = tmp_path / "leftImg8bit" / "val"  # a Cityscapes split folder: images one level down
    _image(split / "frankfurt" / "a.png")
    _image(split / "lindau" / "b.JPG")
    _image(split / "lindau" / "c.Png")
    (split / "lindau" / "anim.gif").write_bytes(b"GIF89a")
    (split / "README.txt").write_text("notes")
    r = cli("predict", split, "--checkpoint", seg_ckpt, "--out", tmp_path / "pred")
    assert r.exit_code == 0, r.output
    written = sorted(p.relative_to(tmp_path / "pred").as_posix() for p in (tmp_path / "pred").rglob("*.png"))
    assert written == ["frankfurt/a.png", "frankfurt/a_vis.png", "lindau/b.png", "lindau/b_vis.png",
                       "lindau/c.png", "lindau/c_vis.png"]
    skipped = [ln for ln in r.output.splitlines() if ln.startswith("skipped")]
    assert len(skipped) == 1 and "2 files" in skipped[0] and ".gif: 1" in skipped[0] and ".txt: 1" in skipped[0]
    assert "anim.gif" in skipped[0] and "README.txt" in skipped[0]


def test_calib_is_refused_for_a_task_whose_predict_sample_does_not_read_it(seg_ckpt, tmp_path):
    """``--calib`` goes to ``Task.predict_sample`` only where the task declares ``predict_calib`` (depth)."""
    _image(tmp_path / "a.png")
    r = cli("predict", tmp_path / "a.png", "--checkpoint", seg_ckpt, "--calib", tmp_path, "--out", tmp_path / "pred")
    assert r.exit_code == 2 and "--calib is for the depth task, not 'seg'" in r.output, r.output
    assert not (tmp_path / "pred").exists()


def test_the_output_folder_inside_the_input_folder_is_not_read(seg_ckpt, tmp_path):
    _image(tmp_path / "imgs" / "a.png")
    _image(tmp_path / "imgs" / "pred" / "earlier.png")  # the output folder already holds an image
    r = cli("predict", tmp_path / "imgs", "--checkpoint", seg_ckpt, "--out", tmp_path / "imgs" / "pred")
    assert r.exit_code == 0 and "for 1 images" in r.output, r.output
    assert (tmp_path / "imgs" / "pred" / "a.png").is_file() and not (tmp_path / "imgs" / "pred" / "pred").exists()


def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(seg_ckpt, tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(big, optimize=True)  # 12 megapixels in a few kB
    decoded = []
    monkeypatch.setattr("densefuse.data.io.read_image", lambda *a, **k: decoded.append(a) or None)
    line = assert_user_error(cli("predict", big, "--checkpoint", seg_ckpt, "--out", tmp_path / "pred",
                                 "--max-pixels", "10000000"),
                             "big.png declares 4000x3000 pixels", "12.0 megapixels", "--max-pixels 10000000")
    assert "GiB" in line and not decoded and not (tmp_path / "pred").exists()


def test_inspect_of_a_depth_checkpoint_builds_the_depth_model(tmp_path, monkeypatch):
    """The checkpoint's config (a depth run) builds the model; the seg default would not fit its weights."""
    monkeypatch.chdir(tmp_path)
    ckpt = _checkpoint(tmp_path / "depth.pth", "depth/gedepth-vanilla_r18_1xb4-300_synthetic-64x192",
                       ["data.kwargs.num_train=4", "data.kwargs.size=[32,96]", "data.crop_size=[32,96]",
                        "calibration.batch_size=2", "model.decode_head.widths=[8,16,24,32,48]"])
    r = cli("inspect", "--task", "depth", "--checkpoint", ckpt, "--num-images", "2", "--out", tmp_path / "insp")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "insp" / "inspect.csv").is_file()
