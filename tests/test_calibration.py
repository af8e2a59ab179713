"""calibrate() in dependency order, measure() on the live forward, fold() that finds its convs when it runs.

The promise checked here: after calibrate(), every branch of every fusion site enters its fusion conv
at mean 0 and variance 1 in the real forward (train-mode BN, dropout off), chained sites included.

Batch size 2: a pyramid-pooling branch has batch * s^2 values per channel for BatchNorm (train mode) to
normalize, so its statistics vary from batch to batch. With batch 2 the pool-1 branch is exact (BN maps
two values to -1 and +1), and the tolerance is 0.02, widened to 4 standard errors of the batch-to-batch
spread only where that spread is larger (smp PSPNet's 32-channel pyramid branches: over 8 fresh batches
their variance moves by up to 0.09 between sets of fresh images, whatever the calibration). A bias such as
the 1.05-1.18 of a one-pass calibration is many standard errors away.
"""
from __future__ import annotations

import copy
import functools
import warnings

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

import densefuse
import densefuse.smp as dsmp
from densefuse import CalibrationError, Fusion
from densefuse.calibration import site_name
from densefuse.equalizer import border_offset
from densefuse.layers import ConvBNReLU
from tests.conftest import DEFAULT_CONFIG, fold_mismatch, synthetic_batches

#: fresh batches the live statistics are averaged over
FRESH = 8
#: calibration batches and batch size of the promise tests (see the module docstring on the batch size)
CAL_BATCHES, BATCH = 32, 2


# ------------------------------------------------------------------------------------------ helpers
def upernet_cfg(channels: int, size: int):
    return densefuse.load_config(DEFAULT_CONFIG, overrides=[
        f"model.decode_head.channels={channels}", f"data.crop_size=[{size},{size}]", f"data.kwargs.size=[{size},{size}]"])


def consumers(model: nn.Module) -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """Per site: the module whose input is the equalized concat, and the branch sizes."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Fusion):
            out[name] = (m.fuse, m.in_channels)
    for _, eq in densefuse.equalizers(model):
        if isinstance(eq, dsmp.SmpEqualizer):
            out[eq.site.consumer] = (model.get_submodule(eq.site.consumer), eq.groups)
    return out


@torch.no_grad()
def live_stats(model: nn.Module, batches: list[torch.Tensor], per_batch: bool = False) -> dict:
    """Independent of densefuse: forward pre-hooks on every fusion conv's input, train-mode BN, dropout
    off, moments pooled over ``batches``. Returns (mean, var) per (site, branch); with ``per_batch``,
    also the standard errors of the mean and of the variance over the batches. Works on a copy."""
    model = copy.deepcopy(model)
    sums: dict[tuple[str, int], list[list[float]]] = {}
    handles = []
    for name, (mod, groups) in consumers(model).items():
        def hook(_m, args, name=name, groups=groups):
            for i, part in enumerate(torch.split(args[0], groups, dim=1)):
                p = part.double()
                sums.setdefault((name, i), []).append([p.sum().item(), p.square().sum().item(), p.numel()])
        handles.append(mod.register_forward_pre_hook(hook))  # after smp's equalizer hook: sees its output
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    for x in batches:
        model(x)
    for h in handles:
        h.remove()
    out = {}
    for k, rows in sums.items():
        t = torch.tensor(rows, dtype=torch.float64)
        s1, s2, n = t.sum(0).tolist()
        mean = s1 / n
        out[k] = (mean, s2 / n - mean**2)
        if per_batch:
            bm = t[:, 0] / t[:, 2]
            bv = t[:, 1] / t[:, 2] - bm.square()
            se = lambda v: float(v.std() / len(v) ** 0.5)  # noqa: E731
            out[k] += (se(bm), se(bv))
    return out


def assert_promise(stats: dict, tol: float = 0.02, noise_band: float = 4.0) -> None:
    """|mean| and |var - 1| within ``tol``, or within ``noise_band`` standard errors of the batch-to-batch
    sampling noise where that is wider (pooled branches with a few values per channel and batch)."""
    assert stats
    bad = {}
    for k, (m, v, *se) in stats.items():
        se_m, se_v = se if se else (0.0, 0.0)
        if abs(m) > max(tol, noise_band * se_m) or abs(v - 1) > max(tol, noise_band * se_v):
            bad[k] = {"mean": round(m, 4), "var": round(v, 4), "se_mean": round(se_m, 4), "se_var": round(se_v, 4)}
    assert not bad, f"branches off mean 0 / variance 1 by more than {tol} (or {noise_band} standard errors): {bad}"


def noise(n: int, seed: int, size: int, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


# ------------------------------------------------------------------------------------------ the promise
@functools.lru_cache(maxsize=None)
def calibrated_upernet(channels: int, size: int, n_batches: int = CAL_BATCHES, batch: int = BATCH):
    cfg = upernet_cfg(channels, size)
    torch.manual_seed(0)
    model = densefuse.build_model(cfg)
    table = densefuse.calibrate(model, synthetic_batches(cfg, n_batches=n_batches, batch_size=batch, seed=0))
    return cfg, model, table


def quick_upernet():
    """A calibrated default UPerNet for the fold and measure checks (which need no precise stats)."""
    return calibrated_upernet(64, 128, 2, 2)


@pytest.mark.parametrize(("channels", "size"), [
    (64, 128),
    pytest.param(256, 128, marks=pytest.mark.slow),
    pytest.param(64, 256, marks=pytest.mark.slow),
    pytest.param(256, 256, marks=pytest.mark.slow),
])
def test_densefuse_upernet_every_branch_enters_at_mean0_var1(channels: int, size: int) -> None:
    cfg, model, table = calibrated_upernet(channels, size)
    # the FPN fusion is downstream of the PPM fusion: measured in a second pass, with PPM equalizing
    assert table.attrs["passes"] == 2
    assert table.groupby("site", sort=False)["pass"].first().to_dict() == {
        "decode_head.psp_fusion": 1, "decode_head.fpn_fusion": 2}
    fresh = synthetic_batches(cfg, n_batches=FRESH, batch_size=BATCH, seed=1)
    assert_promise(live_stats(model, fresh, per_batch=True))


SMP_ARCHS = {
    "UPerNet": {},
    "PSPNet": {},
    "DeepLabV3Plus": {},
    "FPN": {"decoder_merge_policy": "cat"},
}


@functools.lru_cache(maxsize=None)
def calibrated_smp(arch: str, size: int = 128, n_batches: int = 16, batch: int = BATCH):
    torch.manual_seed(0)
    model = dsmp.equalize(getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=3,
                                             **SMP_ARCHS[arch]))
    table = densefuse.calibrate(model, noise(n_batches, seed=1, size=size, batch=batch))
    return model, table


def quick_smp(arch: str):
    return calibrated_smp(arch, 64, 2)


@pytest.mark.parametrize("arch", list(SMP_ARCHS))
def test_smp_every_branch_enters_at_mean0_var1(arch: str) -> None:
    model, table = calibrated_smp(arch)
    chained = {"UPerNet": 2, "PSPNet": 1, "DeepLabV3Plus": 2, "FPN": 1}
    assert table.attrs["passes"] == chained[arch]
    assert_promise(live_stats(model, noise(FRESH, seed=2, size=128), per_batch=True))


# ------------------------------------------------------------------------------------------ passes
class Chain(nn.Module):
    """``depth`` fusions in a row, each fusing the previous output with an upsampled side branch."""

    def __init__(self, depth: int, mode: str = "explicit") -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.side = nn.ModuleList(nn.Conv2d(3, 4, 3, stride=2, padding=1) for _ in range(depth))
        self.fusions = nn.ModuleList(
            Fusion([4, 4], fuse=nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), nn.LeakyReLU(0.2)), mode=mode)
            for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        for side, fusion in zip(self.side, self.fusions):
            y = fusion([y * 3 + 1, side(x)], size=y.shape[-2:])
        return y


class Parallel(Chain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return sum(f([y, s(x)], size=y.shape[-2:]) for s, f in zip(self.side, self.fusions))


@pytest.mark.parametrize(("model", "passes"), [
    (Chain(3), 3), (Parallel(3), 1), (Chain(3, mode="off"), 1), (Chain(1), 1)])
def test_one_pass_per_level_of_the_site_graph(model: nn.Module, passes: int) -> None:
    torch.manual_seed(0)
    batches = noise(3, seed=4, size=16)
    table = densefuse.calibrate(model, batches)
    assert table.attrs["passes"] == passes and table.attrs["images"] == 6
    assert sorted(table["pass"].unique()) == list(range(1, passes + 1))
    if passes == 3:  # chained: fusion k is frozen in pass k
        assert table.groupby("site", sort=False)["pass"].first().tolist() == [1, 2, 3]
    if model.fusions[0].equalizer.mode != "off":
        # the same batches again: every site sees mean 0 / variance 1 (up to float rounding)
        assert_promise(live_stats(model, batches), tol=1e-4)


def test_batches_as_generator_or_function_give_the_same_calibration() -> None:
    batches = noise(3, seed=5, size=16)
    torch.manual_seed(0)
    ref = densefuse.calibrate(Chain(2), batches)
    for source in (iter(batches), (b for b in batches), lambda: iter(batches)):
        torch.manual_seed(0)
        model = Chain(2)
        got = densefuse.calibrate(model, source)
        assert got.attrs["passes"] == 2
        torch.testing.assert_close(torch.tensor(got["std"].to_numpy()), torch.tensor(ref["std"].to_numpy()))


def test_calibrate_restores_bn_buffers_dropout_and_train_flags() -> None:
    model, _ = quick_smp("PSPNet")
    model = copy.deepcopy(model)
    model.train()
    model.encoder.eval()
    flags = {n: m.training for n, m in model.named_modules()}
    bufs = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    densefuse.calibrate(model, noise(1, seed=6, size=64))
    densefuse.measure(model, noise(1, seed=6, size=64))
    assert {n: m.training for n, m in model.named_modules()} == flags
    for k, v in model.state_dict().items():
        if k in bufs:
            assert torch.equal(v, bufs[k]), k
    assert all(not (eq.observing or eq.measuring or eq.emulate_fold) for _, eq in densefuse.equalizers(model))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_images_must_be_positive(bad) -> None:
    with pytest.raises(CalibrationError, match=f"num_images must be a positive number of images.*{bad!r}"):
        densefuse.calibrate(Chain(1), noise(1, seed=0, size=16), num_images=bad)
    with pytest.raises(CalibrationError, match="num_images must be a positive"):
        densefuse.measure(Chain(1), noise(1, seed=0, size=16), num_images=bad)


def test_fewer_images_than_asked_calibrates_with_a_warning() -> None:
    model = Chain(2)
    with pytest.warns(UserWarning, match="asked for 64 images but the batches held only 4"):
        table = densefuse.calibrate(model, noise(2, seed=0, size=16), num_images=64)
    assert table.attrs["images"] == 4 and all(eq.is_calibrated for _, eq in densefuse.equalizers(model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert densefuse.calibrate(Chain(2), noise(3, seed=0, size=16), num_images=4).attrs["images"] == 4


# ------------------------------------------------------------------------------------------ measure
@pytest.mark.parametrize("which", ["densefuse", "smp"])
def test_measure_agrees_with_an_independent_hook(which: str) -> None:
    if which == "densefuse":
        cfg, model, _ = quick_upernet()
        batches = synthetic_batches(cfg, n_batches=1, batch_size=2, seed=2)
    else:
        model, _ = quick_smp("UPerNet")
        batches = noise(1, seed=7, size=64)
    table = densefuse.measure(model, batches).set_index(["site", "branch"])
    after = live_stats(model, batches)
    assert set(after) == set(table.index)
    for key, (mean, var) in after.items():
        assert table.loc[key, "mean_after"] == pytest.approx(mean, abs=1e-4), key
        assert table.loc[key, "var_after"] == pytest.approx(var, rel=1e-4), key
    # "before": the same forward with only that site switched off
    for name, eq in densefuse.equalizers(model):
        site = site_name(name, eq)
        one_off = copy.deepcopy(model)
        dict(densefuse.equalizers(one_off))[name].mode = "off"
        before = live_stats(one_off, batches)
        for i in range(eq.num_groups):
            assert table.loc[(site, i), "mean"] == pytest.approx(before[(site, i)][0], abs=1e-4), (site, i)
            assert table.loc[(site, i), "var_before"] == pytest.approx(before[(site, i)][1], rel=1e-4), (site, i)


def test_measure_sees_a_folded_model_as_equalized() -> None:
    model, _ = quick_smp("PSPNet")  # 1x1 consumer: folding is exact
    folded = densefuse.fold(copy.deepcopy(model))
    batches = noise(2, seed=8, size=64)
    a, b = densefuse.measure(model, batches), densefuse.measure(folded, batches)
    torch.testing.assert_close(torch.tensor(b["var_after"].to_numpy()), torch.tensor(a["var_after"].to_numpy()),
                               rtol=1e-4, atol=1e-5)
    assert (b["mode"] == "fold").all() and (b["std"] != b["std_after"]).all()


# ------------------------------------------------------------------------------------------ fold
def _copying_sync_bn(model: nn.Module) -> nn.Module:
    """SyncBatchNorm conversion that copies the running stats (as a conversion is free to do)."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.running_mean = m.running_mean.clone()
            m.running_var = m.running_var.clone()
    return model


def test_fold_after_sync_bn_conversion_changes_the_modules_in_the_model() -> None:
    cfg, model, _ = quick_upernet()
    model = copy.deepcopy(model)
    old_bn = model.decode_head.fpn_fusion.fuse.bn
    old_rm = old_bn.running_mean.clone()
    model = _copying_sync_bn(model)
    site = model.decode_head.fpn_fusion
    site.fuse.conv = copy.deepcopy(site.fuse.conv)  # a replaced conv, too
    explicit = copy.deepcopy(model).eval()
    bn, conv = site.fuse.bn, site.fuse.conv
    rm, w = bn.running_mean.clone(), conv.weight.detach().clone()
    densefuse.fold(model)
    assert isinstance(bn, nn.SyncBatchNorm) and site.fuse.bn is bn and site.fuse.conv is conv
    assert not torch.equal(bn.running_mean, rm) and not torch.equal(conv.weight, w)  # the modules in the model
    assert torch.equal(old_bn.running_mean, old_rm)  # the module that left the model is untouched
    x = synthetic_batches(cfg, n_batches=1, batch_size=2, seed=3)[0]
    diffs = fold_mismatch(explicit, model.eval(), x)
    assert max(diffs.values()) < 1e-4, diffs  # by output: each site's interior matches explicit


def test_fold_after_a_state_dict_round_trip_into_a_fresh_model() -> None:
    cfg, model, _ = quick_upernet()
    torch.manual_seed(1)
    fresh = densefuse.build_model(cfg)
    fresh.load_state_dict(model.state_dict())
    densefuse.fold(fresh)
    x = synthetic_batches(cfg, n_batches=1, batch_size=2, seed=3)[0]
    diffs = fold_mismatch(copy.deepcopy(model).eval(), fresh.eval(), x)
    assert max(diffs.values()) < 1e-4, diffs
    # smp: a fresh equalized model loads the calibration and folds into its own convs
    smodel, _ = quick_smp("DeepLabV3Plus")
    torch.manual_seed(1)
    sfresh = dsmp.equalize(smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None, classes=3))
    sfresh.load_state_dict(smodel.state_dict())
    ref = densefuse.fold(copy.deepcopy(smodel))
    densefuse.fold(sfresh)
    for (k, a), (_, b) in zip(ref.state_dict().items(), sfresh.state_dict().items()):
        torch.testing.assert_close(b, a, msg=k)


class Wrapper(nn.Module):
    """Holds the model as ``module``, like DistributedDataParallel."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor):
        return self.module(x)


@pytest.mark.parametrize("wrap", ["ddp", "compile"])
@pytest.mark.parametrize("which", ["densefuse", "smp"])
def test_fold_through_a_wrapper_resolves_the_right_convs(wrap: str, which: str) -> None:
    if which == "densefuse":
        _, base, _ = quick_upernet()
    else:
        base, _ = quick_smp("DeepLabV3Plus")
    ref = densefuse.fold(copy.deepcopy(base))
    model = copy.deepcopy(base)
    wrapped = Wrapper(model) if wrap == "ddp" else torch.compile(model, backend="eager")
    assert densefuse.fold(wrapped) is wrapped
    for (k, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(b, a, msg=k)
    assert any(not torch.equal(a, b) for a, b in zip(ref.state_dict().values(), base.state_dict().values()))


def test_fold_refuses_a_site_without_a_usable_conv_and_leaves_the_model_untouched() -> None:
    model, _ = quick_smp("PSPNet")
    model = copy.deepcopy(model)
    model.decoder.conv[0] = nn.Identity()  # the site's conv is gone
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CalibrationError, match=r"fusion site 'decoder\.conv'.*(conv|Conv2d)"):
        densefuse.fold(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    class NoConv(nn.Module):
        def __init__(self, fuse: nn.Module) -> None:
            super().__init__()
            self.f = Fusion([2, 2], fuse=fuse)

        def forward(self, x):
            return self.f([x, F.avg_pool2d(x, 2)], size=x.shape[-2:])

    for fuse, match in [(nn.Identity(), "no Conv2d to fold into"),
                        (ConvBNReLU(4, 4, norm="gn"), "no bias and no BatchNorm")]:
        m = NoConv(fuse)
        densefuse.calibrate(m, [torch.randn(2, 2, 8, 8)])
        with pytest.raises(CalibrationError, match=rf"fusion site 'f'.*{match}"):
            densefuse.fold(m)
        assert not m.f.equalizer.is_folded


# ------------------------------------------------------------------------------------------ fold vs explicit
def test_fold_border_difference_is_the_padded_mean_term() -> None:
    """Per site: the folded fusion conv differs from explicit by exactly :func:`border_offset`, which
    is zero in the interior."""
    cfg, model, _ = quick_upernet()
    explicit = copy.deepcopy(model).eval()
    folded = densefuse.fold(copy.deepcopy(model)).eval()
    x = synthetic_batches(cfg, n_batches=1, batch_size=2, seed=3)[0]
    inputs = {}
    fusions = {n: m for n, m in explicit.named_modules() if isinstance(m, Fusion)}
    handles = [f.register_forward_pre_hook(lambda _m, a, kw, n=n: inputs.__setitem__(n, (a, kw)), with_kwargs=True)
               for n, f in fusions.items()]
    with torch.no_grad():
        explicit(x)
    for h in handles:
        h.remove()
    for name, site_e in fusions.items():
        site_f = folded.get_submodule(name)
        args, kwargs = inputs[name]
        with torch.no_grad():
            ye = site_e.fuse.conv(site_e.concat(*args, **kwargs))
            yf = site_f.fuse.conv(site_f.concat(*args, **kwargs))
            c = (site_f.fuse.bn.running_mean - site_e.fuse.bn.running_mean).view(1, -1, 1, 1)
            want = border_offset(site_e.equalizer, site_e.fuse.conv, ye.shape[-2:])
        got = yf - c - ye
        scale = ye.abs().max()
        assert ((got - want).abs().max() / scale) < 1e-4, name
        assert want[..., 1:-1, 1:-1].abs().max() / scale < 1e-6  # interior: exact
        assert want.abs().max() / scale > 1e-3, name  # the border term is real


def test_fold_vs_explicit_whole_model_interior_exact() -> None:
    """The whole default UPerNet in eval mode: equal away from the border (the PPM site at 1/32
    spreads its border through the FPN), different but finite near it."""
    _, model, _ = quick_upernet()
    explicit = copy.deepcopy(model).eval()
    folded = densefuse.fold(copy.deepcopy(model)).eval()
    x = synthetic_batches(upernet_cfg(64, 256), n_batches=1, batch_size=2, seed=3)[0]
    with torch.no_grad():
        a, b = explicit(x)["out"], folded(x)["out"]
    m = 80  # px: one stride-32 cell, spread by the FPN upsampling and the 3x3 convs after it
    inner = (slice(None), slice(None), slice(m, -m), slice(m, -m))
    assert ((a - b)[inner].abs().max() / a.abs().max()) < 1e-4
    assert ((a - b).abs().max() / a.abs().max()) > 1e-3  # the border does differ
    assert torch.isfinite(b).all()
