"""``data.pipeline: mmseg`` in the seg task: per-sample geometry in the dataset, batched photometric and
zero padding on the device, evaluation at the original label size; a paper config end to end."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from densefuse_tasks.seg import SegTask
from PIL import Image

from densefuse.config import load_config
from densefuse.data import build_loader
from densefuse.engine import Trainer

PAPER = Path(__file__).resolve().parent.parent / "configs" / "seg" / "paper"
#: image (h, w) of the fake ADE20K tree: one wider and one taller than the reference scale allows
SIZES = {"training": [(40, 56), (36, 30), (44, 44)], "validation": [(30, 42), (40, 28)]}


def make_ade(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, sizes in SIZES.items():
        for i, (h, w) in enumerate(sizes):
            name = f"ADE_{split[:5]}_{i:08d}"
            (root / "images" / split).mkdir(parents=True, exist_ok=True)
            (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / split / f"{name}.jpg")
            lab = np.zeros((h, w), dtype=np.uint8)  # 0 = "other" -> 255 after reduce_zero_label
            lab[: h // 2] = 1 + i
            lab[h // 2:, : w // 2] = 7
            Image.fromarray(lab).save(root / "annotations" / split / f"{name}.png")


def _cfg(root, *overrides):
    return load_config(PAPER / "upernet_convnext-t_4xb4-160k_ade20k-512x512.yaml", [
        f"data.root={root}", "data.num_workers=0", "data.crop_size=[32, 32]", "data.scale=[64, 32]",
        "data.test_scale=[64, 32]", "model.encoder.pretrained=null",
        "model.encoder.kwargs={dims: [8, 16, 16, 16], depths: [1, 1, 1, 1]}",
        "model.decode_head.channels=8", "model.auxiliary_head.channels=8", "device=cpu", "train.amp=off",
        "train.iters=2", "train.batch_size=2", "train.val_interval=2", "train.ckpt_interval=2",
        "schedule.warmup_iters=1", "calibration.num_images=2", "calibration.batch_size=2", *overrides])


def test_train_split_carries_valid_and_crops_mmseg_style(tmp_path):
    make_ade(tmp_path)
    cfg = _cfg(tmp_path)
    task = SegTask(cfg)
    assert "valid" in task.dense_keys and task.dense_keys["valid"].resample == "nearest"
    ds = task.build_dataset(cfg, "train")
    s = ds[1]  # 36x30 -> scaled to at most (64, 32)*r: often smaller than the crop, so padded
    assert s["image"].shape == (3, 32, 32) and s["label"].shape == (32, 32) and s["valid"].shape == (1, 32, 32)
    assert s["image"].dtype == torch.uint8
    assert bool((s["label"][~s["valid"][0]] == 255).all())  # padding is ignored in the label
    batch = next(iter(build_loader(ds, 3, train=False)))
    out = task.build_transform(cfg, train=True)(batch)
    assert out["image"].dtype == torch.float32 and "raw_image" in out
    pad = ~out["valid"].expand_as(out["image"])
    assert bool((out["image"][pad] == 0).all())  # mmseg pads the normalized image with 0
    assert bool(out["valid"].all(dim=(1, 2, 3)).logical_not().any())  # some sample was padded (sizes above)


def test_val_split_resizes_the_image_only(tmp_path):
    make_ade(tmp_path)
    cfg = _cfg(tmp_path)
    ds = SegTask(cfg).build_dataset(cfg, "val")
    s = ds[0]  # 30x42: keep-ratio into (64, 32) -> short side 32 limits: 32x45
    assert tuple(s["image"].shape[-2:]) == (32, 45) and tuple(s["label"].shape) == (30, 42)


@pytest.mark.parametrize("eval_overrides", [
    [],
    ["eval.mode=slide", "eval.crop_size=[32, 32]", "eval.stride=[21, 21]", "eval.tta.flip=true"],
    ["eval.mode=whole", "eval.tta.scales=[1.0, 1.5]"],
], ids=["whole", "slide+flip", "multiscale"])
def test_paper_config_trains_and_evaluates_end_to_end(tmp_path, eval_overrides):
    make_ade(tmp_path / "ade")
    cfg = _cfg(tmp_path / "ade", "eval.mode=whole", *eval_overrides)
    metrics = Trainer(cfg, tmp_path / "run", progress=False, log=lambda _m: None).run()
    assert 0.0 <= metrics["mIoU"] <= 100.0 and np.isfinite(metrics["aAcc"])
    history = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(history["iter"]) == [2]
    calib = pd.read_csv(tmp_path / "run" / "calibration.csv")
    assert len(calib) > 0
