"""The seg task's side of prediction: protocol attributes, TTA merge, palette PNGs, pictures with a legend."""
import numpy as np
import pytest
import torch
from densefuse_tasks.seg import SegTask
from densefuse_tasks.seg.palettes import palette_for
from densefuse_tasks.seg.visualize import palette_png
from PIL import Image

from densefuse.config import from_dict
from densefuse.data import RandomHorizontalFlip
from densefuse.errors import ConfigError
from densefuse.tasks import DenseKey, task_class


def seg_cfg(**data):
    return from_dict({"task": "seg", "model": {"num_classes": 6}, "data": {"type": "synthetic", **data}})


def test_seg_task_declares_the_protocol():
    cls = task_class("seg")
    assert cls is SegTask
    assert cls.primary_metric == "mIoU" and cls.metric_direction == "max"
    # "valid" (False on padding) comes with the mmseg pipeline and keeps padding out of calibration
    assert cls.dense_keys == {"label": DenseKey("nearest", 255.0), "valid": DenseKey("nearest", 0.0)}
    task = SegTask(seg_cfg())
    assert task.is_better(50.0, 40.0) and not task.is_better(30.0, 40.0)
    # the task's own section is part of the checked config
    cfg = from_dict({"task": "seg", "model": {"num_classes": 2}, "seg": {"avg_non_ignore": True}})
    assert cfg["seg"] == {"avg_non_ignore": True, "overlay_alpha": 0.5}
    assert SegTask(cfg)._loss.avg_non_ignore is True
    with pytest.raises(ConfigError, match="seg.avg_non_ignroe"):
        from_dict({"task": "seg", "model": {"num_classes": 2}, "seg": {"avg_non_ignroe": True}})


@pytest.mark.parametrize("change, message", [
    ({"data": {"crop_size": [64]}}, "data.crop_size"),
    ({"data": {"crop_size": [64, 0]}}, "data.crop_size"),
    ({"data": {"std": [1.0, 0.0, 1.0]}}, "data.std"),
    ({"data": {"mean": [1.0, 2.0]}}, "data.mean"),
    ({"model": {"num_classes": 1}}, "model.num_classes"),
    ({"seg": {"overlay_alpha": -0.1}}, "seg.overlay_alpha"),
])
def test_validate_config_names_the_key(change, message):
    # the core schema (sizes, colours) and SegTask.validate_config (classes, its own section) both run at load
    with pytest.raises(ConfigError, match=message):
        from_dict({"task": "seg", "model": {"num_classes": 6}, **change})


def test_merge_tta_averages_probabilities_of_flipped_back_views():
    task = SegTask(seg_cfg())
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 6, 8, 10, generator=g), torch.randn(2, 6, 8, 10, generator=g)
    merged = task.merge_tta([{"out": a}, b], [False, True])["out"]
    want = (a.softmax(1) + b.softmax(1)) / 2
    assert torch.allclose(merged.softmax(1), want, atol=1e-6)  # log-probabilities: still logits
    assert torch.equal(task.predict(merged), want.argmax(1))
    # a flip-equivariant model: the flipped view, flipped back, is the same; merging changes nothing
    flip = RandomHorizontalFlip(1.0, keys={})
    p = flip.draw({"image": a})
    view = flip.invert({"image": flip.apply({"image": a}, p)["image"]}, p)["image"]
    assert torch.allclose(task.merge_tta([a, view], [False, True])["out"].softmax(1), a.softmax(1), atol=1e-6)
    # rescaled views are resized to the first view's size
    small = torch.randn(2, 6, 4, 5, generator=g)
    assert task.merge_tta([a, small], [False, False])["out"].shape == (2, 6, 8, 10)
    assert task.merge_tta([small, a], [False, False])["out"].shape == (2, 6, 4, 5)
    with pytest.raises(ValueError):
        task.merge_tta([], [])


def test_save_prediction_writes_a_palette_png_with_the_class_ids(tmp_path):
    task = SegTask(seg_cfg())
    pred = torch.randint(0, 6, (12, 16))
    pred[0, :4] = 255  # ignored pixels stay 255
    image = torch.randint(0, 256, (3, 12, 16), dtype=torch.uint8)
    paths = task.save_prediction(pred, tmp_path / "x", image=image)
    assert [p.name for p in paths] == ["x.png", "x_vis.png"]
    png = Image.open(paths[0])
    assert png.mode == "P" and np.array_equal(np.asarray(png), pred.numpy())
    pal = np.asarray(png.getpalette()).reshape(-1, 3)
    assert pal[:6].tolist() == [list(c) for c in palette_for(6, "synthetic")] and pal[255].tolist() == [0, 0, 0]
    vis = np.asarray(Image.open(paths[1]))
    assert vis.shape[1] == 16 and vis.shape[0] > 12 and vis.shape[2] == 3
    # logits are accepted too; without an image only the class map is written
    assert task.save_prediction(torch.randn(6, 12, 16), tmp_path / "y") == [tmp_path / "y.png"]
    with pytest.raises(ValueError, match="0..255"):
        palette_png(torch.full((2, 2), 300), palette_for(6))


def test_visualize_stacks_prediction_ground_truth_and_legend():
    task = SegTask(seg_cfg())
    raw = torch.randint(0, 256, (2, 3, 24, 120), dtype=torch.uint8)
    pred = torch.zeros(2, 24, 120, dtype=torch.long)
    pred[:, :, 60:] = 1
    label = torch.full((2, 24, 120), 2)
    label[:, 0] = 255
    pic = task.visualize({"raw_image": raw, "image": raw.float(), "label": label}, pred)
    assert pic.dtype == torch.uint8 and pic.shape[:2] == (2, 3) and pic.shape[-1] == 120
    legend_h = pic.shape[2] - 48
    assert legend_h > 0
    # row 1 blends the prediction colours, row 2 the ground truth's; ignored pixels show the image
    pal = torch.tensor(palette_for(6, "synthetic"), dtype=torch.float32)
    want = (raw[0, :, 5, 70].float() * 0.5 + pal[1] * 0.5).round()
    assert torch.equal(pic[0, :, 5, 70].float(), want)
    assert torch.equal(pic[0, :, 24, 3], raw[0, :, 0, 3])
    assert torch.equal(pic[0, :, 30, 3].float(), (raw[0, :, 6, 3].float() * 0.5 + pal[2] * 0.5).round())
    # the legend strip shows the swatches of the classes present (0, 1, 2) and is white elsewhere
    strip = pic[0, :, 48:]
    colours = {tuple(c) for c in strip.reshape(3, -1).T.tolist()}
    assert {tuple(int(v) for v in pal[k]) for k in (0, 1, 2)} <= colours
    assert tuple(int(v) for v in pal[3]) not in colours
    no_label = task.visualize({"raw_image": raw, "image": raw.float()}, pred)
    assert no_label.shape[2] == 24 + legend_h  # the legend's height depends on the width and class count only
    other = task.visualize({"raw_image": raw, "image": raw.float()}, torch.full_like(pred, 4))
    assert other.shape == no_label.shape


def test_legend_has_a_fixed_number_of_slots():
    from densefuse_tasks.seg.visualize import legend

    pal, names = palette_for(30), [f"c{i}" for i in range(30)]
    few = legend([0, 1], names, pal, 240, slots=6)
    many = legend(list(range(20)), names, pal, 240, slots=6)
    assert few.shape == many.shape == (3, 3 * 14 + 2, 240)  # two entries per row, three rows
    colours = {tuple(c) for c in many.reshape(3, -1).T.tolist()}
    assert {tuple(pal[k]) for k in range(5)} <= colours and tuple(pal[5]) not in colours  # 5 swatches + "+15 more"
