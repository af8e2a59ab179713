"""mmseg-faithful segmentation geometry (densefuse_tasks.seg.pipeline) against mmseg's semantics."""
import pytest
import torch
import torch.nn.functional as F
from densefuse_tasks.seg.pipeline import (
    SegTestPipeline,
    SegTrainPipeline,
    build_test_pipeline,
    build_train_pipeline,
    keep_ratio_size,
    zero_padding,
)

from densefuse import ConfigError
from densefuse.data.ops import Draw, nearest_index, resize_tensor


def resize_crop_image(image, size, box=None):
    """The seg pipeline's image resize: bilinear in the cv2 style (uint8 fixed point), then the box."""
    return resize_tensor(image, size, "bilinear", "cv2", box).contiguous()


def resize_crop_label(label, size, box=None):
    """The seg pipeline's label resize: cv2's nearest, gathering only the box."""
    return resize_tensor(label, size, "nearest", "cv2", box)


def _sample(h, w, num_classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, num_classes, (h // 8 + 1, w // 8 + 1), generator=g)
    label = label.repeat_interleave(8, 0).repeat_interleave(8, 1)[:h, :w].clone()
    label[:4] = 255
    image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return {"image": image, "label": label, "name": "x"}


def test_keep_ratio_size_as_mmcv():
    assert keep_ratio_size(375, 500, (2048, 512)) == (512, 683)  # VOC: factor 1.365
    assert keep_ratio_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert keep_ratio_size(512, 683, (1024, 256)) == (256, 342)


def test_box_resampling_equals_resize_then_crop():
    s = _sample(61, 90)
    size, box = (113, 151), (20, 84, 33, 140)
    full = F.interpolate(s["image"][None].float(), size=size, mode="bilinear", align_corners=False)[0]
    ref = full.round().clamp(0, 255).to(torch.uint8)[:, 20:84, 33:140]
    out = resize_crop_image(s["image"], size, box)
    assert (out.int() - ref.int()).abs().max() <= 1
    assert (out == ref).float().mean() > 0.6  # uint8 fixed point (as cv2) vs float rounding
    ref_lab = F.interpolate(s["label"][None, None].float(), size=size, mode="nearest")[0, 0].long()[20:84, 33:140]
    assert torch.equal(resize_crop_label(s["label"], size, box), ref_lab)


def test_no_padding_when_the_resized_image_covers_the_crop():
    pipe = SegTrainPipeline((512, 1024), scale=(2048, 1024), generator=torch.Generator().manual_seed(0))
    label = torch.zeros(1024, 2048, dtype=torch.long)
    for _ in range(10):
        geo = pipe.draw(label)
        assert not geo.padded
        assert 0.5 <= geo.scale <= 2.0


def test_scale_follows_reference_scale_and_ratio_range():
    g = torch.Generator().manual_seed(0)
    pipe = SegTrainPipeline((512, 512), scale=(2048, 512), cat_max_ratio=1.0, generator=g)
    voc = torch.zeros(375, 500, dtype=torch.long)
    scales = torch.tensor([pipe.draw(voc).scale for _ in range(300)])
    # mmseg: r ~ U(0.5, 2), short side bound 512 r -> factor 512 r / 375 in [0.68, 2.73]
    assert scales.min() >= 0.5 * 512 / 375 - 0.01 and scales.max() <= 2.0 * 512 / 375 + 0.01
    assert scales.mean() == pytest.approx(1.25 * 512 / 375, rel=0.06)
    padded = sum(pipe.draw(voc).padded for _ in range(300)) / 300
    assert 0.2 < padded < 0.45  # mmseg: about one third of VOC crops are padded


def test_cat_max_ratio_redraws_dominated_crops():
    label = torch.zeros(256, 256, dtype=torch.long)
    label[:, 100:150] = 1  # only crops overlapping the band hold two classes
    def dominated_rate(cat):
        pipe = SegTrainPipeline((64, 64), scale=(256, 256), ratio_range=None, cat_max_ratio=cat,
                                generator=torch.Generator().manual_seed(1))
        n = 0
        for _ in range(200):
            crop = resize_crop_label(label, *(lambda g: (g.size, g.box))(pipe.draw(label)))
            counts = torch.bincount(crop.flatten(), minlength=2).float()
            n += bool(counts.max() / counts.sum() >= 0.75)
        return n / 200
    without, with_ = dominated_rate(1.0), dominated_rate(0.75)
    assert without > 0.6
    assert with_ < 0.1 < without / 4


def test_ignored_pixels_do_not_count_in_the_ratio():
    label = torch.full((64, 64), 255, dtype=torch.long)
    label[:, :8] = 0
    label[:, 8:12] = 1  # 2 classes: 0 has 2/3 of the non-ignored pixels (< 0.75) -> accepted at once
    pipe = SegTrainPipeline((64, 64), scale=(64, 64), ratio_range=None, generator=torch.Generator().manual_seed(0))
    calls = []
    orig = pipe._box
    pipe._box = lambda size: calls.append(1) or orig(size)
    pipe.draw(label)
    assert len(calls) == 1


def test_label_values_untouched_flip_consistent_and_padding():
    s = _sample(100, 150)
    s["image"][0] = (s["label"] % 256).to(torch.uint8)  # channel 0 carries the label: geometry must agree
    pipe = SegTrainPipeline((128, 160), scale=(150, 100), ratio_range=None, cat_max_ratio=1.0, flip_prob=1.0,
                            generator=torch.Generator().manual_seed(0))
    out = pipe(s)
    assert out["image"].shape == (3, 128, 160) and out["image"].dtype == torch.uint8
    assert out["label"].shape == (128, 160)
    v = out["valid"][0]
    assert v.sum() == 100 * 150 and v[:100, :150].all()
    assert set(out["label"].unique().tolist()) <= set(s["label"].unique().tolist()) | {255}
    assert (out["label"][~v] == 255).all()
    assert (out["image"][:, ~v] == torch.tensor([124, 116, 104])[:, None]).all()
    assert torch.equal(out["label"][:100, :150], s["label"].flip(-1))
    assert torch.equal(out["image"][0, :100, :150].long(), s["label"].flip(-1) % 256)


def test_photometric_on_the_worker_keeps_uint8_and_geometry():
    s = _sample(64, 64)
    out = SegTrainPipeline((32, 32), scale=(64, 64), photometric=True,
                           generator=torch.Generator().manual_seed(0))(s)
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (3, 32, 32)


def test_photometric_saturation_matches_hsv_scaling(monkeypatch):
    from densefuse_tasks.seg import pipeline
    from kornia.color import hsv_to_rgb, rgb_to_hsv

    img = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    # coins: no brightness, contrast first but skipped, saturation on, hue off
    coins = iter([False, True, False, True, False])
    monkeypatch.setattr(Draw, "coin", lambda self, p=0.5: next(coins))
    out = pipeline.photometric_distortion(img, gen, saturation_range=(0.7, 0.7))
    hsv = rgb_to_hsv(img[None].float() / 255)
    hsv[:, 1] *= 0.7
    ref = (hsv_to_rgb(hsv)[0] * 255 + 1e-3).floor()
    assert (out.float() - ref).abs().max() <= 1


def test_zero_padding_after_normalization():
    batch = {"image": torch.ones(2, 3, 4, 4), "valid": torch.zeros(2, 1, 4, 4, dtype=torch.bool)}
    batch["valid"][:, :, :2] = True
    out = zero_padding(batch)
    assert out["image"][:, :, :2].eq(1).all() and out["image"][:, :, 2:].eq(0).all()


def test_test_pipeline_resizes_the_image_only():
    s = _sample(375, 500)
    out = SegTestPipeline((2048, 512))(s)
    assert out["image"].shape == (3, 512, 683)
    assert torch.equal(out["label"], s["label"])
    assert out["ori_size"].tolist() == [375, 500]


def test_build_from_config_uses_the_dataset_scales():
    from densefuse.config import from_dict

    def cfg(**data):
        return from_dict({"data": {"type": "cityscapes", "root": "cs", "crop_size": [512, 1024], "pipeline": "mmseg",
                                   "augment": {"flip": True, "photometric": True}, **data},
                          "model": {"num_classes": 19}})

    train = build_train_pipeline(cfg(), photometric=False)
    assert train.scale == (2048, 1024) and train.cat_max_ratio == 0.75 and train.photometric is False
    assert train.pad_fill == (124, 116, 104)
    assert build_test_pipeline(cfg()).scale == (2048, 1024)
    assert build_test_pipeline(cfg(test_scale=[])).scale is None
    # the values are checked once, when the config is loaded, never again by the builders
    with pytest.raises(ConfigError, match="'data.cat_max_ratio' must be number > 0 <= 1, got int 0"):
        cfg(cat_max_ratio=0)
    with pytest.raises(ConfigError, match="data.test_scale must be"):
        cfg(test_scale=[512])


def test_hue_shift_equals_kornias_hsv_round_trip():
    import math

    from densefuse_tasks.seg.pipeline import _trunc, hue_shift
    from kornia.color import hsv_to_rgb, rgb_to_hsv

    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (3, 64, 64), generator=g).float()
    x[:, :8] = 77.0  # grey: no hue
    x[0, 8:16] = x[1, 8:16]  # R == G ties
    cache = {}
    for d in (-18, -7, 0, 5, 18):  # OpenCV hue units (2 degrees)
        hsv = rgb_to_hsv(x[None] / 255.0)
        hsv[:, 0] = torch.remainder(hsv[:, 0] + d * 2 * math.pi / 180, 2 * math.pi)
        ref = (hsv_to_rgb(hsv)[0] * 255 + 1e-3).clamp(0, 255).floor()
        got = _trunc(hue_shift(x.clone(), d / 30, cache).add_(1e-3))
        assert (got - ref).abs().max() <= 1
        assert (got == ref).float().mean() > 0.999
    assert torch.equal(_trunc(hue_shift(x.clone(), 0.0).add_(1e-3)), x)


def test_nearest_label_crop_equals_torch_nearest_for_many_sizes():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 256, (37, 53), generator=g, dtype=torch.uint8)
    for size in ((37, 53), (74, 106), (19, 27), (100, 61), (511, 683), (38, 52)):
        ref = F.interpolate(label[None, None], size=size, mode="nearest")[0, 0]
        assert torch.equal(resize_crop_label(label, size), ref)
        assert torch.equal(resize_crop_label(label.long(), size, (3, size[0] - 2, 5, size[1] - 1)),
                           ref[3:size[0] - 2, 5:size[1] - 1].long())
    assert nearest_index(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_resize_buffer_is_reused_but_outputs_never_alias_it():
    # two samples in a row through one pipeline: the second must not overwrite the first's pixels
    pipe = SegTrainPipeline((32, 32), scale=(96, 64), ratio_range=None, cat_max_ratio=1.0, flip_prob=0.0,
                            generator=torch.Generator().manual_seed(0))
    a, b = _sample(40, 60, seed=1), _sample(40, 60, seed=2)
    out_a = pipe(a)
    kept = out_a["image"].clone()
    pipe(b)
    assert torch.equal(out_a["image"], kept)
    assert "resized" in pipe._scratch
    geo = pipe.draw(a["label"])
    ref = resize_crop_image(a["image"], geo.size, geo.box)  # no buffer
    assert torch.equal(pipe.apply(a, geo)["image"], ref)


def test_photometric_with_a_cache_equals_without():
    from densefuse_tasks.seg.pipeline import photometric_distortion

    img = torch.randint(0, 256, (3, 24, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    cache = {}
    for seed in range(12):  # enough seeds for every coin combination to fire
        a = photometric_distortion(img, torch.Generator().manual_seed(seed), cache=cache)
        b = photometric_distortion(img, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
    pickled = __import__("pickle").loads(__import__("pickle").dumps(SegTrainPipeline((8, 8))))
    assert pickled._scratch == {}
