"""Augmentation moves the ground embedding with the depth: ground pixels keep G == depth."""
import torch
from densefuse_tasks.depth import DepthTask, TrainPipeline, ground_depth, pitched_normal
from densefuse_tasks.depth import transforms as T

KEYS = DepthTask.dense_keys


def ground_sample(H=96, W=320):
    """A scene that is all ground: true depth == G wherever G is valid (LiDAR-sparse), sky elsewhere."""
    K = torch.tensor([[190.0, 0, (W - 1) / 2], [0, 190.0, 0.42 * H], [0, 0, 1]])
    G = ground_depth(K, pitched_normal(1.5), 1.65, (H, W))[None]
    depth = G.clone()
    depth[:, ::2] = 0  # sparse rows, like LiDAR
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=g)
    slope = torch.where(depth > 0, torch.full_like(depth, 5), torch.full_like(depth, 255)).long()
    return {"image": image, "depth": depth, "ground": G, "slope": slope}


def rel_error(s, max_depth=60.0):
    d, G = s["depth"], s["ground"]
    m = (d > 0) & (G > 0) & (d < max_depth)
    assert m.sum() > 200
    return ((G[m] - d[m]).abs() / d[m])


def test_exact_ops_keep_ground_equal_to_depth():
    s = ground_sample()
    for out in (T.hflip(s, KEYS), T.crop(s, 20, 50, (64, 192), KEYS), T.kb_crop(s, KEYS, (80, 300)),
                T.crop(s, -10, -20, (120, 360), KEYS)):  # padding
        assert rel_error(out).max() < 1e-6
        assert out["slope"].dtype == torch.int64 and out["image"].dtype == torch.uint8
    padded = T.crop(s, -10, -20, (120, 360), KEYS)
    assert (padded["slope"][:, :10] == 255).all() and (padded["depth"][:, :10] == 0).all()


def test_resampling_ops_keep_ground_close_to_depth():
    s = ground_sample()
    for out in (T.resize(s, (150, 500), KEYS), T.resize(s, (50, 166), KEYS), T.rotate(s, 2.5, KEYS),
                T.rotate(s, -2.5, KEYS)):
        err = rel_error(out)
        # depth is resampled nearest, G bilinear: they differ by the sub-pixel shift times G's gradient only
        assert err.median() < 0.01 and torch.quantile(err, 0.95) < 0.05
    rotated = T.rotate(s, 2.5, KEYS)
    assert set(rotated["slope"].unique().tolist()) <= {5, 255}  # nearest: never a blended class


def test_full_train_pipeline_and_a_wrong_transform_is_caught():
    s = ground_sample()
    torch.manual_seed(0)
    pipe = TrainPipeline((64, 192), KEYS, scale_range=(0.5, 2.0), rotate_deg=2.5, flip=True, photometric=True)
    for _ in range(6):
        out = pipe(dict(s))
        assert out["image"].shape == (3, 64, 192) and out["depth"].shape == (1, 64, 192)
        d, G = out["depth"], out["ground"]
        m = (d > 0) & (G > 0) & (d < 15)  # well below the horizon, where G's gradient is small
        if m.sum() > 50:
            err = (G[m] - d[m]).abs() / d[m]
            assert err.median() < 0.015 and torch.quantile(err, 0.95) < 0.03
    # control: rotating the depth but not the ground map breaks the equality far beyond that
    tilted = T.rotate(s, 2.5, {"depth": KEYS["depth"]})
    assert rel_error({**tilted, "ground": s["ground"]}, 15).median() > 0.05
