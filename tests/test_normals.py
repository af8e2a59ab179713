"""The surface-normal task: metrics against a hand-computed reference, losses, valid mask, flip TTA that negates
x, the rendered rooms (normals agree with the depth), the config section, the task contract and the CLI."""
import configparser
import importlib
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from densefuse_tasks.normals import (
    NormalMetrics,
    NormalsPredictor,
    NormalsTask,
    RandomNormalFlip,
    SyntheticNormals,
    flip_normals,
    normal_loss,
)

import densefuse
from densefuse.cli import main
from densefuse.errors import ConfigError
from densefuse.inference import infer
from densefuse.tasks import task_class


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run faster on one thread than on two threads of a busy machine (conftest restores it)."""
    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
ANGLES = [0.0, 10.0, 20.0, 29.0, 45.0, 90.0]


def rotated(angles_deg, length=1.0):
    """(1,3,1,N) normals turned by each angle from (0, 0, -1) towards +x, scaled by ``length``."""
    a = torch.deg2rad(torch.tensor(angles_deg, dtype=torch.float64))
    n = torch.stack([torch.sin(a), torch.zeros_like(a), -torch.cos(a)]) * length
    return n[None, :, None].float()


def test_metrics_match_a_hand_computed_reference():
    gt = rotated([0.0] * 6)
    pred = rotated(ANGLES, length=3.0)  # lengths do not matter
    # two more pixels that must not count: a zero-length ground truth and one masked out explicitly
    gt_extra = torch.cat([torch.zeros(1, 3, 1, 1), rotated([0.0])], dim=-1)
    pred_extra = rotated([170.0, 120.0])
    m = NormalMetrics()
    m.update(pred[..., :4], gt[..., :4])
    m.update(torch.cat([pred[..., 4:], pred_extra], -1), torch.cat([gt[..., 4:], gt_extra], -1),
             mask=torch.tensor([[[1, 1, 1, 0]]]))
    out = m.compute()
    assert out["mean"] == pytest.approx(sum(ANGLES) / 6, abs=1e-4)  # 32.333
    assert out["median"] == pytest.approx((20 + 29) / 2, abs=0.01)
    assert out["within_11.25"] == pytest.approx(200 / 6)
    assert out["within_22.5"] == pytest.approx(50.0)
    assert out["within_30"] == pytest.approx(400 / 6)
    m.reset()
    m.update(rotated([5.0, 60.0, 7.0]), rotated([0.0, 0.0, 0.0]))  # odd count: the middle value
    assert m.compute()["median"] == pytest.approx(7.0, abs=0.01)
    m.reset()
    assert all(math.isnan(v) for v in m.compute().values())


def test_metrics_from_outputs_and_batch_resize_the_prediction():
    gt = torch.zeros(2, 3, 8, 8)
    gt[:, 2] = -1
    pred = torch.zeros(2, 3, 4, 4)
    pred[:, 0], pred[:, 2] = 1.0, -1.0  # 45 degrees everywhere
    m = NormalMetrics()
    m.update({"out": pred}, {"normal": gt, "image": torch.zeros(2, 3, 8, 8)})
    out = m.compute()
    assert out["mean"] == pytest.approx(45.0, abs=1e-4) and out["within_30"] == 0.0


def test_losses_hand_computed_and_mask():
    gt = torch.cat([rotated([0.0, 0.0]), torch.zeros(1, 3, 1, 1)], -1)  # last pixel: no ground truth
    pred = torch.cat([rotated([0.0, 90.0]), rotated([180.0])], -1).requires_grad_()
    # pixel 1: pred (1,0,0) vs (0,0,-1): |1| + 0 + |0 - (-1)| over 3 components; pixel 0: 0
    assert normal_loss(pred, gt, "l1").item() == pytest.approx((0 + 2 / 3) / 2, rel=1e-5)
    assert normal_loss(pred, gt, "cosine").item() == pytest.approx((0 + 1) / 2, rel=1e-5)
    masked = normal_loss(pred, gt, "cosine", mask=torch.tensor([[[1, 0, 1]]]))
    assert masked.item() == pytest.approx(0.0, abs=1e-6)
    none = normal_loss(pred, torch.zeros_like(gt), "l1")
    assert none.item() == 0.0 and none.requires_grad
    none.backward()
    assert float(pred.grad.abs().sum()) == 0.0


def test_predictor_outputs_unit_normals():
    p = NormalsPredictor(8)
    y = p(torch.randn(2, 8, 5, 6))
    assert y.shape == (2, 3, 5, 6) and torch.allclose(y.norm(dim=1), torch.ones(2, 5, 6), atol=1e-5)


def test_flip_negates_x_and_mirrors_pixels():
    n = torch.nn.functional.normalize(torch.randn(2, 3, 4, 5), dim=1)
    batch = {"image": torch.rand(2, 3, 4, 5), "normal": n}
    out = flip_normals(batch, torch.tensor([True, False]))
    assert torch.equal(out["normal"][0, 0], -n[0, 0].flip(-1)) and torch.equal(out["normal"][0, 1:], n[0, 1:].flip(-1))
    assert torch.equal(out["normal"][1], n[1]) and torch.equal(out["image"][0], batch["image"][0].flip(-1))
    op = RandomNormalFlip(1.0, {"normal": NormalsTask.dense_keys["normal"]})
    params = op.draw(batch)
    assert torch.equal(op.invert(op.apply(batch, params), params)["normal"], n)


def _gradient_normals(model, image):
    """A flip-equivariant 'model': normals tilt along +x where the image brightens to the right."""
    g = image.mean(1, keepdim=True)
    gp = torch.nn.functional.pad(g, (1, 1, 0, 0), mode="replicate")
    gx = (gp[..., 2:] - gp[..., :-2]) / 2
    return torch.nn.functional.normalize(torch.cat([gx, torch.zeros_like(gx), -torch.ones_like(gx)], 1), dim=1)


def test_flip_tta_negates_x_of_the_mirrored_view():
    cfg = densefuse.load_config(NormalsTask.default_config, ["eval.tta.flip=true"])
    task = densefuse.get_task("normals", cfg)
    image = torch.rand(1, 3, 6, 8)

    def forward(model, batch):
        return {"out": model(None, batch["image"])}

    # an equivariant model gives the same normals with and without flip TTA
    plain = _gradient_normals(None, image)
    tta = infer(forward, _gradient_normals, {"image": image}, cfg.eval, merge=task.merge_tta)["out"]
    assert torch.allclose(tta, plain, atol=1e-6)
    # a model that always answers (0.6, 0, -0.8): its mirrored view, mapped back, says (-0.6, 0, -0.8)
    const = torch.tensor([0.6, 0.0, -0.8]).view(1, 3, 1, 1).expand(1, 3, 6, 8)
    tta = infer(forward, lambda m, x: const, {"image": image}, cfg.eval, merge=task.merge_tta)["out"]
    assert torch.allclose(tta, torch.tensor([0.0, 0.0, -1.0]).view(1, 3, 1, 1).expand(1, 3, 6, 8), atol=1e-6)
    without = task.merge_tta([{"out": const}, {"out": const}], flipped=[False, False])["out"]
    assert torch.allclose(without, const)


def test_rendered_normals_are_exact_and_agree_with_the_depth():
    ds = SyntheticNormals(3, size=(48, 64), focal=0.9)
    for i in range(3):
        s = ds.render(i)
        n, depth, label = s["normal"], s["depth"][0].double(), s["label"]
        assert torch.allclose(n.norm(dim=0), torch.ones(48, 64), atol=1e-5)
        assert set(label.unique().tolist()) <= {0, 1, 2} and (depth > 0).all()
        floor = label == 0
        assert torch.allclose(n[:, floor], torch.tensor([[0.0], [-1.0], [0.0]]), atol=1e-6)
        # normals from the back-projected depth (cross product of neighbour differences) on plane interiors
        H, W = 48, 64
        f = 0.9 * W
        v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
        P = torch.stack([(u - (W - 1) / 2) / f * depth, (v - (H - 1) / 2) / f * depth, depth])
        dx, dy = P[:, 1:-1, 2:] - P[:, 1:-1, :-2], P[:, 2:, 1:-1] - P[:, :-2, 1:-1]
        est = torch.nn.functional.normalize(torch.cross(dy, dx, dim=0), dim=0)
        c = n[:, 1:-1, 1:-1]
        same = label[1:-1, 1:-1] != 2  # plane pixels whose four neighbours lie on the same plane
        for nb in (n[:, 1:-1, 2:], n[:, 1:-1, :-2], n[:, 2:, 1:-1], n[:, :-2, 1:-1]):
            same &= (nb - c).abs().amax(0) < 1e-6
        cos = (est * n[:, 1:-1, 1:-1].double()).sum(0)[same]
        assert same.sum() > 500 and float(cos.min()) > 0.999
    assert torch.equal(SyntheticNormals(1, (48, 64)).render(0)["image"], ds.render(0)["image"])  # deterministic


def test_config_section_rules():
    cfg = densefuse.load_config(NormalsTask.default_config, ["normals.loss=cosine"])
    assert cfg.normals.loss == "cosine" and cfg.task == "normals"
    with pytest.raises(ConfigError, match="'normals.loss' must be one of l1, cosine"):
        densefuse.load_config(NormalsTask.default_config, ["normals.loss=huber"])
    with pytest.raises(ConfigError, match="did you mean 'normals.loss'"):
        densefuse.load_config(NormalsTask.default_config, ["normals.los=l1"])
    with pytest.raises(ConfigError, match="model.decode_head.predictor must be 'normals'"):
        densefuse.load_config(NormalsTask.default_config, ["model.decode_head.predictor=cls_seg"])


def test_entry_point_is_declared_and_resolves():
    assert task_class("normals") is NormalsTask  # installed, or registered by conftest from setup.cfg
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = dict(line.split("=", 1) for line in cfg["options.entry_points"]["densefuse.tasks"].strip().splitlines())
    target = lines["normals "].strip() if "normals " in lines else lines["normals"].strip()
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is NormalsTask
    assert "densefuse_tasks.normals" in cfg["options"]["packages"].split()


TINY = ["train.iters=4", "train.batch_size=2", "train.val_interval=4", "train.ckpt_interval=4", "train.log_interval=2",
        "calibration.num_images=4", "calibration.batch_size=2", "model.encoder.name=resnet10t",
        "model.decode_head.channels=16", "data.kwargs.num_train=6", "data.kwargs.num_val=3",
        "data.kwargs.size=[48,64]", "data.crop_size=[48,64]", "eval.batch_size=3", "data.augment.flip=true"]


def test_cli_train_eval_predict(tmp_path):
    wd = tmp_path / "run"
    args = ["train", "--task", "normals", *[a for s in TINY for a in ("--set", s)], "--work-dir", str(wd),
            "--no-progress"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    logged = pd.read_csv(wd / "metrics.csv").iloc[-1]
    assert 0 < logged["mean"] < 180 and 0 <= logged["within_11.25"] <= logged["within_30"] <= 100  # dotted names kept
    out = tmp_path / "eval.csv"
    res = CliRunner().invoke(main, ["eval", "--checkpoint", str(wd / "final.pth"), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(out).iloc[0]["mean"] == pytest.approx(logged["mean"], rel=1e-5)
    from PIL import Image

    src = tmp_path / "room.png"
    Image.fromarray(SyntheticNormals(1, (48, 64), split="test").render(0)["image"].permute(1, 2, 0).numpy()).save(src)
    res = CliRunner().invoke(main, ["predict", str(src), "--checkpoint", str(wd / "final.pth"),
                                    "--out", str(tmp_path / "pred")])
    assert res.exit_code == 0, res.output
    normals = np.load(tmp_path / "pred" / "room.npy")
    assert normals.shape == (3, 48, 64) and np.allclose(np.linalg.norm(normals, axis=0), 1, atol=1e-4)
    assert np.asarray(Image.open(tmp_path / "pred" / "room.png")).shape == (48, 64, 3)


def test_cli_bad_loss_is_one_line(tmp_path):
    res = CliRunner().invoke(main, ["train", "--task", "normals", "--set", "normals.loss=huber",
                                    "--work-dir", str(tmp_path / "x")])
    assert res.exit_code == 2 and "normals.loss" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


def test_visualize_shows_prediction_over_ground_truth_without_invalid_pixels():
    gt = torch.nn.functional.normalize(torch.randn(2, 3, 8, 8), dim=1)
    gt[0, :, 0, 0] = 0  # no ground truth
    mask = torch.ones(2, 1, 8, 8)
    mask[1, 0, 1, 1] = 0  # masked out
    pic = NormalsTask({}).visualize({"image": torch.zeros(2, 3, 8, 8), "normal": gt, "normal_mask": mask}, gt)
    assert pic.shape == (2, 3, 16, 8) and pic.dtype == torch.uint8
    assert pic[0, :, 8, 0].tolist() == [0, 0, 0] and pic[1, :, 9, 1].tolist() == [0, 0, 0]
    assert torch.equal(pic[1, :, 9, 2], ((gt[1, :, 1, 2] + 1) * 127.5).round().to(torch.uint8))
