"""Data checked up front: ``densefuse check-data``, ``data.verify`` and ``data.skip_bad``."""
import numpy as np
import pytest
import torch
from PIL import Image

from densefuse.engine import Trainer
from densefuse.engine.state import read_checkpoint
from densefuse.engine.step import TrainStep

from .test_cli import CONFIGS, _write_image, assert_user_error, cli
from .test_depth_cli import DRIVE, fake_kitti, kitti_args
from .test_engine import TINY


def ade_tree(root, n=6, size=(32, 32)):
    """ADE20K's layout with ``n`` training and 2 validation pairs; one training image named ``.JPG``."""
    for split, count in (("training", n), ("validation", 2)):
        for i in range(count):
            name = f"ADE_{split}_{i:08d}"
            suffix = ".JPG" if (split, i) == ("training", n - 1) else ".jpg"
            _write_image(root / "images" / split / f"{name}{suffix}", size, seed=i)
            lab = np.full(size, 1 + i % 3, dtype=np.uint8)
            lab[0, :3] = 0
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(lab, mode="L").save(root / "annotations" / split / f"{name}.png")
    return root


def ade_config(tmp_path, root):
    cfg = tmp_path / "ade_tiny.yaml"
    cfg.write_text(
        f"_base_: ['{CONFIGS / '_base_' / 'upernet_r18.yaml'}', '{CONFIGS / '_base_' / 'ade20k.yaml'}']\n"
        f"data:\n  root: {root}\n  num_workers: 0\n  crop_size: [32, 32]\n"
        "calibration:\n  num_images: 4\n  batch_size: 2\n"
    )
    return cfg


def sets(items):
    return [a for s in items for a in ("--set", s)]


TRAIN = [s for s in TINY if not s.startswith("data.kwargs")] + [
    "model.num_classes=150", "train.iters=6", "train.ckpt_interval=2", "train.val_interval=6", "eval.batch_size=1"]


def break_files(root):
    """Five kinds of bad sample in the training split; returns the culprit file names."""
    tr_img, tr_ann = root / "images" / "training", root / "annotations" / "training"
    jpg = tr_img / "ADE_training_00000000.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])  # truncated JPEG
    Image.fromarray(np.ones((30, 32), np.uint8), mode="L").save(tr_ann / "ADE_training_00000001.png")  # wrong size
    lab = np.ones((32, 32), np.uint8)
    lab[4, 4] = 200
    Image.fromarray(lab, mode="L").save(tr_ann / "ADE_training_00000002.png")  # out of range
    (tr_ann / "ADE_training_00000003.png").unlink()  # missing file
    Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(tr_ann / "ADE_training_00000004.png")  # no valid pixel
    return ["ADE_training_00000000.jpg", "ADE_training_00000001.png", "ADE_training_00000002.png",
            "ADE_training_00000003.png", "ADE_training_00000004.png"]


def test_check_data_lists_every_bad_file_in_one_pass(tmp_path):
    root = ade_tree(tmp_path / "ade")
    culprits = break_files(root)
    r = cli("check-data", "--config", ade_config(tmp_path, root), "--threads", "2")
    assert_user_error(r, "5 bad samples")
    report = r.stdout
    assert "ade20k train: 5 samples read" in report and "ade20k val: 2 samples read" in report and ": 0 bad" in report
    bad_lines = [line.strip() for line in report.splitlines() if line.startswith("  ")]
    assert len(bad_lines) == 5, report
    for name, reason in zip(culprits, ["cannot decode image file", "but its label", "200", "label file not found",
                                       "has no valid pixel"]):
        line = next(x for x in bad_lines if name in x)
        assert reason in line, (name, line)
    # the .JPG image was found (case-insensitive suffix) and is good: not listed
    assert "00000005" not in "\n".join(bad_lines)


def test_check_data_passes_a_good_tree(tmp_path):
    root = ade_tree(tmp_path / "ade")
    r = cli("check-data", "--config", ade_config(tmp_path, root))
    assert r.exit_code == 0, r.output
    assert "ade20k train: 6 samples read" in r.stdout


def test_check_data_on_kitti_finds_empty_and_undecodable_depth(tmp_path):
    root = fake_kitti(tmp_path / "kitti")
    gt = root / "gt_depth" / DRIVE / "proj_depth" / "groundtruth" / "image_02"
    Image.fromarray(np.zeros((72, 208), np.uint16)).save(gt / "0000000000.png")  # all zero
    (gt / "0000000001.png").write_bytes(b"not a png")
    r = cli("check-data", *kitti_args(root))
    assert_user_error(r, "2 bad samples")
    assert "0000000000.png has no valid pixel: every depth is 0" in r.stdout
    assert "cannot decode depth file" in r.stdout and "0000000001.png" in r.stdout


def test_data_verify_stops_training_before_the_run_dir_exists(tmp_path):
    root = ade_tree(tmp_path / "ade")
    jpg = root / "images" / "training" / "ADE_training_00000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    r = cli("train", "--config", ade_config(tmp_path, root), *sets(TRAIN), "--work-dir", tmp_path / "run")
    assert_user_error(r, "data.verify found 1 bad samples", "ADE_training_00000002.jpg", "data.skip_bad=true")
    assert not (tmp_path / "run").exists()


def test_skip_bad_with_verify_replaces_the_samples_it_found(tmp_path):
    import densefuse
    from densefuse.data.check import SkipBad

    root = ade_tree(tmp_path / "ade")
    jpg = root / "images" / "training" / "ADE_training_00000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    cfg = densefuse.load_config(str(ade_config(tmp_path, root)), overrides=[*TRAIN, "data.skip_bad=true"])
    lines = []
    trainer = Trainer(cfg, tmp_path / "run", progress=False, log=lines.append)
    train_set = trainer.task.build_dataset(cfg, "train")
    wrapped = trainer._verify(train_set, trainer.task.build_dataset(cfg, "val"))  # data.verify null: 8 samples
    assert isinstance(wrapped, SkipBad) and wrapped.known == {2}
    assert any("data.skip_bad: 1 bad training samples" in m and "ADE_training_00000002.jpg" in m for m in lines)
    assert wrapped[2]["name"] == "ADE_training_00000003"  # the next readable sample, by index


def test_skip_bad_trains_through_a_bad_sample_and_resumes_exactly(tmp_path, capsys):
    import densefuse

    root = ade_tree(tmp_path / "ade")
    jpg = root / "images" / "training" / "ADE_training_00000002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:200])
    cfg = densefuse.load_config(str(ade_config(tmp_path, root)),
                                overrides=[*TRAIN, "data.skip_bad=true", "data.verify=false"])
    Trainer(cfg, tmp_path / "full", progress=False, log=lambda m: None).run()
    assert "data.skip_bad: cannot decode image file" in capsys.readouterr().err

    original = TrainStep.__call__

    def stop_at_4(self, batches, iteration):
        if iteration == 4:
            raise KeyboardInterrupt
        return original(self, batches, iteration)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TrainStep, "__call__", stop_at_4)
        with pytest.raises(KeyboardInterrupt):
            Trainer(cfg, tmp_path / "cut", progress=False, log=lambda m: None).run()
    Trainer(cfg, tmp_path / "cut", resume=True, progress=False, log=lambda m: None).run()
    a, b = read_checkpoint(tmp_path / "full" / "latest.pth"), read_checkpoint(tmp_path / "cut" / "latest.pth")
    assert a["iter"] == b["iter"] == 6
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
