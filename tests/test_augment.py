"""Dense-key augmentation: every key moves with its own resampling and fill; draws replay and invert."""
import pytest
import torch

from densefuse.data import (
    Augment,
    Normalize,
    PhotoMetricDistortion,
    RandomCropPad,
    RandomHorizontalFlip,
    RandomScaleCrop,
    build_augmentation,
    build_loader,
    hflip,
    scale_crop,
)
from densefuse.tasks import DenseKey

#: the depth task's table: sparse depth nearest/0, ground embedding bilinear/0, slope nearest/255
DEPTH_KEYS = {"depth": DenseKey("nearest", 0.0), "ground": DenseKey("bilinear", 0.0), "slope": DenseKey("nearest", 255.0)}
ALL_KEYS = {"label": DenseKey("nearest", 255.0), **DEPTH_KEYS}
A, B, C = 0.75, -0.5, 40.0  # ground(y, x) = A*x + B*y + C: bilinear interpolation reproduces it exactly


def coords(b, h, w):
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return yy.expand(b, 1, h, w), xx.expand(b, 1, h, w)


def sample_batch(b=2, h=12, w=16, seed=0):
    """A batch whose maps are known functions of the pixel coordinates: ``ground`` linear (bilinear),
    ``depth`` = 1000*y + x + 1 (every pixel distinct, so nearest lookups can be traced back)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = coords(b, h, w)
    return {
        "image": torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, 20, (b, h, w), generator=g),
        "depth": 1000.0 * yy + xx + 1.0,
        "ground": A * xx + B * yy + C,
        "slope": torch.randint(0, 90, (b, 1, h, w), generator=g).float(),
        "name": ["a", "b"][:b],
    }


def test_scale_crop_moves_every_key_as_its_resampling_says():
    b = sample_batch()
    scale = torch.tensor([2.0, 1.5])
    offset = torch.tensor([[4.0, 6.0], [2.0, 3.0]])
    out = scale_crop(b, scale, offset, (10, 12), keys=ALL_KEYS, image_fill=(1.0, 2.0, 3.0))
    for i in range(2):
        r, (oy, ox) = float(scale[i]), offset[i].tolist()
        yy, xx = coords(1, 10, 12)
        sy, sx = (oy + yy + 0.5) / r - 0.5, (ox + xx + 0.5) / r - 0.5  # source coordinates of each output pixel
        inside = (sy >= 0) & (sy <= 11) & (sx >= 0) & (sx <= 15)
        # bilinear: the linear map is reproduced exactly wherever the sample lies inside the source
        want = A * sx + B * sy + C
        assert torch.allclose(out["ground"][i][inside[0]], want[0][inside[0]], atol=1e-4)
        # nearest: the value of the nearest source pixel, copied exactly (never blended); exact ties
        # (a sample half-way between two pixels) may go either way and are left out
        clear = inside & ((sy - sy.floor() - 0.5).abs() > 1e-3) & ((sx - sx.floor() - 0.5).abs() > 1e-3)
        ny, nx = sy.round().clamp(0, 11), sx.round().clamp(0, 15)
        assert clear.sum() > 50
        assert torch.equal(out["depth"][i][clear[0]], (1000.0 * ny + nx + 1.0)[0][clear[0]])
        lab = b["label"][i][ny[0, 0].long(), nx[0, 0].long()]
        assert torch.equal(out["label"][i][clear[0, 0]], lab[clear[0, 0]])
        # every output value (ties included) is a value of the source map, never a blend
        assert set(out["depth"][i][inside[0]].tolist()) <= set(b["depth"][i].flatten().tolist())
    assert out["label"].dtype == torch.int64 and out["slope"].dtype == torch.float32
    assert set(out["slope"].unique().tolist()) <= set(b["slope"].unique().tolist())
    assert out["name"] == b["name"]


def test_scale_crop_fills_each_key_outside_the_image():
    b = sample_batch()
    out = scale_crop(b, torch.full((2,), 0.5), torch.zeros(2, 2), (12, 16), keys=ALL_KEYS, image_fill=(10.0, 20.0, 30.0))
    # the half-size image covers rows 0..5 and columns 0..7; the rest is each key's fill
    assert (out["label"][:, 6:] == 255).all() and (out["label"][:, :, 8:] == 255).all()
    assert (out["depth"][..., 6:, :] == 0).all() and (out["slope"][..., :, 8:] == 255).all()
    assert (out["ground"][..., 7:, :] == 0).all()
    assert torch.allclose(out["image"][:, :, 7:, 9:], torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1))
    assert (out["label"][:, :6, :8] != 255).all() and (out["depth"][..., :6, :8] > 0).all()


def test_flip_moves_every_key_and_is_its_own_inverse():
    b = sample_batch()
    op = RandomHorizontalFlip(1.0, keys=ALL_KEYS)
    params = op.draw(b)
    out = op.apply(b, params)
    for k in ("image", "label", "depth", "ground", "slope"):
        assert torch.equal(out[k], b[k].flip(-1)), k
    back = op.invert(out, params)
    for k in ("image", "label", "depth", "ground", "slope"):
        assert torch.equal(back[k], b[k]), k
    half = hflip(b, torch.tensor([True, False]), ALL_KEYS)
    assert torch.equal(half["ground"][0], b["ground"][0].flip(-1)) and torch.equal(half["ground"][1], b["ground"][1])


def test_undeclared_dense_key_is_refused_not_dropped():
    b = sample_batch()
    with pytest.raises(KeyError, match="'ground'"):
        hflip(b, keys={"label": DenseKey("nearest", 255), "depth": DenseKey("nearest", 0)})
    with pytest.raises(KeyError, match="'slope'"):
        RandomScaleCrop((8, 8), keys={k: v for k, v in ALL_KEYS.items() if k != "slope"})(b)
    with pytest.raises(ValueError, match="resample"):
        hflip(b, keys={**ALL_KEYS, "ground": DenseKey("bicubic", 0)})


def test_draw_is_apart_from_apply_and_replays_exactly():
    b = sample_batch(seed=1)
    aug = build_augmentation([123.675, 116.28, 103.53], [58.395, 57.12, 57.375], size=(8, 10),
                             scale_range=(0.5, 2.0), flip=True, photometric=True, keys=ALL_KEYS,
                             generator=torch.Generator().manual_seed(3))
    first = aug(b)
    params = aug.last_params
    assert len(params) == 3 and set(params[1]) == {"scale", "offset", "in_size"} and set(params[2]) == {"flip"}
    again = aug(b, params)  # replay: identical output, whatever the generator does meanwhile
    for k in ("image", "raw_image", "label", "depth", "ground", "slope"):
        assert torch.equal(first[k], again[k]), k
    fresh = aug(b)
    assert not torch.equal(fresh["image"], first["image"])
    # the same draw moves another batch (a second view) identically
    moved = aug(dict(b, ground=b["ground"] * 2), params)
    assert torch.equal(moved["label"], first["label"]) and torch.equal(moved["image"], first["image"])
    assert torch.allclose(moved["ground"], first["ground"] * 2, atol=1e-3)  # bilinear with fill 0 is linear
    with pytest.raises(ValueError, match="parameter sets"):
        aug(b, params[:1])


def test_scale_crop_invert_puts_the_window_back():
    b = sample_batch()
    op = RandomScaleCrop((12, 16), (2.0, 2.0), keys=ALL_KEYS, generator=torch.Generator().manual_seed(0))
    params = op.draw(b)
    back = op.invert(op.apply(b, params), params)
    assert back["depth"].shape == b["depth"].shape
    # scale 2 then 1/2: pixels the window saw come back with their own values, the rest is fill
    seen = back["depth"] > 0
    assert seen.any() and torch.equal(back["depth"][seen], b["depth"][seen])
    assert (back["label"][~seen[:, 0]] == 255).all()
    aug = Augment([op, RandomHorizontalFlip(1.0, keys=ALL_KEYS)])
    out = aug(b)
    restored = aug.invert(out, aug.last_params)
    mask = restored["depth"] > 0
    assert torch.equal(restored["depth"][mask], b["depth"][mask])


def test_photometric_touches_only_the_image_and_normalize_ends_the_chain():
    b = sample_batch()
    aug = Augment([PhotoMetricDistortion(p=1.0, generator=torch.Generator().manual_seed(0))], Normalize([0, 0, 0], [1, 1, 1]))
    out = aug(b)
    for k in ("label", "depth", "ground", "slope"):
        assert torch.equal(out[k], b[k])
    assert not torch.equal(out["image"], b["image"].float()) and ((out["image"] >= 0) & (out["image"] <= 255)).all()
    assert out["raw_image"].dtype == torch.uint8


def test_random_crop_pad_uses_the_table():
    g = torch.Generator().manual_seed(0)
    b = sample_batch(b=1, h=6, w=20)
    sample = {k: (v[0] if k != "name" else v[0]) for k, v in b.items()}
    out = RandomCropPad((8, 10), ALL_KEYS, fill=[1, 2, 3], generator=g)(sample)
    assert out["ground"].shape == (1, 8, 10) and (out["ground"][:, 6:] == 0).all()
    assert (out["slope"][:, 6:] == 255).all() and (out["label"][6:] == 255).all() and (out["depth"][:, 6:] == 0).all()
    x0 = int(out["depth"][0, 0, 0].item() - 1)  # depth = 1000*y + x + 1 tells where the window starts
    assert torch.equal(out["ground"][:, :6], sample["ground"][:, :, x0:x0 + 10])
    with pytest.raises(KeyError, match="not declared"):
        RandomCropPad((8, 10), {"label": DenseKey("nearest", 255)})(sample)


class _Corrupt(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        from densefuse.errors import DataError

        if i == 2:
            raise DataError("cannot decode image file /data/x_2.jpg: broken data stream")
        return {"image": torch.zeros(3, 4, 4)}


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_reraises_user_errors_as_themselves(workers):
    from densefuse.errors import DataError

    loader = build_loader(_Corrupt(), 1, train=False, num_workers=workers)
    with pytest.raises(DataError) as info:
        list(loader)
    assert str(info.value) == "cannot decode image file /data/x_2.jpg: broken data stream"
    assert len(loader.dataset) == 4
