"""DepthMetrics against an independent numpy implementation of the KITTI protocol."""
import math

import numpy as np
import pytest
import torch
from densefuse_tasks.depth import METRIC_NAMES, DepthMetrics, DepthTask, silog_loss


def numpy_errors(gt, pred):
    thresh = np.maximum(gt / pred, pred / gt)
    out = {
        "a1": (thresh < 1.25).mean(),
        "a2": (thresh < 1.25 ** 2).mean(),
        "a3": (thresh < 1.25 ** 3).mean(),
        "abs_rel": np.mean(np.abs(gt - pred) / gt),
        "sq_rel": np.mean(((gt - pred) ** 2) / gt),
        "rmse": np.sqrt(np.mean((gt - pred) ** 2)),
        "rmse_log": np.sqrt(np.mean((np.log(gt) - np.log(pred)) ** 2)),
        "log10": np.mean(np.abs(np.log10(gt) - np.log10(pred))),
    }
    d = np.log(pred) - np.log(gt)
    out["silog"] = np.sqrt(np.mean(d ** 2) - np.mean(d) ** 2) * 100
    return out


def numpy_dataset(preds, gts, min_depth=1e-3, max_depth=80.0, rows=None, cols=None):
    per_image = []
    for p, g in zip(preds, gts):
        valid = (g > min_depth) & (g < max_depth)
        if rows is not None:
            box = np.zeros_like(valid)
            box[rows[0]:rows[1], cols[0]:cols[1]] = True
            valid &= box
        if valid.sum() == 0:
            per_image.append({k: np.nan for k in METRIC_NAMES})
        else:
            per_image.append(numpy_errors(g[valid].astype(np.float64), p[valid].astype(np.float64)))
    return {k: np.nanmean([r[k] for r in per_image]) for k in METRIC_NAMES}


def random_maps(b, h, w, seed, empty=()):
    rng = np.random.default_rng(seed)
    gt = rng.uniform(0.5, 90.0, (b, h, w)).astype(np.float32)
    gt[rng.random((b, h, w)) < 0.4] = 0.0  # invalid pixels
    for i in empty:
        gt[i] = 0.0
    pred = (gt + rng.normal(0, 2.0, gt.shape)).clip(1e-3, 80).astype(np.float32)
    pred[gt == 0] = rng.uniform(1, 80, int((gt == 0).sum()))
    return pred, gt


def test_metrics_match_numpy_with_invalid_pixels_and_an_empty_image():
    pred, gt = random_maps(4, 24, 40, seed=0, empty=(2,))
    m = DepthMetrics(crop=None)
    m.update(torch.from_numpy(pred[:2])[:, None], torch.from_numpy(gt[:2])[:, None])  # (B,1,H,W)
    m.update(torch.from_numpy(pred[2:]), torch.from_numpy(gt[2:]))  # (B,H,W)
    got = m.compute()
    assert list(got) == list(METRIC_NAMES)
    assert sorted(got) == sorted("a1 a2 a3 abs_rel sq_rel rmse rmse_log log10 silog".split())
    want = numpy_dataset(pred, gt)
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(want[k], rel=1e-6, abs=1e-9), k
    rows = m.per_image()
    assert rows.iloc[2].isna().all() and not rows.iloc[[0, 1, 3]].isna().any().any()
    # the empty image is skipped, not counted as zero: RMSE is the mean of the three others
    assert got["rmse"] == pytest.approx(rows["rmse"].iloc[[0, 1, 3]].mean())


def test_garg_crop_on_kitti_size():
    pred, gt = random_maps(2, 352, 1216, seed=1)
    m = DepthMetrics(crop="garg")
    m.update(torch.from_numpy(pred), torch.from_numpy(gt))
    want = numpy_dataset(pred, gt, rows=(143, 349), cols=(43, 1172))
    got = m.compute()
    for k in METRIC_NAMES:
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    # and the crop matters: without it the numbers differ
    full = numpy_dataset(pred, gt)
    assert abs(full["rmse"] - got["rmse"]) > 1e-4


def test_update_with_outputs_and_batch_as_the_trainer_calls_it():
    pred, gt = random_maps(2, 16, 16, seed=2)
    from densefuse.config import from_dict

    cfg = from_dict({"task": "depth", "model": {"type": "gedepth", "decode_head": {"type": "densedepth"}},
                     "depth": {"eval_crop": "none"}})
    task = DepthTask(cfg)
    m = task.metric(cfg)
    m.update({"out": torch.from_numpy(pred)[:, None]}, {"depth": torch.from_numpy(gt)[:, None]})
    want = numpy_dataset(pred, gt)
    assert m.compute()["abs_rel"] == pytest.approx(want["abs_rel"], rel=1e-6)
    assert task.metric_direction == "min" and task.is_better(0.1, 0.2) and not task.is_better(0.3, 0.2)
    assert m.tables() == {}


def test_no_valid_pixel_anywhere_gives_nan():
    m = DepthMetrics(crop=None)
    m.update(torch.ones(1, 1, 4, 4), torch.zeros(1, 1, 4, 4))
    assert all(math.isnan(v) for v in m.compute().values())


def test_silog_matches_gedepth_formula():
    torch.manual_seed(0)
    gt = torch.rand(2, 1, 8, 8) * 50
    gt[gt < 10] = 0
    pred = torch.rand(2, 1, 8, 8) * 50 + 1
    valid = gt > 0
    g = np.log(pred[valid].double().numpy() + 1e-3) - np.log(gt[valid].double().numpy() + 1e-3)
    want = np.sqrt(np.var(g, ddof=1) + 0.15 * np.mean(g) ** 2)
    assert float(silog_loss(pred, gt)) == pytest.approx(want, rel=1e-5)


def _dist_worker(rank, world, port, out):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        pred, gt = random_maps(4, 12, 20, seed=5, empty=(3,))
        m = DepthMetrics(crop=None)
        m.update(torch.from_numpy(pred[rank::world]), torch.from_numpy(gt[rank::world]))  # rank 1 holds the empty one
        torch.save(m.compute(), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_metrics_all_reduce_over_ranks(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "r")
    mp.spawn(_dist_worker, args=(2, port, out), nprocs=2, join=True)
    r0, r1 = (torch.load(f"{out}.{r}") for r in (0, 1))
    want = numpy_dataset(*random_maps(4, 12, 20, seed=5, empty=(3,)))
    for k in METRIC_NAMES:
        assert r0[k] == r1[k] == pytest.approx(want[k], rel=1e-9), k
