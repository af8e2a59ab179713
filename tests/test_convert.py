"""mmseg / mmpretrain checkpoints into densefuse models: every key used, identical outputs, clear errors."""
import pytest
import torch
import torch.nn.functional as F

from densefuse import ConfigError
from densefuse.config import from_dict
from densefuse.convert import (
    _cat_to_unfold,
    _unfold_to_cat,
    convert_mmseg_segmentor,
    load_mmseg_segmentor,
    to_mmseg_state_dict,
)
from densefuse.encoders import PAPER_ENCODERS, TimmEncoder
from densefuse.model import build_model

HEADS = {
    "uper": {"type": "uper", "channels": 16, "pool_scales": [1, 2]},
    "psp": {"type": "psp", "in_index": 3, "channels": 16, "pool_scales": [1, 2]},
    "aspp": {"type": "aspp", "in_index": 3, "channels": 16, "dilations": [1, 2]},
    "sep_aspp": {"type": "sep_aspp", "in_index": 3, "channels": 16, "dilations": [1, 2], "c1_in_channels": 256,
                 "c1_channels": 8},
    "fcn": {"type": "fcn", "in_index": 3, "channels": 16, "num_convs": 2, "concat_input": True},
}
AUX = {"type": "fcn", "in_index": 2, "channels": 8, "num_convs": 1, "concat_input": False}
#: narrow and shallow variants of the paper encoders (same module structure and key names, quick to build)
TINY = {
    "swin-t": {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4]},
    "twins-svt-s": {"embed_dims": [16, 32, 64, 128], "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4]},
    "convnext-t": {"dims": [16, 32, 64, 128], "depths": [1, 1, 2, 1]},
    "r50-d8": {},
}


def _model(encoder, head, seed):
    torch.manual_seed(seed)
    head_cfg = dict(HEADS[head])
    aux = dict(AUX)
    if encoder != "r50-d8":
        aux["in_index"] = 2
    cfg = from_dict({"model": {"num_classes": 5, "equalizer": {"mode": "off"},
                               "encoder": {"name": encoder, "out_indices": list(PAPER_ENCODERS[encoder].out_indices),
                                           "kwargs": TINY[encoder]},
                               "decode_head": head_cfg, "auxiliary_head": aux}})
    return build_model(cfg).eval()


def _perturb_norms(model):
    """Non-trivial BN statistics and LayerNorm affines so identical outputs mean the mapping is right."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point() and t.ndim == 1 and "equalizer" not in name:
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)


@pytest.mark.parametrize("encoder, head", [("swin-t", "uper"), ("twins-svt-s", "uper"), ("convnext-t", "uper"),
                                           ("r50-d8", "psp"), ("r50-d8", "aspp"), ("r50-d8", "sep_aspp"),
                                           ("r50-d8", "fcn")])
def test_mmseg_segmentor_checkpoint_loads_with_every_key_and_same_outputs(tmp_path, encoder, head):
    src = _model(encoder, head, seed=0)
    _perturb_norms(src)
    mm = to_mmseg_state_dict(src)
    assert all(k.split(".")[0] in ("backbone", "decode_head", "auxiliary_head") for k in mm)
    if head == "uper":
        assert "decode_head.fpn_bottleneck.conv.weight" in mm and "decode_head.bottleneck.bn.weight" in mm
        assert "decode_head.conv_seg.weight" in mm
    path = tmp_path / "iter_160000.pth"
    torch.save({"meta": {"iter": 1}, "state_dict": mm}, path)
    dst = _model(encoder, head, seed=1)
    converted = convert_mmseg_segmentor(mm, dst)
    packed = sum(k.endswith(("in_proj_weight", "in_proj_bias")) for k in mm)  # Twins: q and kv packed in one
    assert len(converted) == len(mm) + packed  # every mmseg key used
    load_mmseg_segmentor(dst, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x)["out"], src(x)["out"])


def test_mmseg_key_names_of_the_backbones():
    swin = to_mmseg_state_dict(_model("swin-t", "uper", 0))
    assert "backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table" in swin
    assert "backbone.stages.0.downsample.reduction.weight" in swin  # mmseg: at the end of stage 0
    assert "backbone.stages.2.blocks.1.ffn.layers.0.0.weight" in swin and "backbone.norm3.weight" in swin
    twins = to_mmseg_state_dict(_model("twins-svt-s", "uper", 0))
    assert "backbone.layers.0.1.attn.attn.in_proj_weight" in twins  # global attention: nn.MultiheadAttention
    assert "backbone.layers.0.0.attn.qkv.weight" in twins  # locally grouped attention
    assert "backbone.position_encodings.0.proj.weight" in twins and "backbone.norm_list.3.weight" in twins
    cnx = to_mmseg_state_dict(_model("convnext-t", "uper", 0))
    assert "backbone.downsample_layers.0.0.weight" in cnx and "backbone.stages.2.1.pointwise_conv2.weight" in cnx
    r50 = to_mmseg_state_dict(_model("r50-d8", "psp", 0))
    assert "backbone.stem.7.running_var" in r50 and "backbone.layer4.2.conv3.weight" in r50


def test_swin_patch_merging_order_matches_mmseg_unfold():
    from timm.models.swin_transformer import PatchMerging

    torch.manual_seed(0)
    c = 6
    merge = PatchMerging(c).eval()
    with torch.no_grad():
        merge.norm.weight.uniform_(0.5, 1.5)
        merge.norm.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 6, c)  # NHWC
    ref = merge(x)
    # mmseg: nn.Unfold(2, stride 2) on NCHW gives channels in (c, kh, kw) order, then LayerNorm + Linear
    cols = F.unfold(x.permute(0, 3, 1, 2), 2, stride=2).transpose(1, 2)
    w = _cat_to_unfold(merge.reduction.weight)
    nw, nb = _cat_to_unfold(merge.norm.weight), _cat_to_unfold(merge.norm.bias)
    out = F.layer_norm(cols, (4 * c,), nw, nb, merge.norm.eps) @ w.T
    torch.testing.assert_close(out.reshape(ref.shape), ref)
    assert torch.equal(_unfold_to_cat(w), merge.reduction.weight)


def test_imagenet_backbone_in_mmseg_format_loads_into_the_encoder(tmp_path):
    src = _model("swin-t", "uper", 0)
    _perturb_norms(src)
    backbone = {k[len("backbone."):]: v for k, v in to_mmseg_state_dict(src).items() if k.startswith("backbone.")}
    backbone = {k: v for k, v in backbone.items() if not k.startswith(("norm0", "norm1", "norm2"))}
    backbone["head.weight"] = torch.zeros(10, 128)  # classifier: ignored
    backbone["norm.weight"] = torch.ones(128)
    backbone["norm.bias"] = torch.zeros(128)
    path = tmp_path / "swin_tiny_patch4_window7_224_mmseg.pth"
    torch.save({"state_dict": backbone}, path)
    enc = TimmEncoder("swin-t", pretrained=str(path), **TINY["swin-t"])
    ref = src.encoder.state_dict()
    got = enc.state_dict()
    for k in got:
        if k.startswith("out_norms.") and not k.startswith("out_norms.3."):
            continue  # mmseg initialises norm0-2 freshly: they are not in an ImageNet checkpoint
        assert torch.equal(got[k], ref[k]), k


def test_mmpretrain_convnext_and_mmcv_resnet_checkpoints(tmp_path):
    for name, head in (("convnext-t", "uper"), ("r50-d8", "psp")):
        src = _model(name, head, 0)
        _perturb_norms(src)
        sd = {k[len("backbone."):]: v for k, v in to_mmseg_state_dict(src).items() if k.startswith("backbone.")}
        sd["head.fc.weight"] = torch.zeros(3, 3)
        path = tmp_path / f"{name}.pth"
        torch.save({"state_dict": {"backbone." + k: v for k, v in sd.items()}}, path)
        enc = TimmEncoder(name, pretrained=str(path), **TINY[name])
        ref = src.encoder.state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in enc.state_dict().items())


def test_unknown_and_missing_keys_are_listed():
    model = _model("r50-d8", "psp", 0)
    mm = to_mmseg_state_dict(model)
    extra = dict(mm, **{"decode_head.conv_foo.weight": torch.zeros(1), "neck.lateral.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match=r"2 mmseg keys without a densefuse parameter: decode_head\.conv_foo\.weight, "
                                          r"neck\.lateral\.weight"):
        convert_mmseg_segmentor(extra, model)
    missing = {k: v for k, v in mm.items() if not k.startswith("auxiliary_head.")}
    with pytest.raises(ConfigError, match=r"no value for \d+ densefuse keys: auxiliary_head\."):
        convert_mmseg_segmentor(missing, model)
    bad = dict(mm)
    bad["decode_head.conv_seg.weight"] = torch.zeros(7, 16, 1, 1)
    with pytest.raises(ConfigError, match=r"wrong shape: predictor\.conv_seg\.weight \(7, 16, 1, 1\)"):
        convert_mmseg_segmentor(bad, model)
