"""Calibration on real pixels: padded positions (``valid`` False) do not enter the fusion statistics."""
import torch
import torch.nn.functional as F
from torch import nn

import densefuse
from densefuse.fusion import Fusion, valid_positions


class TwoSites(nn.Module):
    """A full-resolution and a half-resolution branch, fused at both resolutions (one upsampled branch in
    each direction), so the validity is pooled to each fusion's size."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 5, 1)
        self.full = Fusion([4, 5], 6, kernel_size=1)
        self.coarse = Fusion([4, 5], 6, kernel_size=1)

    def forward(self, x):
        a = self.a(x)
        b = F.avg_pool2d(self.b(x), 2)
        return self.full([a, b], a.shape[-2:]).mean() + self.coarse([a, b], b.shape[-2:]).mean()


def _stats(model):
    return {name: (eq.mean.clone(), eq.std.clone()) for name, eq in densefuse.equalizers(model)}


def test_a_padded_batch_calibrates_like_the_unpadded_crop():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    # padding of 4 columns: the first two repeat the crop's last two (so the bilinear upsample at the
    # border sees what it sees at the edge of the unpadded crop), the last two are far off
    padded = torch.cat([x, x[..., 6:8], torch.full((2, 3, 8, 2), 100.0)], dim=-1)
    valid = torch.zeros(2, 1, 8, 12, dtype=torch.bool)
    valid[..., :8] = True
    ref, masked, unmasked = TwoSites(), TwoSites(), TwoSites()
    densefuse.calibrate(ref, [{"image": x}])
    table = densefuse.calibrate(masked, [{"image": padded, "valid": valid}])
    densefuse.calibrate(unmasked, [{"image": padded}])
    want, got, bad = _stats(ref), _stats(masked), _stats(unmasked)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(bad[name][1], want[name][1], rtol=1e-2)  # padding would count otherwise
    assert len(table) == 4


def test_valid_positions_are_those_wholly_on_real_pixels():
    valid = torch.ones(1, 1, 8, 8, dtype=torch.bool)
    valid[..., 5:] = False  # 5 real columns
    assert valid_positions(valid, (8, 8))[0, 0].tolist() == [True] * 5 + [False] * 3
    assert valid_positions(valid, (4, 4))[0, 0].tolist() == [True, True, False, False]  # column pair 4-5 is mixed
    assert valid_positions(valid, (2, 2))[0, 0].tolist() == [True, False]
