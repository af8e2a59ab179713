"""The composite multi-task task ``--task mtl``: calibration over every decoder, samples without a label,
exact resume with learned weights, train / predict / compare through the CLI, and its one-line errors."""
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from densefuse_tasks.mtl import MTLTask

import densefuse
from densefuse.cli import main
from densefuse.data.loader import build_loader
from densefuse.encoders import TimmEncoder
from densefuse.engine import Trainer, load_checkpoint
from densefuse.engine.step import TrainStep

#: a small encoder and images, a few iterations: every test here trains or builds in seconds
TINY = ["model.encoder.name=resnet10t", "data.crop_size=[32, 48]", "data.kwargs.size=[32, 48]",
        "data.kwargs.num_train=8", "data.kwargs.num_val=2", "train.batch_size=2", "eval.batch_size=2",
        "train.iters=4", "train.val_interval=2", "train.ckpt_interval=2", "train.log_interval=1",
        "calibration.num_images=2", "calibration.batch_size=2", "schedule.warmup_iters=0",
        "mtl.heads.seg.channels=8", "mtl.heads.depth.channels=8", "mtl.heads.normals.channels=8"]


#: for tests of what the model's outputs go through (calibration is tested on its own)
OFF = "model.equalizer.mode=off"


def tiny_cfg(*overrides):
    return densefuse.load_config("mtl/synthetic_hrnet_r18", [*TINY, *overrides])


def batch_of(task, cfg, n=4, split="train", train=False):
    data = task.build_dataset(cfg, cfg.data[f"{split}_split"])
    loader = build_loader(data, n, train=True, num_workers=0, seed=0)
    return task.build_transform(cfg, train=train)(next(iter(loader)))


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def sets(*overrides):
    return [x for o in overrides for x in ("--set", o)]


# ------------------------------------------------------------------ model and calibration
def test_one_encoder_a_head_per_task_and_every_branch_of_every_decoder_calibrated():
    cfg = tiny_cfg()
    task = densefuse.get_task("mtl", cfg)
    model = task.build_model(cfg)
    assert list(model.decoders) == ["seg", "depth", "normals"] and hasattr(model, "encoder")
    assert sum(isinstance(m, TimmEncoder) for m in model.modules()) == 1
    batches = [batch_of(task, cfg, n=4)]
    densefuse.calibrate(model, batches, forward=task.forward)
    live = densefuse.measure(model, batches, forward=task.forward)  # what enters each fusion conv in the forward
    assert set(live["site"]) == {"decoders.seg.fusion", "decoders.depth.fusion", "decoders.normals.fusion"}
    assert len(live) == 12  # four encoder levels per decoder
    assert (live["mean_after"].abs() < 0.05).all(), live[["site", "branch", "mean_after"]]
    assert ((live["var_after"] - 1).abs() < 0.05).all(), live[["site", "branch", "var_after"]]


def test_outputs_split_per_task_and_normals_are_unit_vectors():
    cfg = tiny_cfg(OFF)
    task = densefuse.get_task("mtl", cfg)
    model = task.build_model(cfg).eval()
    batch = batch_of(task, cfg, n=2)
    with torch.no_grad():
        parts = task.split(task.forward(model, batch))
    assert {t: p.shape[1] for t, p in parts.items()} == {"seg": 3, "depth": 1, "normals": 3}
    assert torch.allclose(parts["normals"].norm(dim=1), torch.ones(1), atol=1e-4)
    assert (parts["depth"] > 0).all()
    pred = task.predict({"out": torch.cat(list(parts.values()), 1)})
    assert pred.shape == (2, 5, 32, 48)
    seg = task.split_prediction(pred)["seg"]
    assert seg.dtype == torch.int64 and torch.equal(seg, parts["seg"].argmax(1))


# ------------------------------------------------------------------ samples without a label
def test_a_sample_without_depth_label_adds_no_depth_loss_and_no_depth_metric():
    cfg = tiny_cfg(OFF)
    task = densefuse.get_task("mtl", cfg)
    model = task.build_model(cfg).train()
    batch = batch_of(task, cfg, n=2)
    out = task.forward(model, batch)["out"].detach().requires_grad_(True)
    no_depth = {**batch, "has_depth": torch.tensor([True, False])}
    loss, logs = task.loss({"out": out}, no_depth)
    # the depth loss is the depth task's loss on sample 0 alone
    depth_task = task.subtask("depth")
    alone, _ = depth_task.loss({"out": out[:1, 3:4]}, {k: v[:1] for k, v in batch.items()})
    assert logs["loss_depth"] == pytest.approx(float(alone.detach()), rel=1e-6)
    loss.backward()
    assert out.grad[1, 3].abs().max() == 0  # sample 1's depth channel gets no gradient
    assert out.grad[1, :3].abs().max() > 0 and out.grad[0, 3].abs().max() > 0
    # an all-invalid depth map counts as no label too; a batch without any depth label has no depth loss
    blank = {**batch, "depth": torch.zeros_like(batch["depth"])}
    _, logs = task.loss({"out": out}, blank)
    assert "loss_depth" not in logs and "weight_depth" not in logs and "loss_seg" in logs
    # the metric skips the sample: depth metrics from sample 0 alone
    metric = task.metric(cfg)
    metric.update({"out": out.detach()}, no_depth)
    single = depth_task.metric(depth_task.cfg)
    single.update({"out": out.detach()[:1, 3:4]}, {"depth": batch["depth"][:1]})
    got, want = metric.compute(), single.compute()
    assert got["depth/abs_rel"] == pytest.approx(want["abs_rel"])


def test_synthetic_drop_marks_samples_and_training_skips_them():
    cfg = tiny_cfg("data.kwargs.drop={depth: 0.5}")
    task = densefuse.get_task("mtl", cfg)
    data = task.build_dataset(cfg, "train")
    flags = [bool(data[i]["has_depth"]) for i in range(len(data))]
    assert True in flags and False in flags
    assert all(float(data[i]["depth"].abs().sum()) == 0 for i, f in enumerate(flags) if not f)


# ------------------------------------------------------------------ weighting, checkpoint, exact resume
class _Cut(Exception):
    pass


@pytest.mark.slow  # three short training runs
def test_resume_of_an_uncertainty_weighted_run_is_exact(tmp_path, monkeypatch):
    cfg = tiny_cfg("mtl.weighting=uncertainty", "train.iters=6")
    ref = tmp_path / "ref"
    Trainer(cfg, ref, progress=False, log=lambda _m: None).run()
    original = TrainStep.__call__

    def cut_at_4(self, batches, iteration):
        if iteration == 4:
            raise _Cut()
        return original(self, batches, iteration)

    cut = tmp_path / "cut"
    monkeypatch.setattr(TrainStep, "__call__", cut_at_4)
    with pytest.raises(_Cut):
        Trainer(cfg, cut, progress=False, log=lambda _m: None).run()
    monkeypatch.setattr(TrainStep, "__call__", original)
    assert load_checkpoint(cut / "latest.pth")["iter"] == 4
    Trainer(cfg, cut, resume=True, progress=False, log=lambda _m: None).run()
    a, b = load_checkpoint(ref / "final.pth")["model"], load_checkpoint(cut / "final.pth")["model"]
    assert a.keys() == b.keys() and "loss_weighting.log_vars" in a
    assert a["loss_weighting.log_vars"].abs().max() > 0  # the weights were learned ...
    for k in a:
        assert torch.equal(a[k], b[k]), k  # ... and the resumed run ends bit-identical, weights included
    log = pd.read_csv(ref / "metrics.csv")
    for t in ("seg", "depth", "normals"):  # per-task losses and weights in the training log
        assert {f"loss_{t}", f"weight_{t}"} <= set(log.columns)
    assert {"seg/mIoU", "depth/abs_rel", "normals/mean"} <= set(log.columns)


def test_dwa_history_is_in_the_model_state():
    cfg = tiny_cfg(OFF, "mtl.weighting=dwa", "mtl.dwa_interval=1")
    task = densefuse.get_task("mtl", cfg)
    model = task.build_model(cfg).train()
    batch = batch_of(task, cfg, n=2)
    for _ in range(3):
        task.loss(task.forward(model, batch), batch)
    state = model.state_dict()
    assert int(state["loss_weighting.closed"]) == 3 and torch.isfinite(state["loss_weighting.history"]).all()
    fresh = MTLTask(cfg).build_model(cfg)
    fresh.load_state_dict(state)
    assert fresh.loss_weighting.weights() == model.loss_weighting.weights()


# ------------------------------------------------------------------ CLI: train, predict, compare
def test_train_and_predict_through_the_cli(tmp_path):
    wd = tmp_path / "run"
    code, out = run("train", "--task", "mtl", "--work-dir", str(wd), "--no-progress", *sets(*TINY))
    assert code == 0, out
    metrics = pd.read_csv(wd / "metrics.csv")
    assert {"seg/mIoU", "depth/abs_rel", "normals/mean", "loss_seg", "weight_normals"} <= set(metrics.columns)
    assert (wd / "predictions.png").is_file() and (wd / "calibration.csv").is_file()
    from PIL import Image

    img = tmp_path / "room.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(img)
    code, out = run("predict", str(img), "--checkpoint", str(wd / "final.pth"), "--out", str(tmp_path / "pred"))
    assert code == 0, out
    for f in ("seg/room.png", "depth/room.png", "normals/room.png", "normals/room.npy"):
        assert (tmp_path / "pred" / f).is_file(), f


@pytest.mark.slow  # twelve tiny training runs
def test_compare_trains_baselines_and_prints_delta_m_with_and_without_eq(tmp_path):
    tiny = [*TINY, "mtl.tasks=[seg, depth]", "train.iters=1", "train.val_interval=1", "train.ckpt_interval=1",
            "data.kwargs.num_train=2"]
    code, out = run("compare", "--task", "mtl", "--seeds", "0,1", "--work-dir", str(tmp_path / "cmp"), *sets(*tiny))
    assert code == 0, out
    runs = pd.read_csv(tmp_path / "cmp" / "runs.csv")
    names = set(runs["config"])
    assert names == {"synthetic_hrnet_r18", "synthetic_hrnet_r18-single_seg", "synthetic_hrnet_r18-single_depth"}
    assert len(runs) == 3 * 2 * 2  # (mtl + 2 baselines) x (off, explicit) x 2 seeds
    summary = pd.read_csv(tmp_path / "cmp" / "delta_m_summary.csv")
    assert list(summary["mode"]) == ["explicit", "off"] and list(summary["seeds"]) == [2, 2]
    assert "delta_m_summary:" in out and "delta_m_mean" in out
    # Δm recomputed by hand from the recorded metrics of seed 0 without EQ
    r = runs[(runs["seed"] == 0) & (runs["mode"] == "off")].set_index("config")
    mtl, seg, dep = (r.loc[n] for n in ("synthetic_hrnet_r18", "synthetic_hrnet_r18-single_seg",
                                        "synthetic_hrnet_r18-single_depth"))
    gains = [(mtl["seg/mIoU"] - seg["seg/mIoU"]) / seg["seg/mIoU"], (mtl["seg/aAcc"] - seg["seg/aAcc"]) / seg["seg/aAcc"],
             -(mtl["depth/abs_rel"] - dep["depth/abs_rel"]) / dep["depth/abs_rel"],
             -(mtl["depth/rmse"] - dep["depth/rmse"]) / dep["depth/rmse"]]
    per_seed = pd.read_csv(tmp_path / "cmp" / "delta_m.csv")
    got = per_seed[(per_seed["seed"] == 0) & (per_seed["mode"] == "off")]["delta_m"].item()
    assert got == pytest.approx(100 * sum(gains) / 4)


def test_compare_tables_on_a_constructed_case():
    cfg = tiny_cfg("mtl.tasks=[seg, depth]", "mtl.heads={seg: {type: hrnet}, depth: {type: hrnet}}",
                   "mtl.sections={depth: {eval_crop: none}}")
    task = densefuse.get_task("mtl", cfg)
    members = task.compare_members(cfg)
    assert [m["name"] for m in members] == ["synthetic_hrnet_r18", "synthetic_hrnet_r18-single_seg",
                                            "synthetic_hrnet_r18-single_depth"]
    assert [list(m["mtl"]["tasks"]) for m in members] == [["seg", "depth"], ["seg"], ["depth"]]
    assert members[1]["mtl"]["heads"] == {"seg": {"type": "hrnet"}}
    rows = []
    for mode, seed, miou, absrel in [("off", 0, 44.0, 0.18), ("off", 1, 40.0, 0.20), ("explicit", 0, 48.0, 0.16)]:
        rows += [{"config": "synthetic_hrnet_r18", "mode": mode, "seed": seed, "seg/mIoU": miou, "seg/aAcc": 80.0,
                  "depth/abs_rel": absrel, "depth/rmse": 1.0},
                 {"config": "synthetic_hrnet_r18-single_seg", "mode": mode, "seed": seed, "seg/mIoU": 40.0,
                  "seg/aAcc": 80.0},
                 {"config": "synthetic_hrnet_r18-single_depth", "mode": mode, "seed": seed, "depth/abs_rel": 0.20,
                  "depth/rmse": 1.0}]
    tables = task.compare_tables(pd.DataFrame(rows), members)
    per_seed = tables["delta_m"].set_index(["mode", "seed"])["delta_m"]
    assert per_seed[("off", 0)] == pytest.approx((10 + 0 + 10 + 0) / 4)
    assert per_seed[("off", 1)] == pytest.approx(0.0)
    assert per_seed[("explicit", 0)] == pytest.approx((20 + 0 + 20 + 0) / 4)
    summary = tables["delta_m_summary"].set_index("mode")
    assert summary.loc["off", "delta_m_mean"] == pytest.approx(2.5) and summary.loc["off", "seeds"] == 2


def test_flip_tta_merges_each_task_its_own_way():
    cfg = tiny_cfg()
    task = densefuse.get_task("mtl", cfg)
    n = torch.nn.functional.normalize(torch.tensor([0.6, 0.0, 0.8]), dim=0).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    seg = torch.tensor([2.0, 0.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    plain = torch.cat([seg, torch.full((1, 1, 2, 2), 2.0), n], 1)
    mirrored = torch.cat([seg, torch.full((1, 1, 2, 2), 4.0), n * torch.tensor([-1.0, 1, 1]).view(1, 3, 1, 1)], 1)
    parts = task.split(task.merge_tta([{"out": plain}, {"out": mirrored}], flipped=[False, True]))
    assert torch.allclose(parts["depth"], torch.full((1, 1, 2, 2), 3.0))
    assert torch.allclose(parts["normals"], n, atol=1e-6)  # the mirrored view's n_x negated back
    assert parts["seg"].argmax(1).eq(0).all()


# ------------------------------------------------------------------ user errors: one line, exit 2, nothing written
@pytest.mark.parametrize("overrides, message", [
    (["mtl.tasks=[seg, dept]"], "mtl.tasks names unknown task 'dept' (did you mean 'depth'?)"),
    (["mtl.heads={seg: {type: hrnet}, depth: {type: hrnet}}"], "mtl.heads has no head for task 'normals'"),
    (["mtl.sections={normal: {loss: l1}}"], "mtl.sections names unknown task 'normal' (did you mean 'normals'?)"),
    (["mtl.heads.seg.type=hrnett"], "hrnett"),
    (["data.type=cityscapes", "data.root=/nowhere", "model.num_classes=19", "data.kwargs={}"],
     "data.type 'cityscapes' has no 'normals' labels"),
    (["mtl.sections={depth: {max_dept: 3.0}}"], "unknown config key 'mtl.sections.depth.max_dept'"),
    (["mtl.weighting=fixed"], "mtl.weighting 'fixed' needs a weight for every task"),
])
def test_bad_mtl_config_is_one_line_before_any_work(tmp_path, overrides, message):
    wd = tmp_path / "run"
    code, out = run("train", "--task", "mtl", "--work-dir", str(wd), *sets(*TINY, *overrides))
    assert code == 2, out
    assert message in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert not wd.exists()


def _nyu_tree(root, tasks=("image", "label", "depth"), n=2, size=(8, 12)):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for d in tasks:
            (root / split / d).mkdir(parents=True)
            for i in range(n):
                shape = {"image": (*size, 3), "label": size, "depth": size, "normal": (*size, 3)}[d]
                arr = rng.integers(0, 13, shape).astype(np.float32) if d == "label" else rng.random(shape, np.float32)
                np.save(root / split / d / f"{i}.npy", arr)


def test_a_dataset_without_the_labels_of_a_configured_task_is_one_line(tmp_path):
    root = tmp_path / "nyu"
    _nyu_tree(root)  # no normal/ folder
    wd = tmp_path / "run"
    nyu = ["data.type=nyuv2", f"data.root={root}", "model.num_classes=13", "data.kwargs={size: [8, 12]}"]
    code, out = run("train", "--task", "mtl", "--work-dir", str(wd), *sets(*TINY, *nyu))
    assert code == 2, out
    assert "task 'normals' needs its labels there" in out and len(out.strip().splitlines()) == 1, out
    assert not wd.exists()
    # without normals in mtl.tasks the same tree trains: the config decides which labels are needed
    task = densefuse.get_task("mtl", densefuse.load_config("mtl/synthetic_hrnet_r18", [
        *TINY, *nyu, "mtl.tasks=[seg, depth]", "data.crop_size=[8, 12]"]))
    data = task.build_dataset(task.cfg, "train")
    assert len(data) == 2 and set(data[0]) >= {"image", "label", "depth", "has_seg", "has_depth"}


@pytest.mark.parametrize("name", ["mtl/synthetic_hrnet_r18", "mtl/deeplabv3_r50-d8_1xb8-20k_nyuv2-288x384",
                                  "mtl/deeplabv3_r50-d8_1xb8-40k_cityscapes-512x1024"])
def test_shipped_mtl_configs_load_and_build(name):
    from densefuse.engine.configs import build_on_meta

    cfg = densefuse.load_config(name)
    build_on_meta(cfg)  # the model, optimizer and schedule of the full-size recipe, on the meta device
    tasks = list(cfg["mtl"]["tasks"])
    assert set(cfg["mtl"]["heads"]) == set(tasks)
    assert MTLTask(cfg).primary_metric == {"seg": "seg/mIoU"}[tasks[0]]
