"""densefuse.smp: scale equalizers plugged into segmentation_models_pytorch models (CPU, random init)."""
from __future__ import annotations

import copy
import functools

import pandas as pd
import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
import yaml

import densefuse
import densefuse.smp as dsmp
from densefuse.config import DEFAULTS, load_config, merge
from densefuse.errors import CalibrationError, ConfigError

ENC = {"encoder_name": "resnet18", "encoder_weights": None, "classes": 3}
#: The architectures of the issue, each in the configuration that has concat fusion sites.
ARCHS = {
    "UPerNet": {},
    "PSPNet": {},
    "DeepLabV3": {},
    "DeepLabV3Plus": {},
    "FPN": {"decoder_merge_policy": "cat"},
    "Segformer": {},
    "Unet": {"decoder_interpolation": "bilinear"},
    "UnetPlusPlus": {"decoder_interpolation": "bilinear"},
    "MAnet": {"decoder_interpolation": "bilinear"},
}
#: Sites per architecture (resnet18, default kwargs): consumer -> groups.
EXPECTED = {
    "UPerNet": {"decoder.psp.out_conv": (512, 256, 256, 256, 256), "decoder.fusion_block": (256,) * 4},
    "PSPNet": {"decoder.conv": (32, 32, 32, 32, 128)},
    "DeepLabV3": {"decoder.aspp.project": (256,) * 5},
    "DeepLabV3Plus": {"decoder.aspp.0.project": (256,) * 5, "decoder.block2": (256, 48)},
    "FPN": {"decoder.dropout": (128,) * 4},
    "Segformer": {"decoder.fuse_stage": (256,) * 5},  # CNN encoder: the 1/2 level is a 5th branch
}
# Batches of 2 used to calibrate and then to measure. A fresh batch of 2 measures a branch with few
# distinct values per channel with a few % of sampling noise: PSPNet's pyramid branches have
# 2 * s^2 values per channel (s = 1, 2, 3, 6), and DeepLabV3's image-pool branch is BatchNorm over
# 2 nearly equal global averages of noise images. Those two average over more batches (with these
# batch counts, DeepLabV3 over 5 seeds and PSPNet over 3 gave at worst |mean| 0.026, |std - 1| 0.025).
N_BATCHES = {"PSPNet": 4, "DeepLabV3": 2}
# 128x128: the branches these checks single out (pyramid pools, the image pool) have the same few values
# per channel at any input size, and the bilinear variance loss is scale-free (tests/test_theory.py);
# a quarter of the pixels of 256x256, the same assertions.
SIZE = 128


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return getattr(smp, arch)(**ENC, **ARCHS[arch])


def images(n: int, seed: int, size: int = SIZE) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, size, size, generator=g) for _ in range(n)]


def table(model: torch.nn.Module) -> dict:
    return {s.consumer: (s.groups, s.interpolated) for s in dsmp.table_sites(model)}


@functools.lru_cache(maxsize=None)
def calibrated(arch: str) -> tuple[torch.nn.Module, pd.DataFrame, pd.DataFrame]:
    """(equalized + calibrated model, calibrate() table, report on fresh batches), at 2x3xSIZExSIZE."""
    model = dsmp.equalize(build(arch))
    n = N_BATCHES.get(arch, 1)
    before = densefuse.calibrate(model, images(n, seed=1))
    after = dsmp.report(model, images(n, seed=2))
    return model, before, after


# ------------------------------------------------------------------------------------------ sites
@pytest.mark.parametrize("arch", list(ARCHS))
def test_probe_finds_the_table_sites(arch: str) -> None:
    model = build(arch)
    found = {s.consumer: (s.groups, s.interpolated) for s in dsmp.probe(model)}
    assert found == table(model)
    assert len(found) >= 1
    if arch in EXPECTED:
        assert {k: v[0] for k, v in found.items()} == EXPECTED[arch]


def test_table_groups_of_nested_and_attention_decoders() -> None:
    unet = table(build("Unet"))
    assert unet["decoder.blocks.0.attention1"] == ((512, 256), (True, False))
    assert len(unet) == 4  # the last block has no skip, hence no concat
    upp = table(build("UnetPlusPlus"))
    # x_0_2 gets UP(x_0_1) and the nested skip [x_1_2, x_2_2, encoder feature]: every branch equalized.
    assert upp["decoder.blocks.x_0_2.attention1"] == ((128, 64, 64, 64), (True, False, False, False))
    manet = table(build("MAnet"))
    assert manet["decoder.blocks.0.conv1"] == ((256, 256), (True, False))


def test_probe_and_auto_sites_on_architectures_outside_the_table() -> None:
    nearest = smp.Unet(**ENC)  # default nearest upsampling keeps the variance
    assert dsmp.table_sites(nearest) is None
    assert dsmp.probe(nearest) == []
    assert [s.groups for s in dsmp.probe(nearest, all_concats=True)][0] == (512, 256)
    with pytest.raises(ConfigError, match="decoder_interpolation='bilinear'"):
        dsmp.equalize(nearest)
    with pytest.raises(ConfigError, match="no fusion site found in Linknet"):
        dsmp.equalize(smp.Linknet(**ENC))
    with pytest.raises(ConfigError, match="decoder_merge_policy='cat'"):
        dsmp.equalize(smp.FPN(**ENC))

    class Custom(torch.nn.Module):  # not smp at all: the probe handles it
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.fuse = torch.nn.Sequential(torch.nn.Conv2d(7, 5, 1, bias=False), torch.nn.BatchNorm2d(5))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            up = F.interpolate(self.a(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            return self.fuse(torch.cat([x, up], dim=1))

    custom = dsmp.equalize(Custom())
    (site,) = dsmp.sites(Custom(), source="probe")
    assert (site.consumer, site.groups, site.interpolated, site.conv, site.norm) == (
        "fuse", (3, 4), (False, True), "fuse.0", "fuse.1")
    x = images(1, seed=3, size=32)[0]
    densefuse.calibrate(custom, [x])
    custom.eval()
    with torch.no_grad():
        ref = custom(x)
        densefuse.fold(custom)  # the probed fold target works as well (1x1 conv: exact)
        torch.testing.assert_close(custom(x), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())


def test_probe_on_an_equalized_model_changes_nothing() -> None:
    model, _, _ = calibrated("DeepLabV3Plus")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert {s.consumer: (s.groups, s.interpolated) for s in dsmp.probe(model)} == table(model)
    for k, v in model.state_dict().items():  # BN running stats and equalizer buffers untouched
        assert torch.equal(v, state[k]), k
    assert all(m.training for m in model.modules())  # the probe runs in eval mode, then restores
    assert all(not eq.observing for _, eq in densefuse.equalizers(model))


# ------------------------------------------------------------------------------------------ statistics
@pytest.mark.parametrize("arch", list(ARCHS))
def test_calibration_equalizes_every_branch(arch: str) -> None:
    model, before, after = calibrated(arch)
    sites = {s.consumer for s in dsmp.table_sites(model)}
    # before: the interpolated branches are off-scale at every site (measured while calibrating)
    ratio = before.groupby("site")["std"].agg(lambda s: s.max() / s.min())
    assert len(ratio) == len(sites)
    assert (ratio > 1.1).all(), ratio.to_dict()
    # after: every branch is standardized on a fresh batch, train-mode BN
    assert set(after["site"]) == sites
    assert len(after) == sum(len(s.groups) for s in dsmp.table_sites(model))
    assert after["mean_after"].abs().max() < 0.05, after.to_string()
    assert (after["std_after"] - 1).abs().max() < 0.05, after.to_string()
    # ... and the fresh-batch "before" column still shows the imbalance
    assert (after.groupby("site")["std"].agg(lambda s: s.max() / s.min()) > 1.1).all()


def test_report_without_batches_uses_the_frozen_stats() -> None:
    model, before, _ = calibrated("UPerNet")
    rep = dsmp.report(model)
    assert list(rep["site"].unique()) == ["decoder.psp.out_conv", "decoder.fusion_block"]
    assert rep["interpolated"].tolist() == [False, True, True, True, True] + [True] * 4
    assert rep["std"].tolist() == pytest.approx(before["std"].tolist(), rel=1e-5)
    assert (rep["std_after"] == 1.0).all() and (rep["mean_after"] == 0.0).all()
    fresh = dsmp.equalize(build("PSPNet"))
    with pytest.raises(CalibrationError, match="not calibrated"):
        dsmp.report(fresh)
    with pytest.raises(CalibrationError, match="no smp scale equalizers"):
        dsmp.report(build("PSPNet"))


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("arch", list(ARCHS))
def test_forward_contract_unchanged(arch: str) -> None:
    plain = build(arch).eval()  # same seed: the weights of the calibrated model before equalize()
    model = calibrated(arch)[0].eval()
    x = images(1, seed=4, size=64)[0]
    with torch.no_grad():
        ref = plain(x)
        out = model(x)
        densefuse.set_mode(model, "off")
        try:
            off = model(x)
        finally:
            densefuse.set_mode(model, "explicit")
    assert isinstance(out, torch.Tensor) and out.shape == ref.shape == (2, 3, 64, 64)
    assert torch.equal(off, ref)  # mode off: the hooks are the identity
    assert not torch.allclose(out, ref, atol=1e-3)  # explicit: the equalizers act


def test_uncalibrated_explicit_forward_raises() -> None:
    model = dsmp.equalize(build("PSPNet"))
    with pytest.raises(CalibrationError, match="not calibrated"):
        model(images(1, seed=4, size=64)[0])
    densefuse.calibrate(model, images(1, seed=4, size=64))
    assert model.training  # calibrate restores the train/eval flags
    assert model(images(1, seed=5, size=64)[0]).shape == (2, 3, 64, 64)


def small_upernet() -> torch.nn.Module:
    torch.manual_seed(0)
    return smp.UPerNet(**ENC, encoder_depth=3, decoder_channels=32)


def test_training_step() -> None:
    model = dsmp.equalize(small_upernet())
    x, y = images(1, seed=5, size=64)[0], torch.randint(0, 3, (2, 64, 64))
    densefuse.calibrate(model, [x])
    eq_state = {k: v.clone() for k, v in model.scale_equalizers.state_dict().items()}
    w0 = model.decoder.fusion_block[0].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grad = model.decoder.fusion_block[0].weight.grad
    assert torch.isfinite(loss) and grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(model.decoder.fusion_block[0].weight, w0)
    for k, v in model.scale_equalizers.state_dict().items():  # frozen: no parameters, no updates
        assert torch.equal(v, eq_state[k]), k
    assert not any(True for _ in model.scale_equalizers.parameters())


def test_compile_and_export_match_eager() -> None:
    model = dsmp.equalize(small_upernet())
    assert len(model.scale_equalizers) == 2
    x = images(1, seed=6, size=64)[0]
    densefuse.calibrate(model, [x])
    model.eval()
    with torch.no_grad():
        ref = model(x)
        off = copy.deepcopy(model)
        densefuse.set_mode(off, "off")
        assert not torch.allclose(off(x), ref)  # the equalizers do change the output
        compiled = torch.compile(model, backend="aot_eager")(x)
    tol = 1e-5 * ref.abs().max().item()
    torch.testing.assert_close(compiled, ref, rtol=1e-4, atol=tol)
    exported = torch.export.export(model, (x,))
    assert any("scale_equalizers" in k for k in exported.state_dict)
    torch.testing.assert_close(exported.module()(x), ref, rtol=1e-4, atol=tol)


# ------------------------------------------------------------------------------------------ fold
def _run_site(model: torch.nn.Module, site: dsmp.Site, x: torch.Tensor) -> torch.Tensor:
    """The consumer (its pre-hook equalizes in explicit mode), then the fold conv and its BN when
    they sit outside the consumer (Unet: attention1 -> conv1; FPN-cat: dropout -> head conv)."""
    out = model.get_submodule(site.consumer)(x)
    if not site.conv.startswith(site.consumer + "."):
        out = model.get_submodule(site.conv)(out)
        if site.norm:
            out = model.get_submodule(site.norm)(out)
    return out


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fold_matches_explicit(arch: str) -> None:
    """densefuse.fold(model), then every site compared on the same input in eval mode: exact for
    1x1 convs, exact in the interior for 3x3 convs (zero padding differs at the border)."""
    explicit = copy.deepcopy(calibrated(arch)[0]).eval()
    folded = densefuse.fold(copy.deepcopy(explicit))
    g = torch.Generator().manual_seed(7)
    table_sites = dsmp.table_sites(explicit)
    assert len(table_sites) == len(list(densefuse.equalizers(folded)))
    with torch.no_grad():
        for site in table_sites:
            assert site.conv is not None, f"{site.consumer} has no fold target"
            eq = explicit.scale_equalizers[site.key]
            # the concat as it arrives: per-branch calibrated mean and std (a non-zero mean matters)
            mean = torch.repeat_interleave(eq.mean, torch.tensor(eq.groups)).view(1, -1, 1, 1)
            std = torch.repeat_interleave(eq.std, torch.tensor(eq.groups)).view(1, -1, 1, 1)
            x = mean + std * torch.randn(2, sum(eq.groups), 12, 12, generator=g)
            ref, got = _run_site(explicit, site, x), _run_site(folded, site, x)
            conv = explicit.get_submodule(site.conv)
            m = conv.padding[0] * conv.dilation[0]
            if m:
                ref, got = ref[..., m:-m, m:-m], got[..., m:-m, m:-m]
            tol = 1e-5 * ref.abs().max().item()
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=tol, msg=f"{arch} {site.consumer}")
            assert folded.scale_equalizers[site.key].mode == "fold"


@pytest.mark.parametrize("arch", ["DeepLabV3", "PSPNet", "Segformer"])
def test_fold_whole_model_exact_for_1x1_consumers(arch: str) -> None:
    model, _, _ = calibrated(arch)
    model = copy.deepcopy(model).eval()
    x = images(1, seed=8, size=64)[0]
    with torch.no_grad():
        ref = model(x)
        densefuse.fold(model)
        got = model(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    assert all(eq.mode == "fold" for _, eq in densefuse.equalizers(model))
    with pytest.raises(CalibrationError, match="already folded"):
        densefuse.fold(model)


# ------------------------------------------------------------------------------------------ state_dict
def test_state_dict_keys_and_checkpoints() -> None:
    plain = build("DeepLabV3Plus")
    plain_sd = plain.state_dict()
    model, _, _ = calibrated("DeepLabV3Plus")
    keys = set(model.state_dict())
    assert set(plain_sd) <= keys
    assert all(k.startswith("scale_equalizers.") for k in keys - set(plain_sd))
    assert keys - set(plain_sd)
    # a plain smp (or hub) checkpoint loads; only the equalizer keys are missing
    fresh = dsmp.equalize(build("DeepLabV3Plus", seed=1))
    res = fresh.load_state_dict(dict(plain_sd), strict=False)
    assert res.unexpected_keys == [] and res.missing_keys
    assert all(k.startswith("scale_equalizers.") for k in res.missing_keys)
    # an equalized checkpoint restores the calibration (strict)
    other = dsmp.equalize(build("DeepLabV3Plus", seed=2))
    other.load_state_dict(model.state_dict())
    x = images(1, seed=9, size=64)[0]
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), copy.deepcopy(model).eval()(x))
    # copies keep working: the hooks follow the copied equalizers
    dup = copy.deepcopy(model)
    assert dup.decoder.block2.__dict__["densefuse_equalizer"] is dup.scale_equalizers["decoder__block2"]


# ------------------------------------------------------------------------------------------ errors
def test_bad_input_gives_clear_errors() -> None:
    with pytest.raises(ConfigError, match="expects a torch nn.Module"):
        dsmp.equalize("UPerNet")  # type: ignore[arg-type]
    model = dsmp.equalize(build("PSPNet"))
    with pytest.raises(CalibrationError, match="already equalized"):
        dsmp.equalize(model)
    with pytest.raises(ConfigError, match="unknown site source"):
        dsmp.sites(build("PSPNet"), source="guess")
    with pytest.raises(ConfigError, match="not in the fusion-site table"):
        dsmp.sites(smp.Linknet(**ENC), source="table")
    plain = build("PSPNet")
    keys = set(plain.state_dict())
    with pytest.raises(CalibrationError, match="unknown equalizer mode"):
        dsmp.equalize(plain, mode="explict")
    bad = dsmp.Site("decoder.conv", (32, 32), (True, False), conv="decoder.conv.0")
    with pytest.raises(ConfigError, match="bad fusion site 'decoder.conv'"):
        dsmp.equalize(plain, sites=[bad])  # 64 channels listed, the conv takes 256
    with pytest.raises(ConfigError, match="empty list of fusion sites"):
        dsmp.equalize(plain, sites=[])
    with pytest.raises(ConfigError, match=r"probe could not run .*example_input"):
        dsmp.probe(plain, example_input=torch.zeros(1, 3, 50, 50))  # not divisible by 8
    with pytest.raises(ConfigError, match="bad fusion site 'decoder.nope'"):
        dsmp.equalize(plain, sites=[dsmp.Site("decoder.nope", (1, 1), (True, False))])
    # a failed call leaves the model untouched: no container, no hooks, same keys
    assert set(plain.state_dict()) == keys
    assert not any(m._forward_pre_hooks for m in plain.modules())
    dsmp.equalize(plain)


# ------------------------------------------------------------------------------------------ config
def _cfg(**smp_spec: object) -> dict:
    return merge(DEFAULTS, {"model": {"type": "smp", "num_classes": 5, "smp": smp_spec}})


def test_build_smp_model() -> None:
    cfg = _cfg(arch="upernet", encoder_name="resnet18", kwargs={"decoder_channels": 32})
    model = densefuse.build_model(cfg)
    assert isinstance(model, smp.UPerNet)
    assert [eq.mode for _, eq in densefuse.equalizers(model)] == ["explicit", "explicit"]
    assert model.scale_equalizers["decoder__fusion_block"].groups == (32,) * 4
    x = images(1, seed=10, size=64)[0]
    densefuse.calibrate(model, [x])
    assert model.eval()(x).shape == (2, 5, 64, 64)
    off = dsmp.build_smp_model(merge(cfg, {"model": {"equalizer": {"mode": "off"}}}))
    assert [eq.mode for _, eq in densefuse.equalizers(off)] == ["off", "off"]
    assert len(dsmp.report(off, [x])) == 9  # reports work in mode off
    # the baseline of an architecture without concat fusion still builds in mode off (with a warning)
    with pytest.warns(UserWarning, match="without scale equalizers"):
        link = dsmp.build_smp_model(merge(_cfg(arch="Linknet"), {"model": {"equalizer": {"mode": "off"}}}))
    assert isinstance(link, smp.Linknet) and not list(densefuse.equalizers(link))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"arch": "UPerNett"}, r"unknown smp architecture .*did you mean 'UPerNet'"),
        ({"arch": "UPerNet", "kwargs": {"decoder_chanels": 64}},
         r"model\.smp\.kwargs\.decoder_chanels.*did you mean 'decoder_channels'"),
        ({"arch": "UPerNet", "kwargs": {"classes": 3}}, r"model\.smp\.kwargs\.classes.*model\.num_classes"),
        ({"arch": "UPerNet", "kwargs": {"encoder_weights": "imagenet"}}, r"never downloads"),
        ({"arch": "UPerNet", "encoder_name": "resnet181"}, r"unknown smp encoder.*did you mean"),
        ({"arch": "Unet", "kwargs": {"decoder_interpolation": "bilinear", "encoder_depth": 7}},
         r"cannot build smp\.Unet"),
        ({"arch": "Linknet"}, r"no fusion site found in Linknet"),
        ({"arch": "UPerNet", "encoder": "resnet18"}, r"model\.smp\.encoder.*did you mean 'encoder_name'"),
    ],
)
def test_build_smp_model_config_errors(spec: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        dsmp.build_smp_model(_cfg(**spec))


def test_example_config() -> None:
    """configs/seg/synthetic_smp_upernet_r18.yaml loads (every key known) and builds through build_model."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "configs" / "seg" / "synthetic_smp_upernet_r18.yaml"
    assert yaml.safe_load(path.read_text())["_base_"] == ["_base_/synthetic.yaml"]
    cfg = load_config(path)
    assert cfg.model.type == "smp" and cfg.model.smp.arch == "UPerNet" and cfg.model.smp.encoder_name == "resnet18"
    model = densefuse.build_model(cfg)
    assert isinstance(model, smp.UPerNet)
    assert [eq.mode for _, eq in densefuse.equalizers(model)] == [cfg.model.equalizer.mode] * 2
    x = images(1, seed=11, size=64)[0]
    densefuse.calibrate(model, [x])
    with torch.no_grad():
        assert model.eval()(x).shape == (2, cfg.model.num_classes, 64, 64)
