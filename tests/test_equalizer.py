"""ScaleEqualizer / Fusion / calibrate / fold behaviour on the default UPerNet and small modules."""
import copy
import math

import pytest
import torch
from torch import nn

import densefuse
from densefuse import CalibrationError, Fusion, ScaleEqualizer
from densefuse.layers import ConvBNReLU, DepthwiseSeparableConv
from tests.conftest import fold_mismatch, synthetic_batches


def _fusions(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Fusion)}


def _concat_stats(model, batches):
    """Mean/var of every concat subject entering each fuse block, train-mode BN, pooled over batches."""
    sums = {}
    hooks = []
    for name, f in _fusions(model).items():
        def hook(mod, args, name=name, f=f):
            x = args[0]
            for i, sl in enumerate(f.slices):
                part = x[:, sl].double()
                s = sums.setdefault((name, i), [0.0, 0.0, 0])
                s[0] += part.sum().item()
                s[1] += part.square().sum().item()
                s[2] += part.numel()
        hooks.append(f.fuse.register_forward_pre_hook(hook))
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in hooks:
        h.remove()
    out = {}
    for k, (s1, s2, n) in sums.items():
        mean = s1 / n
        out[k] = (mean, s2 / n - mean**2)
    return out


@pytest.fixture(scope="module")
def setup():
    cfg = densefuse.load_config("configs/seg/synthetic_upernet_r18.yaml")
    torch.manual_seed(0)
    model = densefuse.build_model(cfg)
    calib = synthetic_batches(cfg, n_batches=4, batch_size=4, seed=0)
    fresh = synthetic_batches(cfg, n_batches=2, batch_size=4, seed=1)
    return cfg, model, calib, fresh


def test_default_upernet_has_two_fusion_sites(setup):
    _, model, _, _ = setup
    names = [n for n, _ in densefuse.equalizers(model)]
    assert names == ["decode_head.psp_fusion.equalizer", "decode_head.fpn_fusion.equalizer"]
    fpn = model.decode_head.fpn_fusion
    assert [s.stop - s.start for s in fpn.slices] == [64] * 4


def test_mode_off_shows_disequilibrium_at_fpn_site(setup):
    _, model, _, fresh = setup
    m = copy.deepcopy(model)
    densefuse.set_mode(m, "off")
    stats = _concat_stats(m, fresh)
    fpn = [stats[("decode_head.fpn_fusion", i)][1] for i in range(4)]
    assert max(fpn) / min(fpn) > 1.3
    # the stride-4 branch (not upsampled) has the largest variance: upsampling lowers it
    assert fpn[0] == max(fpn)


def test_calibrate_equalizes_every_concat_subject(setup):
    _, model, calib, fresh = setup
    m = copy.deepcopy(model)
    table = densefuse.calibrate(m, calib)
    assert set(table["site"]) == {"decode_head.psp_fusion", "decode_head.fpn_fusion"}
    assert len(table) == 5 + 4
    fpn = table[table.site == "decode_head.fpn_fusion"]
    assert list(fpn["ratio_h"]) == [1.0, 2.0, 4.0, 8.0]
    assert (fpn["var_before"].iloc[1:] < fpn["var_before"].iloc[0]).all()
    stats = _concat_stats(m, fresh)
    assert len(stats) == 9
    for key, (mean, var) in stats.items():
        assert abs(mean) < 0.05, (key, mean)
        assert abs(var - 1) < 0.05, (key, var)


def test_calibrate_restores_bn_stats_and_modes(setup):
    _, model, calib, _ = setup
    m = copy.deepcopy(model)
    m.train()
    m.encoder.eval()  # a mixed state must come back exactly
    before_modes = {n: mod.training for n, mod in m.named_modules()}
    before_bn = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    densefuse.calibrate(m, calib[:2])
    assert {n: mod.training for n, mod in m.named_modules()} == before_modes
    after = m.state_dict()
    for k, v in before_bn.items():
        assert torch.equal(after[k], v), k


def test_fold_matches_explicit_at_fusion_output(setup):
    _, model, calib, fresh = setup
    explicit = copy.deepcopy(model)
    densefuse.calibrate(explicit, calib)
    folded = copy.deepcopy(explicit)
    densefuse.fold(folded)
    assert all(eq.mode == "fold" for _, eq in densefuse.equalizers(folded))
    explicit.eval()
    folded.eval()
    diffs = fold_mismatch(explicit, folded, fresh[0])
    assert set(diffs) == {"decode_head.psp_fusion", "decode_head.fpn_fusion"}
    assert max(diffs.values()) < 1e-4, diffs
    # the raw fusion conv differs by exactly the per-channel constant moved into BN's running mean
    site_e, site_f = explicit.decode_head.fpn_fusion, folded.decode_head.fpn_fusion
    feats = [torch.randn(2, 64, 32 // r, 32 // r).relu() for r in (1, 2, 4, 8)]
    with torch.no_grad():
        ye = site_e.fuse.conv(site_e.concat(feats, (32, 32)))
        yf = site_f.fuse.conv(site_f.concat(feats, (32, 32)))
    shift = (site_f.fuse.bn.running_mean - site_e.fuse.bn.running_mean).view(1, -1, 1, 1)
    inner = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    assert ((yf - shift - ye)[inner].abs().max() / ye[inner].abs().max()) < 1e-4
    assert shift.abs().max() > 1e-3  # the mean term is real, not zero


def test_fold_rescales_exact_slices():
    torch.manual_seed(0)
    f = Fusion([3, 5], 4, kernel_size=1)
    w0 = f.fuse.conv.weight.detach().clone()
    f.equalizer.mean.copy_(torch.tensor([0.5, 0.25]))
    f.equalizer.std.copy_(torch.tensor([2.0, 4.0]))
    f.equalizer.calibrated.fill_(True)
    f.equalizer._is_calibrated = True
    f.equalizer.fold(f.fold_target())
    w1 = f.fuse.conv.weight.detach()
    assert torch.allclose(w1[:, :3], w0[:, :3] / 2.0)
    assert torch.allclose(w1[:, 3:], w0[:, 3:] / 4.0)


def test_fold_depthwise_first_op_scales_rows():
    torch.manual_seed(0)
    fuse = DepthwiseSeparableConv(6, 8)
    f = Fusion([4, 2], fuse=fuse)
    w0 = fuse.depthwise.conv.weight.detach().clone()
    small = torch.randn(2, 4, 8, 8) * 3 + 1
    big = torch.randn(2, 2, 16, 16) * 0.5 - 2
    # calibrate() feeds image batches; a wrapper turns them into the two branches
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = f

        def forward(self, x):
            return self.f([small, big], size=(16, 16))

    w = Wrap()
    densefuse.calibrate(w, [torch.zeros(2, 1, 1, 1)])
    eq = f.equalizer
    ref = f.eval()([small, big], size=(16, 16)).clone()
    densefuse.fold(w)
    w1 = fuse.depthwise.conv.weight.detach()
    assert torch.allclose(w1[:4], w0[:4] / eq.std[0])
    assert torch.allclose(w1[4:], w0[4:] / eq.std[1])
    out = f([small, big], size=(16, 16))
    assert torch.allclose(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], atol=1e-5, rtol=1e-4)


def test_explicit_pre_upsample_equals_post_upsample():
    torch.manual_seed(0)
    for ac in (False, True):
        f = Fusion([2, 3], 4, align_corners=ac)
        f.equalizer.mean.copy_(torch.tensor([0.3, -1.0]))
        f.equalizer.std.copy_(torch.tensor([0.7, 2.5]))
        f.equalizer.calibrated.fill_(True)
        f.equalizer._is_calibrated = True
        a, b = torch.randn(2, 2, 16, 16), torch.randn(2, 3, 4, 4)
        got = f.concat([a, b])
        up = nn.functional.interpolate(b, size=(16, 16), mode="bilinear", align_corners=ac)
        want = torch.cat([(a - 0.3) / 0.7, (up + 1.0) / 2.5], 1)
        assert torch.allclose(got, want, atol=1e-6)


def test_uncalibrated_use_is_an_error():
    f = Fusion([2, 2], 4)
    x = [torch.randn(2, 2, 4, 4)] * 2
    with pytest.raises(CalibrationError, match="not calibrated"):
        f(x)
    with pytest.raises(CalibrationError, match="uncalibrated"):
        f.equalizer.fold(f.fold_target())
    f.equalizer.set_mode("fold")
    with pytest.raises(CalibrationError, match="not calibrated"):
        f(x)
    f.equalizer.set_mode("off")
    assert f(x).shape == (2, 4, 4, 4)
    with pytest.raises(CalibrationError, match="unknown equalizer mode"):
        f.equalizer.set_mode("bogus")


def test_fold_twice_is_refused(setup):
    _, model, calib, _ = setup
    m = copy.deepcopy(model)
    densefuse.calibrate(m, calib[:1])
    densefuse.fold(m)
    with pytest.raises(CalibrationError, match="already folded"):
        densefuse.fold(m)
    with pytest.raises(CalibrationError, match="already folded"):
        densefuse.calibrate(m, calib[:1])


def test_dead_branch_warns_and_keeps_unit_std():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = Fusion([2, 2], 4)

        def forward(self, x):
            return self.f([x, torch.full_like(x, 3.0)])

    m = Dead()
    with pytest.warns(UserWarning, match="constant"):
        table = densefuse.calibrate(m, [torch.randn(2, 2, 8, 8)])
    assert float(m.f.equalizer.std[1]) == 1.0
    assert math.isclose(float(m.f.equalizer.mean[1]), 3.0, rel_tol=1e-6)
    assert table.loc[1, "var_before"] == pytest.approx(0.0, abs=1e-10)


def test_state_dict_round_trip_keeps_calibration(setup):
    _, model, calib, fresh = setup
    m = copy.deepcopy(model)
    densefuse.calibrate(m, calib[:1])
    sd = m.state_dict()
    keys = [k for k in sd if k.startswith("decode_head.fpn_fusion.equalizer.")]
    assert sorted(keys) == sorted(f"decode_head.fpn_fusion.equalizer.{k}" for k in ("mean", "std", "calibrated", "folded"))
    fresh_model = copy.deepcopy(model)
    with pytest.raises(CalibrationError):
        fresh_model.eval()(fresh[0])
    fresh_model.load_state_dict(sd)
    m.eval()
    fresh_model.eval()
    assert torch.allclose(fresh_model(fresh[0])["out"], m(fresh[0])["out"])
    densefuse.fold(m)
    reloaded = copy.deepcopy(model)
    reloaded.load_state_dict(m.state_dict())
    assert all(eq.mode == "fold" and eq._is_folded for _, eq in densefuse.equalizers(reloaded))


def test_streaming_sums_match_pooled_stats():
    eq = ScaleEqualizer([3, 1])
    xs = [torch.randn(2, 4, 5, 5) * s + s for s in (0.5, 2.0, 1.0)]
    for x in xs:
        eq.observe_concat(x)
    eq.finish_calibration()
    allx = torch.cat(xs).double()
    assert torch.allclose(eq.mean.double(), torch.stack([allx[:, :3].mean(), allx[:, 3:].mean()]), atol=1e-6)
    assert torch.allclose(eq.std.double(), torch.stack([allx[:, :3].std(unbiased=False), allx[:, 3:].std(unbiased=False)]),
                          atol=1e-6)


def test_conv_bn_relu_fusion_block_is_default():
    f = Fusion([4, 4], 8)
    assert isinstance(f.fuse, ConvBNReLU)
    target = f.fold_target()  # looked up when asked, not held by the equalizer
    assert target.conv is f.fuse.conv and target.norm is f.fuse.bn and target.pointwise is None
    assert not any(isinstance(v, nn.Module) for v in vars(f.equalizer).values() if not isinstance(v, dict))
