"""The per-sample op set (densefuse.data.ops): every op moves the image and every dense key together, each with
its own resampling and fill, at an odd size; and the random-draw helper."""
import pytest
import torch
import torch.nn.functional as F

from densefuse.data.ops import Draw, crop, hflip, nearest_index, pad, resize, resize_tensor, rotate
from densefuse.tasks import DenseKey

H, W = 75, 101
KEYS = {"label": DenseKey("nearest", 255.0), "depth": DenseKey("nearest", 0.0)}
FILL = (7.0, 8.0, 9.0)  # the image fill, one per channel


def classes(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The label of source pixel (y, x): blocks of five classes, so a label is a function of the position."""
    return (y // 9 + 2 * (x // 11)) % 5


def ramp_sample(h: int = H, w: int = W) -> dict:
    """image channels = (row, column, 0) coordinates; depth = 1000 * row + column + 1 (each pixel distinct, so a
    nearest lookup names its source pixel); label a function of the source pixel; one untouched extra key."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return {"image": torch.stack([yy, xx, torch.zeros_like(yy)]).float(), "label": classes(yy, xx).to(torch.uint8),
            "depth": (1000.0 * yy + xx + 1.0)[None], "K": torch.eye(3), "name": "ramp"}


def source_of(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source (row, column) of every output pixel from the moved depth, and where it came from the image."""
    d = depth[0]
    inside = d > 0
    code = (d - 1).clamp(min=0).long()
    return code // 1000, code % 1000, inside


def check_consistent(out: dict, exact_image: bool, tol: float = 1.0) -> torch.Tensor:
    """label and image agree with the depth's source pixels everywhere the depth came from the image; label
    values are input values or the fill. The bilinear image is compared (within ``tol`` pixels) where a
    whole 3x3 neighbourhood came from the image (the border blends towards the fill). Returns the inside mask."""
    sy, sx, inside = source_of(out["depth"])
    label = out["label"].long()
    assert set(label.unique().tolist()) <= {0, 1, 2, 3, 4, 255}
    assert torch.equal(label[inside], classes(sy, sx)[inside])
    assert (label[~inside] == 255).all()
    img = out["image"]
    if exact_image:
        assert torch.equal(img[0][inside], sy[inside].float()) and torch.equal(img[1][inside], sx[inside].float())
    else:  # bilinear against nearest: close to each other
        ring = F.pad(inside[None, None].float(), (1, 1, 1, 1))  # beyond the output's border counts as outside
        core = -F.max_pool2d(-ring, 3, 1)[0, 0] > 0
        assert (img[0][core] - sy[core]).abs().max() <= tol and (img[1][core] - sx[core]).abs().max() <= tol
    assert out["K"] is not None and torch.equal(out["K"], torch.eye(3)) and out["name"] == "ramp"
    return inside


@pytest.mark.parametrize("top, left, size", [(10, 20, (40, 64)), (-6, -9, (50, 50)), (60, 90, (32, 24)),
                                             (-3, 5, (90, 120))], ids=["inside", "top-left", "bottom-right", "around"])
def test_crop_moves_every_key_and_fills_outside(top, left, size):
    out = crop(ramp_sample(), top, left, size, KEYS, FILL)
    for k in ("image", "label", "depth"):
        assert tuple(out[k].shape[-2:]) == size and out[k].is_contiguous()
    assert out["label"].dtype == torch.uint8 and out["depth"].dtype == torch.float32
    inside = check_consistent(out, exact_image=True)
    yy, xx = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    want = (yy + top >= 0) & (yy + top < H) & (xx + left >= 0) & (xx + left < W)
    assert torch.equal(inside, want)
    sy, sx, _ = source_of(out["depth"])
    assert torch.equal(sy[inside], (yy + top)[inside]) and torch.equal(sx[inside], (xx + left)[inside])
    for c, f in enumerate(FILL):
        assert (out["image"][c][~inside] == f).all()


def test_crop_never_aliases_its_input():
    s = ramp_sample()
    out = crop(s, 0, 0, (H, W), KEYS, FILL)
    out["depth"].zero_()
    assert s["depth"].max() > 0


def test_pad_bottom_right_to_size():
    s = ramp_sample()
    out = pad(s, (80, 128), KEYS, FILL)
    assert out["image"].shape == (3, 80, 128) and out["label"].shape == (80, 128) and out["depth"].shape == (1, 80, 128)
    assert torch.equal(out["depth"][:, :H, :W], s["depth"]) and torch.equal(out["label"][:H, :W], s["label"])
    assert (out["label"][H:] == 255).all() and (out["label"][:, W:] == 255).all()
    assert (out["depth"][:, H:] == 0).all() and (out["depth"][:, :, W:] == 0).all()
    assert (out["image"][:, H:] == torch.tensor(FILL).view(3, 1, 1)).all()
    same = pad(s, (40, 40), KEYS)  # already large enough: unchanged size
    assert same["image"].shape == (3, H, W) and torch.equal(same["depth"], s["depth"])


@pytest.mark.parametrize("style", ["cv2", "float"])
@pytest.mark.parametrize("size", [(131, 77), (38, 51), (75, 202)], ids=["up-down", "down", "wide"])
def test_resize_moves_every_key_with_its_resampling(style, size):
    out = resize(ramp_sample(), size, KEYS, style)
    for k in ("image", "label", "depth"):
        assert tuple(out[k].shape[-2:]) == size
    # nearest picks floor(dst * s) (cv2) or the pixel under the output pixel's centre (float); bilinear samples
    # at the centre (dst + 0.5) * s - 0.5, so they are at most 0.5 s + 0.5 (cv2) or 0.5 (float) pixels apart
    s = max(H / size[0], W / size[1])
    inside = check_consistent(out, exact_image=False, tol=0.5 * s + 0.5 + 1e-4 if style == "cv2" else 0.5 + 1e-4)
    assert inside.all()  # a resize has no outside
    src = set(ramp_sample()["depth"].unique().tolist())
    assert set(out["depth"].unique().tolist()) <= src  # nearest: never a blended depth
    # bilinear image: the source coordinate of each output pixel centre (align_corners=False), clamped
    cols = ((torch.arange(size[1]) + 0.5) * W / size[1] - 0.5).clamp(0, W - 1)
    assert torch.allclose(out["image"][1][0], cols, atol=1e-3)


def test_resize_nearest_conventions_are_torchs():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 200, (1, 37, 53), generator=g, dtype=torch.uint8)
    for size in ((75, 101), (19, 26), (37, 106), (100, 61)):
        cv2 = F.interpolate(x[None].float(), size=size, mode="nearest")[0].to(torch.uint8)
        exact = F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0].to(torch.uint8)
        assert torch.equal(resize_tensor(x, size, "nearest", "cv2"), cv2)
        assert torch.equal(resize_tensor(x, size, "nearest", "float"), exact)
        box = (2, size[0] - 3, 4, size[1] - 1)
        assert torch.equal(resize_tensor(x, size, "nearest", "cv2", box), cv2[:, 2:size[0] - 3, 4:size[1] - 1])
    assert nearest_index(4, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="resize style"):
        resize_tensor(x, (8, 8), "nearest", "lanczos")
    with pytest.raises(ValueError, match="resample"):
        resize_tensor(x, (8, 8), "bicubic", "float")


def test_hflip_mirrors_every_key():
    s = ramp_sample()
    out = hflip(s, KEYS)
    check_consistent(out, exact_image=True)
    sy, sx, _ = source_of(out["depth"])
    assert torch.equal(sx[0], torch.arange(W - 1, -1, -1)) and torch.equal(sy[:, 0], torch.arange(H))


@pytest.mark.parametrize("degrees", [7.0, -12.5])
def test_rotate_keeps_nearest_values_and_fills_corners(degrees):
    out = rotate(ramp_sample(), degrees, KEYS, FILL)
    assert out["image"].shape == (3, H, W) and out["label"].dtype == torch.uint8
    src = set(ramp_sample()["depth"].unique().tolist()) | {0.0}
    assert set(out["depth"].unique().tolist()) <= src
    inside = check_consistent(out, exact_image=False)
    assert not inside[0, 0] and not inside[-1, -1] and inside[H // 2, W // 2]  # corners come from outside
    assert torch.allclose(out["image"][:, 0, 0], torch.tensor(FILL))
    sy, sx, _ = source_of(out["depth"])  # the centre stays in place
    assert abs(int(sy[H // 2, W // 2]) - H // 2) <= 1 and abs(int(sx[H // 2, W // 2]) - W // 2) <= 1
    # counter-clockwise: a pixel right of the centre comes from lower (positive) or higher (negative) rows
    right = int(sy[H // 2, W // 2 + 30]) - H // 2
    assert (right > 0) == (degrees > 0)


def test_draw_is_a_replayable_stream():
    a, b = Draw(torch.Generator().manual_seed(3)), Draw(torch.Generator().manual_seed(3))
    seq = [(a.uniform(-2, 5), a.randint(-3, 3), a.coin(0.3)) for _ in range(50)]
    assert seq == [(b.uniform(-2, 5), b.randint(-3, 3), b.coin(0.3)) for _ in range(50)]
    assert all(-2 <= u < 5 and -3 <= i <= 3 for u, i, _ in seq)
    ints = {Draw(torch.Generator().manual_seed(s)).randint(0, 2) for s in range(60)}
    assert ints == {0, 1, 2}  # both ends included
    torch.manual_seed(11)  # without a generator: torch's global RNG, which the loader seeds per sample
    first = Draw().crop_offset((H, W), (40, 64))
    torch.manual_seed(11)
    assert Draw().crop_offset((H, W), (40, 64)) == first
    assert 0 <= first[0] <= H - 40 and 0 <= first[1] <= W - 64
    assert Draw().crop_offset((20, 30), (40, 64)) == (0, 0)  # a larger window: pad at the bottom/right


def test_seeded_draws_depend_on_seed_and_salt_only():
    one = Draw.seeded(2**40 + 5, "RandomScaleCrop").rand()
    assert one == Draw.seeded(2**40 + 5, "RandomScaleCrop").rand()
    assert one != Draw.seeded(2**40 + 5, "PhotoMetricDistortion").rand()
    assert one != Draw.seeded(2**40 + 6, "RandomScaleCrop").rand()
