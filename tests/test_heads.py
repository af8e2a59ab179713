"""Every decode head fuses through Fusion: sites, groups, upsampled branches, calibrate and fold."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import densefuse
from densefuse.config import DEFAULTS, from_dict
from densefuse.fusion import Fusion
from densefuse.heads import ClsSeg
from densefuse.layers import ConvBNReLU, ConvNormAct
from densefuse.registry import PREDICTORS
from tests.conftest import fold_mismatch

HEADS = {
    "uper": ({"type": "uper", "channels": 32, "pool_scales": [1, 2, 3, 6]}, None,
             {"decode_head.psp_fusion": [512, 32, 32, 32, 32], "decode_head.fpn_fusion": [32] * 4}),
    "psp": ({"type": "psp", "in_index": 3, "channels": 32}, 8, {"decode_head.bottleneck": [512, 32, 32, 32, 32]}),
    "aspp": ({"type": "aspp", "in_index": 3, "channels": 32, "dilations": [1, 2, 3]}, 8,
             {"decode_head.bottleneck": [32] * 4}),
    "sep_aspp": ({"type": "sep_aspp", "in_index": 3, "channels": 32, "dilations": [1, 2, 3], "c1_in_channels": 64,
                  "c1_channels": 12}, 8, {"decode_head.bottleneck": [32] * 4, "decode_head.sep_bottleneck": [32, 12]}),
    "fcn": ({"type": "fcn", "in_index": 3, "channels": 32, "num_convs": 2, "concat_input": True}, 8,
            {"decode_head.conv_cat": [512, 32]}),
}


def _model(name):
    head, os_, _ = HEADS[name]
    cfg = from_dict({"model": {"num_classes": 5, "decode_head": head, "encoder": {"name": "resnet18", "output_stride": os_}}})
    torch.manual_seed(0)
    return densefuse.build_model(cfg)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_sites_calibrate_and_fold(name):
    model = _model(name)
    sites = {n: f for n, f in model.named_modules() if isinstance(f, Fusion)}
    want = HEADS[name][2]
    assert {n: list(f.in_channels) for n, f in sites.items()} == want
    x = torch.randn(2, 3, 128, 128)
    table = densefuse.calibrate(model, [torch.randn(4, 3, 64, 64) for _ in range(2)])
    model.train()
    assert model(x)["out"].shape == (2, 5, 128, 128)
    assert len(table) == sum(len(v) for v in want.values())
    # which branches were upsampled is structural
    if name in ("aspp", "sep_aspp"):
        b = table[table.site == "decode_head.bottleneck"]
        assert list(b["ratio_h"]) == [8.0, 1.0, 1.0, 1.0]  # only the image-pool branch (1x1 -> 8x8)
    if name == "sep_aspp":
        s = table[table.site == "decode_head.sep_bottleneck"]
        assert list(s["ratio_h"]) == [2.0, 1.0]
    if name == "fcn":
        assert (table["ratio_h"] == 1.0).all()  # the paper's control: nothing upsampled
    folded = copy.deepcopy(model)
    densefuse.fold(folded)
    # eval mode: BN running stats absorb the mean term exactly. (In train mode the batch statistics
    # also see the zero-padded border, where fold and explicit differ, so the match is only approximate.)
    model.eval()
    folded.eval()
    diffs = fold_mismatch(model, folded, x, margins={"decode_head.sep_bottleneck": 2})
    assert set(diffs) == set(want)
    assert max(diffs.values()) < 1e-4, diffs
    assert folded(x)["out"].shape == (2, 5, 128, 128)


def test_sep_aspp_folds_depthwise_rows():
    model = _model("sep_aspp")
    densefuse.calibrate(model, [torch.randn(4, 3, 64, 64)])
    site = model.decode_head.sep_bottleneck
    dw = site.fuse[0].depthwise.conv
    assert dw.groups == dw.in_channels == 44
    w0 = dw.weight.detach().clone()
    densefuse.fold(model)
    std = site.equalizer.std
    assert torch.allclose(dw.weight[:32], w0[:32] / std[0])
    assert torch.allclose(dw.weight[32:], w0[32:] / std[1])


def test_unknown_head_type_is_a_config_error():
    with pytest.raises(densefuse.ConfigError, match="unknown model.decode_head.type 'upper' \\(did you mean 'uper'"):
        from_dict({"model": {"decode_head": {"type": "upper"}}})
    assert "uper" in DEFAULTS["model"]["decode_head"]["type"]


# --------------------------------------------------------------- decoders + predictors, bit-identical
AUX = {"type": "fcn", "in_index": 2, "channels": 16, "num_convs": 1, "concat_input": False}
REFERENCE = Path(__file__).parent / "data" / "heads_reference.pt"
#: checkpoint keys that moved when the classifier left the decoders (old -> new prefix)
RENAMED = {"predictor.": "decode_head.cls_seg.", "aux_predictor.": "auxiliary_head.cls_seg."}


def _old_key(key):
    for new, old in RENAMED.items():
        if key.startswith(new):
            return old + key[len(new):]
    return key


@pytest.mark.parametrize("name", sorted(HEADS))
def test_decoder_plus_predictor_reproduces_the_reference_head(name):
    """Same seed -> the same initial weights and the same logits as the heads that ended in cls_seg
    (reference recorded from them: calibrated, eval and train mode, with an auxiliary FCN head)."""
    ref = torch.load(REFERENCE, weights_only=True)[name]
    head, os_, _ = HEADS[name]
    cfg = from_dict({"model": {"num_classes": 5, "decode_head": head, "auxiliary_head": AUX,
                               "encoder": {"name": "resnet18", "output_stride": os_}}})
    torch.manual_seed(0)
    model = densefuse.build_model(cfg)
    torch.manual_seed(3)
    # the reference was calibrated in one pass with every site measured un-equalized (before chained sites
    # were calibrated in dependency order); with every site off, calibrate() measures exactly that
    densefuse.set_mode(model, "off")
    densefuse.calibrate(model, [torch.randn(2, 3, 64, 64)])
    densefuse.set_mode(model, "explicit")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        out = model(x)["out"]
        model.train()
        torch.manual_seed(2)
        train = model(x)
    state = {_old_key(k): v.double().sum().item() for k, v in model.state_dict().items()
             if not k.startswith("encoder.") and v.is_floating_point()}
    assert state.keys() == ref["state"].keys()
    assert state == pytest.approx(ref["state"], rel=1e-4, abs=1e-6)
    # bit-identical with one thread on the machine that recorded it; reductions differ in the last bits
    # with other thread counts and CPUs, hence the tolerance
    torch.testing.assert_close(out, ref["out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(train["out"], ref["train_out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(train["aux"], ref["train_aux"], rtol=1e-4, atol=1e-5)


def test_decoders_return_features_and_the_predictor_makes_logits():
    head, os_, _ = HEADS["uper"]
    cfg = from_dict({"model": {"num_classes": 5, "decode_head": head, "equalizer": {"mode": "off"}}})
    model = densefuse.build_model(cfg).eval()
    assert isinstance(model.predictor, ClsSeg) and model.predictor.conv_seg.out_channels == 5
    assert not any(isinstance(m, ClsSeg) for m in model.decode_head.modules())
    x = torch.randn(1, 3, 64, 64)
    feats = model.features(x)
    assert feats.shape == (1, model.decode_head.out_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x)["out"], model._up(model.predictor(feats), (64, 64)))


def test_checkpoints_from_before_the_predictor_split_load():
    head, os_, _ = HEADS["fcn"]
    cfg = from_dict({"model": {"num_classes": 5, "decode_head": head, "auxiliary_head": AUX,
                               "encoder": {"name": "resnet18", "output_stride": os_}}})
    torch.manual_seed(0)
    old = {_old_key(k): v for k, v in densefuse.build_model(cfg).state_dict().items()}
    assert "decode_head.cls_seg.conv_seg.weight" in old and "auxiliary_head.cls_seg.conv_seg.bias" in old
    torch.manual_seed(1)
    model = densefuse.build_model(cfg)
    model.load_state_dict(old)  # strict
    assert torch.equal(model.predictor.conv_seg.weight, old["decode_head.cls_seg.conv_seg.weight"])
    assert torch.equal(model.aux_predictor.conv_seg.bias, old["auxiliary_head.cls_seg.conv_seg.bias"])


def test_predictor_is_pluggable():
    @PREDICTORS.register("test_regression")
    class Regression(nn.Module):
        def __init__(self, in_channels, scale=2.0):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, 1, 3, padding=1)
            self.scale = scale

        def forward(self, x):
            return self.scale * torch.sigmoid(self.conv(x))

    try:
        # num_classes satisfies the seg task's check; this predictor does not take it
        cfg = from_dict({"model": {"num_classes": 2,
                                   "decode_head": {"type": "fcn", "in_index": 3, "channels": 8, "concat_input": False,
                                                   "predictor": "test_regression", "scale": 10.0}}})
        model = densefuse.build_model(cfg).eval()
        assert isinstance(model.predictor, Regression) and model.predictor.scale == 10.0
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 64))["out"]
        assert out.shape == (1, 1, 64, 64) and float(out.min()) >= 0 and float(out.max()) <= 10
        with pytest.raises(densefuse.ConfigError, match="unknown config key 'model.decode_head.dropout'"):
            from_dict({"model": {"decode_head": {"type": "fcn", "predictor": "test_regression", "dropout": 0.1}}})
    finally:
        PREDICTORS._items.pop("test_regression")


# ------------------------------------------------------------------------ Table 4 branch pipelines
BRANCH_CASES = {  # head spec, post-upsample norms added (channels per branch), sites
    "uper": ({"type": "uper", "channels": 32}, 4 + 3),  # PPM x4, fpn_convs[1:] x2, PPM fusion output
    "psp": ({"type": "psp", "in_index": 3, "channels": 32}, 4),
    "aspp": ({"type": "aspp", "in_index": 3, "channels": 32, "dilations": [1, 2]}, 1),  # image pool
    "sep_aspp": ({"type": "sep_aspp", "in_index": 3, "channels": 32, "dilations": [1, 2]}, 2),  # + ASPP output
    "fcn": ({"type": "fcn", "in_index": 3, "channels": 32}, 0),  # nothing upsampled
}


def _head_params(spec, branch):
    cfg = from_dict({"model": {"num_classes": 5, "decode_head": {**spec, "branch": branch},
                               "equalizer": {"mode": "off"}}})
    model = densefuse.build_model(cfg)
    return model, sum(p.numel() for p in model.decode_head.parameters())


@pytest.mark.parametrize("name", sorted(BRANCH_CASES))
@pytest.mark.parametrize("branch", ["conv_relu_up_bn", "conv_relu_up_gn", "conv_relu_up_ln"])
def test_branch_pipelines_build_run_and_count(name, branch):
    spec, n_post = BRANCH_CASES[name]
    _, base = _head_params(spec, "conv_bn_relu_up")
    model, n = _head_params(spec, branch)
    # each upsampled branch trades its conv-block norm (2C) for a conv bias (C) and gains a post norm (2C);
    # where the fused block itself is upsampled (UPer's PPM fusion, DeepLabV3+'s ASPP) the same holds
    assert n - base == 32 * n_post
    norm_type = {"conv_relu_up_bn": nn.BatchNorm2d, "conv_relu_up_gn": nn.GroupNorm, "conv_relu_up_ln": nn.GroupNorm}
    post = [m for n_, m in model.decode_head.named_modules() if "post_norm" in n_ and isinstance(m, norm_type[branch])]
    assert len(post) == n_post
    if branch == "conv_relu_up_ln":
        assert all(m.num_groups == 1 for m in post)
    model.train()
    out = model(torch.randn(2, 3, 64, 64))["out"]
    assert out.shape == (2, 5, 64, 64) and torch.isfinite(out).all()


def test_post_upsample_norm_runs_after_the_resize():
    """Conv-ReLU-UP-BN: what enters the fusion is batch-normalized at the fusion's size (mean 0, var 1
    per channel in train mode), not normalized before the upsample."""
    spec, _ = BRANCH_CASES["psp"]
    model, _ = _head_params(spec, "conv_relu_up_bn")
    seen = {}
    site = model.decode_head.bottleneck
    site.register_forward_pre_hook(lambda mod, args, kwargs: seen.update(feats=args[0]), with_kwargs=True)
    model.train()
    model(torch.randn(4, 3, 64, 64))
    x = seen["feats"][0]
    for branch in seen["feats"][1:]:
        assert branch.shape[-2:] == x.shape[-2:]  # already upsampled by the head
        assert branch.mean(dim=(0, 2, 3)).abs().max() < 1e-4
        var = branch.var(dim=(0, 2, 3), unbiased=False)
        alive = var > 1e-6  # a channel the ReLU zeroed for every pixel stays 0 after the norm
        assert alive.float().mean() > 0.5 and (var[alive] - 1).abs().max() < 1e-2
    assert isinstance(model.decode_head.psp_modules[0][1].bn, nn.Identity)
    assert model.decode_head.psp_modules[0][1].conv.bias is not None


def test_default_branch_keeps_state_dict_keys():
    spec, _ = BRANCH_CASES["uper"]
    model, _ = _head_params(spec, "conv_bn_relu_up")
    assert not any("post_norm" in k for k in model.state_dict())


# --------------------------------------------------------------------------------- ConvNormAct
def test_conv_norm_act_choices():
    block = ConvNormAct(4, 8, 3, norm=None, act="leaky_relu", act_kwargs={"negative_slope": 0.2})
    assert [n for n, _ in block.named_children()] == ["conv", "bn", "act"]
    assert block.conv.bias is not None and isinstance(block.bn, nn.Identity)
    assert isinstance(block.act, nn.LeakyReLU) and block.act.negative_slope == 0.2
    y = block(torch.randn(1, 4, 8, 8))
    assert y.shape == (1, 8, 8, 8) and (y < 0).any()  # leaky: negatives survive
    gn = ConvNormAct(4, 48, 1, norm="gn", act="gelu")
    assert isinstance(gn.bn, nn.GroupNorm) and 48 % gn.bn.num_groups == 0 and gn.conv.bias is None
    assert isinstance(gn.act, nn.GELU)
    custom = ConvNormAct(4, 8, 1, norm=lambda c: nn.InstanceNorm2d(c, affine=True), act=nn.SiLU, bias=True)
    assert isinstance(custom.bn, nn.InstanceNorm2d) and isinstance(custom.act, nn.SiLU) and custom.conv.bias is not None
    assert isinstance(ConvNormAct(4, 8, norm="syncbn").bn, nn.SyncBatchNorm)
    with pytest.raises(ValueError, match="unknown norm 'bnx'"):
        ConvNormAct(4, 8, norm="bnx")
    with pytest.raises(ValueError, match="unknown activation 'relu6x'"):
        ConvNormAct(4, 8, act="relu6x")


def test_conv_bn_relu_is_conv_norm_act():
    torch.manual_seed(0)
    a = ConvBNReLU(4, 8, 3)
    torch.manual_seed(0)
    b = ConvNormAct(4, 8, 3)
    assert isinstance(a, ConvNormAct)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert isinstance(ConvBNReLU(4, 8, act=False).act, nn.Identity)
