"""The paper's facts that densefuse is built on (Kim & Kim, TMLR 2024, Section 3).

* Theorem 3.2: bilinear upsampling keeps the mean and lowers the variance of a non-constant feature;
  nearest upsampling by an integer ratio keeps both; a constant feature stays constant.
* Eq. 5/6: a Conv-BN-ReLU block at init (train-mode BN) outputs mean 1/sqrt(2 pi), variance (pi-1)/(2 pi).
* The identity the explicit equalizer relies on: bilinear weights sum to 1, so
  ``UP((x - mu) / s) == (UP(x) - mu) / s`` and the affine can run on the small pre-upsample tensor.

CPU only, small tensors, fixed seeds; the whole file runs in a few seconds.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from densefuse.fusion import resize

RATIOS = (2, 4, 8)
RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)  # Eq. 5
RELU_VAR = (math.pi - 1.0) / (2.0 * math.pi)  # Eq. 6


def _feature(seed: int = 0, shape: tuple[int, ...] = (2, 3, 16, 16), dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A random non-constant feature with a non-zero mean (a ReLU-like positive offset)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * 0.6 + RELU_MEAN


def _up(x: torch.Tensor, r: int, mode: str = "bilinear", align_corners: bool | None = False) -> torch.Tensor:
    if mode == "nearest":
        return F.interpolate(x, scale_factor=r, mode="nearest")
    return F.interpolate(x, scale_factor=r, mode=mode, align_corners=align_corners)


def _var(x: torch.Tensor) -> float:
    """Population variance over every element (the paper's Var[X] of a whole feature)."""
    return float(x.var(correction=0))


def _iid_ratio(n: int, r: int, align_corners: bool) -> float:
    """Exact Var[UP_r(X)] / Var[X] for an i.i.d. n x n feature: the mean over output pixels of the sum of
    squared interpolation weights, per axis (bilinear is separable), read off by upsampling the basis."""
    basis = torch.eye(n, dtype=torch.float64).view(n, 1, n)
    w = F.interpolate(basis, scale_factor=r, mode="linear", align_corners=align_corners)[:, 0, :]
    return float(w.square().sum(0).mean()) ** 2


# --------------------------------------------------------------------------- Theorem 3.2
@pytest.mark.parametrize("r", RATIOS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bilinear_lowers_variance_and_keeps_mean(r: int, seed: int) -> None:
    x = _feature(seed)
    y = _up(x, r, align_corners=False)
    assert y.shape[-2:] == (16 * r, 16 * r)
    # align_corners=False with an integer ratio: every input pixel's weights sum to r*r (edge clamping
    # included), so the mean is kept exactly up to rounding.
    assert float(y.mean()) == pytest.approx(float(x.mean()), abs=1e-12)
    assert _var(y) < _var(x)
    # For i.i.d. inputs the ratio is known exactly from the interpolation weights (see _iid_ratio).
    assert _var(y) / _var(x) == pytest.approx(_iid_ratio(16, r, False), rel=0.1)


@pytest.mark.parametrize("align_corners", [False, True])
def test_bilinear_iid_variance_ratio_matches_interpolation_weights(align_corners: bool) -> None:
    x = _feature(7, shape=(4, 8, 64, 64))
    for r in RATIOS:
        measured = _var(_up(x, r, align_corners=align_corners)) / _var(x)
        assert measured == pytest.approx(_iid_ratio(64, r, align_corners), rel=0.02), r


@pytest.mark.parametrize("r", RATIOS)
def test_bilinear_iid_variance_ratio_closed_form(r: int) -> None:
    """Away from the border, align_corners=False keeps 2/3 - 1/(6 r^2) of the variance per axis (the mean of
    f^2 + (1-f)^2 over the sub-pixel offsets f = (2k+1)/(2r)); the border adds O(1/size)."""
    closed = (2.0 / 3.0 - 1.0 / (6.0 * r * r)) ** 2
    assert _iid_ratio(1024, r, False) == pytest.approx(closed, rel=2e-3)
    assert closed < _iid_ratio(64, r, False) < closed * 1.03


@pytest.mark.parametrize("r", RATIOS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bilinear_align_corners_lowers_variance(r: int, seed: int) -> None:
    x = _feature(seed)
    y = _up(x, r, align_corners=True)
    # align_corners=True maps the corner pixels onto each other: border pixels get a little less weight
    # than interior ones, so the mean is kept only approximately (the deviation shrinks with the size).
    assert float(y.mean()) == pytest.approx(float(x.mean()), abs=0.05)
    assert _var(y) < _var(x)


@pytest.mark.parametrize("r", RATIOS)
def test_bilinear_keeps_the_variance_scale_free(r: int) -> None:
    """The drop is a property of the interpolation, not of the input's scale: Var[UP(aX)] = a^2 Var[UP(X)]."""
    x = _feature(4)
    assert _var(_up(3.0 * x, r)) == pytest.approx(9.0 * _var(_up(x, r)), rel=1e-10)


@pytest.mark.parametrize("r", RATIOS)
def test_nearest_keeps_mean_and_variance_exactly(r: int) -> None:
    x = _feature(5)
    y = _up(x, r, mode="nearest")
    # Integer-ratio nearest upsampling replicates every pixel r*r times: an exact copy of each value.
    assert torch.equal(y, x.repeat_interleave(r, dim=-2).repeat_interleave(r, dim=-1))
    assert float(y.mean()) == pytest.approx(float(x.mean()), rel=1e-12)
    assert _var(y) == pytest.approx(_var(x), rel=1e-12)


@pytest.mark.parametrize("r", RATIOS)
@pytest.mark.parametrize("mode,align_corners", [("bilinear", False), ("bilinear", True), ("nearest", None)])
def test_constant_feature_keeps_zero_variance(r: int, mode: str, align_corners: bool | None) -> None:
    x = torch.full((2, 3, 8, 8), RELU_MEAN, dtype=torch.float64)
    y = _up(x, r, mode=mode, align_corners=align_corners)
    assert _var(y) == pytest.approx(0.0, abs=1e-24)
    assert torch.allclose(y, x.mean().expand_as(y), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- Eq. 5 / 6
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kernel_size", [1, 3])
def test_conv_bn_relu_at_init_has_fixed_mean_and_variance(seed: int, kernel_size: int) -> None:
    torch.manual_seed(seed)
    block = nn.Sequential(
        nn.Conv2d(16, 32, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(32),  # gamma = 1, beta = 0 at init
        nn.ReLU(),
    ).train()
    nn.init.normal_(block[0].weight, std=3.0)  # arbitrary weight scale: BN removes it
    x = torch.randn(8, 16, 24, 24) * 5.0 + 2.0  # arbitrary input scale and offset
    with torch.no_grad():
        y = block(x)
    assert float(y.mean()) == pytest.approx(RELU_MEAN, abs=0.02)
    assert _var(y) == pytest.approx(RELU_VAR, abs=0.02)
    # BN normalizes per channel, so every channel (not only the whole tensor) has these moments.
    per_channel_mean = y.mean(dim=(0, 2, 3))
    assert torch.allclose(per_channel_mean, torch.full_like(per_channel_mean, RELU_MEAN), atol=0.05)


def test_conv_bn_relu_then_bilinear_falls_below_eq6() -> None:
    """The paper's point: after Conv-BN-ReLU-UP the branch no longer has variance (pi-1)/(2 pi)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()).train()
    with torch.no_grad():
        y = block(torch.randn(8, 16, 16, 16))
        ups = [_up(y, r) for r in RATIOS]
    assert _var(y) == pytest.approx(RELU_VAR, abs=0.02)
    for up in ups:
        assert float(up.mean()) == pytest.approx(float(y.mean()), abs=1e-6)
        assert _var(up) < RELU_VAR - 0.05


# --------------------------------------------------------------------------- explicit-equalizer identity
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (128, 128), (37, 53)])
def test_affine_commutes_with_bilinear_resize(align_corners: bool, size: tuple[int, int]) -> None:
    """UP((x - mu) / s) == (UP(x) - mu) / s for integer and non-integer ratios: bilinear weights sum to 1.

    float64: exact up to rounding. float32 (what training runs): within 1e-6 (plus 1e-6 relative, since
    one float32 ulp of a standardized value near 4 is already 4.8e-7)."""
    x = _feature(6, shape=(2, 4, 16, 16), dtype=torch.float64)
    mu, s = float(x.mean()), float(x.std())
    before = resize((x - mu) / s, size, align_corners)
    after = (resize(x, size, align_corners) - mu) / s
    assert float((before - after).abs().max()) < 1e-12
    x32 = x.float()
    before32 = resize((x32 - mu) / s, size, align_corners)
    after32 = (resize(x32, size, align_corners) - mu) / s
    assert torch.allclose(before32, after32, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("align_corners", [False, True])
def test_affine_commutes_with_bilinear_gradient(align_corners: bool) -> None:
    """The backward passes agree too: the explicit equalizer pre-upsample trains like the paper's post-upsample one."""
    g = torch.Generator().manual_seed(9)
    x = _feature(9, shape=(2, 4, 8, 8)).requires_grad_(True)
    grad_out = torch.randn(2, 4, 64, 64, generator=g, dtype=torch.float64)
    mu, s = 0.4, 0.3
    (gx_pre,) = torch.autograd.grad(resize((x - mu) / s, (64, 64), align_corners), x, grad_out)
    (gx_post,) = torch.autograd.grad((resize(x, (64, 64), align_corners) - mu) / s, x, grad_out)
    assert torch.allclose(gx_pre, gx_post, rtol=1e-10, atol=1e-12)
