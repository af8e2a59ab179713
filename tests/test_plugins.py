"""densefuse.equalize on models densefuse did not write (HuggingFace transformers, smp, plain modules), and
shipping them: export_plain, save_pretrained / from_pretrained, load_equalized, ONNX, TorchScript, sum sites.

Tiny random configs only (nothing is downloaded); CPU; 64x64 inputs.
"""
import functools
import logging
import warnings

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

import densefuse
from densefuse.errors import CalibrationError, DataError
from densefuse.plugins import export_file

transformers = pytest.importorskip("transformers")

SIZE = 64


def images(n: int, seed: int, size: int = SIZE, batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, size, size, generator=g) for _ in range(n)]


def hf_upernet() -> nn.Module:
    torch.manual_seed(0)
    bb = transformers.ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1],
                                     out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = transformers.UperNetConfig(backbone_config=bb, hidden_size=16, num_labels=3, use_auxiliary_head=False)
    return transformers.UperNetForSemanticSegmentation(cfg)


def hf_segformer() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 32, 64], decoder_hidden_size=16,
                                       num_labels=3, num_attention_heads=[1, 1, 2, 2])
    return transformers.SegformerForSemanticSegmentation(cfg)


def hf_dpt() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                                 image_size=SIZE, patch_size=16, backbone_out_indices=[0, 1, 2, 3],
                                 neck_hidden_sizes=[8, 16, 32, 64], fusion_hidden_size=16, head_hidden_size=8)
    return transformers.DPTForDepthEstimation(cfg)


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model.eval()(x)
    return getattr(out, "logits", getattr(out, "predicted_depth", out))


# ------------------------------------------------------------------------------------------ HuggingFace
@functools.lru_cache(maxsize=None)
def hf_calibrated(name: str) -> tuple[nn.Module, list]:
    model = {"upernet": hf_upernet, "segformer": hf_segformer}[name]()
    sites = densefuse.equalize(model)
    densefuse.calibrate(model, images(2, seed=1))
    return model, sites


@pytest.mark.parametrize("name, expected", [
    ("upernet", {"decode_head.bottleneck": ("decode_head.bottleneck.conv", "decode_head.bottleneck.batch_norm"),
                 "decode_head.fpn_bottleneck": ("decode_head.fpn_bottleneck.conv",
                                                "decode_head.fpn_bottleneck.batch_norm")}),
    # the concat goes straight into a bias-free conv; its BatchNorm is a sibling module, found by data flow
    ("segformer", {"decode_head.linear_fuse": ("decode_head.linear_fuse", "decode_head.batch_norm")}),
])
def test_hf_models_equalize_calibrate_and_fold_with_no_hand_written_site(name, expected, tmp_path):
    model, sites = hf_calibrated(name)
    assert {s.consumer: (s.conv, s.norm) for s in sites} == expected
    live = densefuse.measure(model, images(2, seed=1))  # the calibration images, in the live forward
    assert live["var_after"].between(0.95, 1.05).all(), live
    assert live["var_before"].max() / live["var_before"].min() > 1.5  # there was an imbalance to fix
    x = images(1, seed=5, batch=1)[0]
    ref = logits(model, x)
    plain = densefuse.export_plain(model)
    assert type(plain) is type(model) and not hasattr(plain, "scale_equalizers")
    fresh = type(model)(model.config.__class__.from_dict(plain.config.to_dict()))
    fresh.load_state_dict(plain.state_dict(), strict=True)  # the original keys, nothing else
    out = logits(plain, x)
    if name == "segformer":  # 1x1 fusion conv: the fold is exact everywhere
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    plain.save_pretrained(tmp_path / "plain")
    again = type(model).from_pretrained(tmp_path / "plain")
    torch.testing.assert_close(logits(again, x), out, rtol=0, atol=1e-7)
    # the equalized model itself: the config records the sites, load_equalized re-attaches them
    model.save_pretrained(tmp_path / "eq")
    back = densefuse.load_equalized(tmp_path / "eq")
    assert [s.consumer for s in densefuse.smp.sites(back, source="probe")] == list(expected)
    torch.testing.assert_close(logits(back, x), ref, rtol=0, atol=0)
    with pytest.raises(DataError, match="no densefuse equalization record"):
        densefuse.load_equalized(tmp_path / "plain")


def test_hf_from_pretrained_of_an_equalized_save_is_not_silent(tmp_path, caplog):
    """A plain HuggingFace class loading an explicit-mode save names the equalizer weights it leaves out."""
    model, _ = hf_calibrated("segformer")
    model.save_pretrained(tmp_path / "eq")
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        transformers.SegformerForSemanticSegmentation.from_pretrained(tmp_path / "eq")
    said = caplog.text + " ".join(str(w.message) for w in caught)
    assert "scale_equalizers" in said


# ------------------------------------------------------------------------------------------ smp Hub API
SMP = {
    "UPerNet": {"decoder_channels": 32},
    "DeepLabV3Plus": {"decoder_channels": 32},
    "FPN": {"decoder_merge_policy": "cat", "decoder_pyramid_channels": 64, "decoder_segmentation_channels": 32},
}


def smp_model(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(smp, arch)(encoder_name="resnet18", encoder_weights=None, classes=3, **SMP[arch])


@pytest.mark.parametrize("arch", list(SMP))
def test_smp_models_ship_through_the_hub_api(arch, tmp_path):
    model = smp_model(arch)
    densefuse.equalize(model)
    densefuse.calibrate(model, images(2, seed=1))
    x = images(1, seed=5, batch=1)[0]
    ref = logits(model, x)
    model.save_pretrained(tmp_path / "eq")
    # smp's own loader refuses the equalizer keys (strict): an explicit-mode save never loads silently wrong
    with pytest.raises(RuntimeError, match="scale_equalizers"):
        smp.from_pretrained(tmp_path / "eq")
    torch.testing.assert_close(logits(densefuse.load_equalized(tmp_path / "eq"), x), ref, rtol=0, atol=0)
    plain = densefuse.export_plain(model)
    assert type(plain) is type(model)
    smp_model(arch, seed=3).load_state_dict(plain.state_dict(), strict=True)
    plain.save_pretrained(tmp_path / "plain")
    again = smp.from_pretrained(tmp_path / "plain")
    torch.testing.assert_close(logits(again, x), logits(plain, x), rtol=0, atol=0)


def test_export_plain_names_every_site_it_cannot_fold():
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=3, decoder_interpolation="bilinear",
                     decoder_attention_type="scse", encoder_depth=3, decoder_channels=(64, 32, 16))
    densefuse.equalize(model)
    with pytest.raises(CalibrationError, match=r"'decoder.blocks.0.attention1' is not calibrated"):
        densefuse.export_plain(model)
    densefuse.calibrate(model, images(1, seed=1))
    with pytest.raises(CalibrationError) as err:
        densefuse.export_plain(model)
    msg = str(err.value)
    assert "decoder.blocks.0.attention1" in msg and "decoder.blocks.1.attention1" in msg and "no conv to fold" in msg
    assert hasattr(model, "scale_equalizers")  # nothing changed


# ------------------------------------------------------------------------------------------ ONNX / TorchScript
@functools.lru_cache(maxsize=None)
def smp_calibrated() -> nn.Module:
    model = smp_model("UPerNet")
    densefuse.equalize(model)
    densefuse.calibrate(model, images(2, seed=1))
    return model.eval()


@pytest.mark.slow  # the exporter takes ~20 s on 2 cores
def test_explicit_mode_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    res = export_file(smp_calibrated(), "onnx", tmp_path / "m.onnx", images(1, seed=5, batch=1)[0])
    assert (tmp_path / "m.onnx").stat().st_size > 0
    assert res["max_abs_diff"] < 1e-4, res


def test_torchscript_scripts_equalized_and_exported_models(tmp_path):
    model = smp_calibrated()
    x = images(1, seed=5, batch=1)[0]
    res = export_file(model, "torchscript", tmp_path / "m.pt", x)
    assert res["max_abs_diff"] < 1e-5, res
    # the scripted copy follows the equalizer's state at scripting time (here: mode off is the identity)
    off = smp_model("UPerNet")
    densefuse.equalize(off, mode="off")
    torch.testing.assert_close(torch.jit.script(off.eval())(x), logits(off, x))
    plain = densefuse.export_plain(model)
    torch.testing.assert_close(torch.jit.script(plain)(x), logits(plain, x))


# ------------------------------------------------------------------------------------------ sum fusions
class _ResUnit(nn.Module):
    """Pre-activation residual unit: x + conv2(relu(conv1(relu(x))))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.add(self.conv2(F.relu(self.conv1(F.relu(x)))), x)


class _Fuse(nn.Module):
    """A Depth Anything style fusion block: out_conv(UP(res2(x0 + res1(x1))))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.res1, self.res2 = _ResUnit(c), _ResUnit(c)
        self.out_conv = nn.Conv2d(c, c, 1)

    def forward(self, x0: torch.Tensor, x1: "torch.Tensor | None" = None) -> torch.Tensor:
        out = x0 if x1 is None else torch.add(x0, self.res1(x1))
        out = F.interpolate(self.res2(out), scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(out)


class DepthAnythingStyle(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem1 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU())
        self.stem2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
        self.layer1_rn = nn.Conv2d(16, c, 3, padding=1, bias=False)
        self.layer2_rn = nn.Conv2d(32, c, 3, padding=1, bias=False)
        self.fuse2, self.fuse1 = _Fuse(c), _Fuse(c)
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f1 = self.stem1(x)
        f2 = self.stem2(f1)
        p2 = self.fuse2(self.layer2_rn(f2))
        return self.head(self.fuse1(p2, self.layer1_rn(f1)))


def test_sum_sites_on_a_depth_anything_style_block():
    torch.manual_seed(0)
    model = DepthAnythingStyle()
    with pytest.raises(densefuse.ConfigError, match="sums=True"):
        densefuse.equalize(DepthAnythingStyle())
    sites = densefuse.equalize(model, sums=True)
    got = {s.consumer: (s.fusion, s.interpolated, s.center) for s in sites}
    assert got == {
        "fuse2.out_conv": ("fuse1 (+)", (True,), True),  # UP'd before its 1x1 conv: the resized addend
        "fuse1.res1.conv2": ("fuse1 (+)", (False,), True),
        "layer1_rn": ("fuse1 (+)", (False,), False),  # no bias: scaled only (the fold stays exact)
    }
    batches = images(2, seed=1)
    table = densefuse.calibrate(model, batches)
    assert table["var_before"].max() / table["var_before"].min() > 2  # the addends' inputs differ in scale
    live = densefuse.measure(model, batches)
    assert live["var_after"].between(0.95, 1.05).all(), live
    # fold: the scale-only and 1x1 addends are exact; the 3x3 conv2 differs only in a border band
    x = images(1, seed=5, batch=1)[0]
    ref = logits(model, x)
    plain = densefuse.export_plain(model)
    diff = (logits(plain, x) - ref).abs()
    assert float(diff[..., 8:-8, 8:-8].max()) < 1e-5 * max(1.0, float(ref.abs().max()))


def test_sum_sites_on_hf_dpt():
    model = hf_dpt()

    class Depth(nn.Module):
        def __init__(self, m: nn.Module) -> None:
            super().__init__()
            self.m = m

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x).predicted_depth

    wrapped = Depth(model)
    sites = densefuse.equalize(wrapped, sums=True)
    # one sum per fusion layer after the first; per sum: the previous projection (its input bilinearly
    # upsampled), the residual unit's last conv and the neck conv (bias-free: scale only)
    fusions = {s.fusion for s in sites}
    assert fusions == {f"m.neck.fusion_stage.layers.{i} (+)" for i in (1, 2, 3)}
    by = {s.consumer: s for s in sites}
    assert by["m.neck.fusion_stage.layers.0.projection"].interpolated == (True,)
    assert by["m.neck.convs.2"].center is False and by["m.neck.fusion_stage.layers.1.projection"].center
    batches = images(1, seed=1, size=128)
    before = densefuse.calibrate(wrapped, batches)
    assert before["var_before"].max() / before["var_before"].min() > 100
    live = densefuse.measure(wrapped, batches)
    assert live["var_after"].between(0.95, 1.05).all(), live
    # fold: 1x1 projections and bias-free (scale-only) neck convs are exact; the residual units' 3x3 conv2
    # differ in a border band that the 3x3 convs and bilinear resizes after them widen. The fused map of
    # the first sum (16x16 for a 128x128 image) is exact at its centre.
    outs = []
    model.neck.register_forward_hook(lambda m, a, out: outs.append(out))
    x = images(1, seed=5, batch=1, size=128)[0]
    logits(wrapped, x)
    plain = densefuse.export_plain(wrapped)
    logits(plain, x)
    ref, got = outs[0][1], outs[1][1]
    c = ref.shape[-1] // 2
    assert float((got - ref)[..., c - 1:c + 1, c - 1:c + 1].abs().max()) < 1e-5 * float(ref.abs().max())
    assert float((got - ref).abs().max()) > 1e-3 * float(ref.abs().max())  # and the border band is real
