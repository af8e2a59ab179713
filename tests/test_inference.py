"""Whole / slide inference and flip / multi-scale TTA (densefuse.inference)."""
import pytest
import torch
from torch import nn

from densefuse import ConfigError
from densefuse.inference import MMSEG_TTA_SCALES, infer, slide_windows, softmax_mean_merge


def forward(model, batch):
    return {"out": model(batch["image"])}


def _conv_model(k=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 5, k, padding=k // 2), nn.ReLU(), nn.Conv2d(5, 4, 1)).eval()


def test_slide_with_a_window_covering_the_image_equals_whole():
    model = _conv_model()
    batch = {"image": torch.randn(2, 3, 37, 53)}
    whole = infer(forward, model, batch, {"mode": "whole"})["out"]
    slide = infer(forward, model, batch, {"mode": "slide", "crop_size": [64, 64], "stride": [32, 32]})["out"]
    assert torch.equal(whole, slide)


def test_overlapping_windows_are_averaged_by_count():
    calls = []

    def fwd(model, batch):
        calls.append(batch["image"].shape)
        # each window answers with its own input plus a constant: the average over windows is input + 1
        return {"out": batch["image"][:, :2] + 1.0}

    batch = {"image": torch.randn(1, 3, 40, 70)}
    out = infer(fwd, nn.Identity(), batch, {"mode": "slide", "crop_size": [24, 24], "stride": [16, 16],
                                             "slide_batch": 4})["out"]
    torch.testing.assert_close(out, batch["image"][:, :2] + 1.0)
    wins = slide_windows(40, 70, (24, 24), (16, 16))
    assert len(wins) == 2 * 4  # mmseg: max(H - crop + stride - 1, 0) // stride + 1 per axis
    assert sum(c[0] for c in calls) == len(wins)  # every window once, batched 4 at a time
    assert max(c[0] for c in calls) == 4


def test_window_sums_divided_by_coverage():
    def ones(model, batch):
        return {"out": torch.ones_like(batch["image"][:, :1])}

    out = infer(ones, nn.Identity(), {"image": torch.zeros(1, 3, 30, 30)},
                {"mode": "slide", "crop_size": [20, 20], "stride": [10, 10]})["out"]
    assert torch.equal(out, torch.ones(1, 1, 30, 30))


def test_slide_windows_match_mmseg_grid_at_cityscapes_size():
    wins = slide_windows(1024, 2048, (512, 512), (341, 341))
    assert len(wins) == 3 * 6
    assert wins[-1] == (512, 1024, 1536, 2048)  # last window flush with the border
    assert all(y2 - y1 == 512 and x2 - x1 == 512 for y1, y2, x1, x2 in wins)


def test_slide_crops_every_per_pixel_key():
    def fwd(model, batch):
        assert batch["ground"].shape[-2:] == batch["image"].shape[-2:]
        return {"out": batch["image"] * batch["ground"]}

    batch = {"image": torch.randn(1, 3, 30, 50), "ground": torch.rand(1, 1, 30, 50), "name": ["a"]}
    out = infer(fwd, nn.Identity(), batch, {"mode": "slide", "crop_size": [16, 16], "stride": [8, 8]})["out"]
    torch.testing.assert_close(out, batch["image"] * batch["ground"])


def test_flip_tta_of_a_flip_equivariant_model_equals_no_tta():
    model = _conv_model(k=1)  # pointwise: flip-equivariant
    batch = {"image": torch.randn(2, 3, 16, 24)}
    plain = infer(forward, model, batch, {})["out"]
    flipped = infer(forward, model, batch, {"tta": {"flip": True}})["out"]
    torch.testing.assert_close(plain, flipped)


def test_multi_scale_flip_tta_runs_twelve_views_and_merges_at_input_size():
    seen, merged = [], []

    def fwd(model, batch):
        seen.append(tuple(batch["image"].shape[-2:]))
        return {"out": torch.zeros(batch["image"].shape[0], 3, *batch["image"].shape[-2:])}

    def merge(outputs, flipped):
        merged.append(list(flipped))
        assert all(o.shape[-2:] == (40, 60) for o in outputs)
        return softmax_mean_merge(outputs, flipped)

    out = infer(fwd, nn.Identity(), {"image": torch.randn(1, 3, 40, 60)},
                {"tta": {"flip": True, "scales": list(MMSEG_TTA_SCALES)}}, merge=merge, out_size=(80, 120))["out"]
    assert merged == [[False, True] * 6]  # twelve views: each scale plain, then mirrored
    assert (20, 30) in seen and (70, 105) in seen  # 0.5x and 1.75x views
    assert out.shape == (1, 3, 80, 120)
    torch.testing.assert_close(out, torch.full_like(out, 1 / 3))


@pytest.mark.parametrize("cfg, match", [
    ({"mode": "sliding"}, "'eval.mode' must be one of whole, slide, got str 'sliding'"),
    ({"mode": "slide"}, "needs eval.crop_size and eval.stride"),
    ({"mode": "slide", "crop_size": [16, 16], "stride": [32, 32]}, "would skip pixels"),
    ({"mode": "slide", "crop_size": 16, "stride": 8}, "'eval.crop_size' must be a list of 2 ints >= 1 or null"),
    ({"tta": {"scale": [1.0]}}, "unknown config key 'eval.tta.scale'"),
    ({"tta": {"scales": [0, 1]}}, r"'eval.tta.scales' must be a list of numbers > 0 or null, got list \[0, 1\]"),
])
def test_bad_eval_config(cfg, match):
    with pytest.raises(ConfigError, match=match):
        infer(forward, nn.Identity(), {"image": torch.zeros(1, 3, 8, 8)}, cfg)


def test_flip_tta_flips_every_dense_key_and_unflips_the_output():
    seen = []

    def fwd(model, batch):
        seen.append((batch["image"].clone(), batch["ground"].clone()))
        # an output that depends on the ground map's position: only a consistently flipped ground gives
        # back the same output after un-flipping
        return {"out": batch["image"][:, :1] * batch["ground"]}

    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(1, 3, 6, 9, generator=g), "ground": torch.rand(1, 1, 6, 9, generator=g)}
    out = infer(fwd, nn.Identity(), batch, {"tta": {"flip": True}})["out"]
    torch.testing.assert_close(out, batch["image"][:, :1] * batch["ground"])
    assert torch.equal(seen[1][1], batch["ground"].flip(-1)) and torch.equal(seen[1][0], batch["image"].flip(-1))


def test_a_task_merge_returning_outputs_and_the_label_size():
    from densefuse_tasks.seg import SegTask

    model = _conv_model()
    batch = {"image": torch.randn(1, 3, 16, 24)}
    tta = {"tta": {"flip": True, "scales": [1.0, 1.5]}}
    small = infer(forward, model, batch, tta, merge=SegTask({}).merge_tta, out_size=(12, 18))["out"]
    assert small.shape == (1, 4, 12, 18)
    out = infer(forward, model, batch, tta, merge=SegTask({}).merge_tta)["out"]
    probs = out.exp().sum(1)  # log of the mean softmax probability
    torch.testing.assert_close(probs, torch.ones_like(probs))


def test_evaluation_uses_the_eval_config_and_the_label_size():
    from densefuse.engine.evaluate import infer_outputs

    class Task:
        cfg = {"eval": {"mode": "slide", "crop_size": [8, 8], "stride": [4, 4]}, "model": {}}

        def forward(self, model, batch):
            return {"out": model(batch["image"]), "aux": model(batch["image"])}

        def merge_tta(self, outputs, flipped):
            return {"out": torch.stack([o["out"] for o in outputs]).mean(0)}

    model = _conv_model()
    batch = {"image": torch.randn(1, 3, 16, 20), "label": torch.zeros(1, 10, 13, dtype=torch.long)}
    out = infer_outputs(model, Task(), batch)
    assert set(out) == {"out"} and out["out"].shape == (1, 4, 10, 13)
    Task.cfg = {"eval": {"mode": "whole"}}
    plain = infer_outputs(model, Task(), {"image": batch["image"], "label": torch.zeros(1, 16, 20)})
    assert set(plain) == {"out", "aux"}  # nothing asked: the task's own outputs, untouched
