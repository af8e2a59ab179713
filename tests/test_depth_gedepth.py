"""GEDepth's model as its Table 5 ran it: HAHI parity on fixed weights, parameter counts of both full models,
the swin-l encoder on odd sizes, GEDepth's initialisation, and the equalizer promise with HAHI in place.

``data/gedepth_hahi_reference.pt`` was recorded from GEDepth's own ``HAHIHeteroNeck``
(qcraftai/gedepth ``depth/models/necks/hahi.py``, mmcv's ``MultiScaleDeformableAttention`` on its PyTorch
path) run outside the repository: 5 levels of 4/8/12/16/16 channels at odd sizes, embedding 16, GEDepth's
``init_weights`` with seed 0 then non-trivial BN statistics and attention weights, eval mode; it holds the
state_dict, the inputs, the outputs and the parameter count of the full-size neck (64..1536, 512 wide).
``data/gedepth_param_counts.json`` holds the parameter counts of GEDepth's modules at the Swin-L sizes
(its DenseDepthHead, LightPEMASKNeck, DynamicPENeckSOFT, HAHIHeteroNeck; the backbone as mmseg's
SwinTransformer with GEDepth's arguments and 4 input channels plus the ResNet conv stem).
"""
import json
import math
from pathlib import Path

import pytest
import torch
from densefuse_tasks.depth.hahi import HAHINeck
from torch import nn

import densefuse
from densefuse.encoders import TimmEncoder

from .test_depth_configs import SWIN_L
from .test_depth_model import SMALL, concat_stats, make, scene_batches

DATA = Path(__file__).parent / "data"
_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def test_hahi_matches_gedepths_module_on_fixed_weights():
    ref = torch.load(DATA / "gedepth_hahi_reference.pt", weights_only=True)
    neck = HAHINeck(ref["in_channels"], embedding_dim=ref["embedding_dim"])
    ref_params = sum(v.numel() for k, v in ref["state_dict"].items() if not k.endswith(_BN_BUFFERS))
    assert sum(p.numel() for p in neck.parameters()) == ref_params
    neck.load_state_dict(ref["state_dict"], strict=True)  # same names, same shapes, nothing left over
    neck.eval()
    with torch.no_grad():
        outs = neck(ref["inputs"])
    assert len(outs) == 5
    for got, want in zip(outs, ref["outputs"]):
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5), (got - want).abs().max()


def test_hahi_parameter_count_equals_gedepths():
    ref = torch.load(DATA / "gedepth_hahi_reference.pt", weights_only=True)
    with torch.device("meta"):
        neck = HAHINeck([64, 192, 384, 768, 1536], embedding_dim=512)
    assert sum(p.numel() for p in neck.parameters()) == ref["full_param_count"] == 48_307_202


@pytest.mark.parametrize("name", SWIN_L)
def test_full_models_parameter_counts_equal_gedepths(name):  # noqa: F811
    counts = json.loads((DATA / "gedepth_param_counts.json").read_text())
    cfg = densefuse.load_config(name, ["data.root=unused", "model.encoder.pretrained=null"])
    with torch.device("meta"):
        model = densefuse.get_task("depth", cfg).build_model(cfg)
    n = {k: sum(p.numel() for p in m.parameters()) for k, m in
         (("encoder", model.encoder), ("stem", model.stem), ("neck", model.neck), ("decode_head", model.decode_head),
          ("attention", model.attention))}
    assert n["encoder"] == counts["backbone_swin"]  # 4-channel patch embedding and norm0..3 included
    assert n["stem"] == counts["backbone_stem"]
    assert n["neck"] == counts["hahi"]
    assert n["decode_head"] == counts["decode_head"]
    assert n["attention"] == counts["attention_neck"]
    total = sum(p.numel() for p in model.parameters())
    if "adaptive" in name:
        assert sum(p.numel() for p in model.slope.parameters()) == counts["slope_neck"]
        assert total == counts["adaptive"] == 277_134_755
    else:
        assert model.slope is None
        assert total == counts["vanilla"] == 275_432_344


def test_swin_l_forward_on_an_odd_size():
    """swin-l (Swin-L widths and heads, one block per stage to stay fast) through the whole GEDepth model with
    HAHI at a size that is no multiple of the patch, the windows or the strides."""
    torch.manual_seed(0)
    enc = TimmEncoder("swin-l", depths=[1, 1, 1, 1])
    assert enc.channels == [192, 384, 768, 1536] and enc.out_norms is not None
    from densefuse_tasks.depth import GEDepth

    model = GEDepth(enc, "adaptive", widths=[8, 16, 16, 16, 16], mode="off", attention_channels=8, stem_channels=64,
                    neck={"embedding_dim": 16}, init="gedepth").eval()
    x = torch.randn(1, 3, 75, 101)
    g = torch.rand(1, 1, 75, 101) * 40
    with torch.no_grad():
        feats = model.features(x, g)
        out = model(x, g, 1.0 / g.clamp_min(1.0))
    assert [tuple(f.shape[-2:]) for f in feats] == [(38, 51), (19, 26), (10, 13), (5, 7), (3, 4)]
    assert [f.shape[1] for f in feats] == [64, 192, 384, 768, 1536]
    assert out["out"].shape == (1, 1, 75, 101) and torch.isfinite(out["out"]).all()
    assert out["slope_logits"].shape == (1, 11, 75, 101)


def test_gedepth_init_is_msra_in_the_decoder_and_xavier_in_the_necks():
    torch.manual_seed(0)
    _, _, model = make(["model.init=gedepth", "model.decode_head.widths=[16,32,64,128,256]"])
    torch.manual_seed(0)
    _, _, plain = make(["model.init=torch", "model.decode_head.widths=[16,32,64,128,256]"])
    conv = model.decode_head.fusions[0].fuse[0]  # the first up-fusion's first conv (LeakyReLU after it)
    fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
    want = math.sqrt(2 / (1 + 0.01**2) / fan_out)
    assert float(conv.weight.detach().std()) == pytest.approx(want, rel=0.03)
    assert (conv.bias == 0).all()
    # PyTorch's default (kaiming uniform a=sqrt(5), fan_in) is much smaller there
    assert float(plain.decode_head.fusions[0].fuse[0].weight.detach().std()) < 0.5 * want
    for neck in (model.attention,):
        for m in neck.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * 9
                bound = math.sqrt(6 / (fan_in + m.out_channels * 9))
                assert float(m.weight.detach().abs().max()) <= bound + 1e-6
                assert float(m.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.1)
                assert (m.bias == 0).all()


@pytest.mark.slow  # calibration runs one pass per site through HAHI: ~2 min on 2 loaded cores
def test_equalizer_promise_holds_with_hahi():
    """After calibration every depth fusion site's branches enter at mean 0 / variance 1 in the live
    train-mode forward on the synthetic road scenes, with HAHI between the encoder and the decoder."""
    cfg, task, model = make(["model.neck={type: hahi, embedding_dim: 16}", "model.init=gedepth", *SMALL])
    assert model.neck is not None
    densefuse.calibrate(model, scene_batches(task, cfg, seed=0, n_batches=3, size=(64, 160)), forward=task.forward)
    stats = concat_stats(model, task, scene_batches(task, cfg, seed=1, n_batches=2, size=(64, 160)))
    assert len(stats) == 8
    for key, (mean, var) in stats.items():
        assert abs(float(mean)) < 0.05, (key, float(mean))
        assert abs(float(var) - 1) < 0.05, (key, float(var))


def _official_swin_checkpoint(tmp_path, **kw):
    """A Swin in Microsoft's original format (as ``swin_large_patch4_window7_224_22k.pth``): ``{"model": ...}``,
    patch merging at the end of each stage, the ``relative_position_index`` / ``attn_mask`` buffers and a
    classifier ``head``; made from a timm Swin (same tensors, original names)."""
    import re

    import timm

    torch.manual_seed(3)
    src = timm.create_model("swin_large_patch4_window7_224", pretrained=False, num_classes=10, **kw)
    sd = {}
    for k, v in src.state_dict().items():
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        sd[k.replace("head.fc.", "head.")] = v
    for name, m in src.named_modules():  # the buffers the original checkpoint carries
        if hasattr(m, "relative_position_index"):
            sd[f"{name}.relative_position_index"] = m.relative_position_index.clone()
    sd["layers.2.blocks.1.attn_mask"] = torch.zeros(4, 49, 49)  # a shifted block
    path = tmp_path / "swin_large_patch4_window7_224_22k.pth"
    torch.save({"model": sd}, path)
    return src, sd, path


def test_original_swin_checkpoint_loads_into_swin_l(tmp_path):
    kw = {"depths": [1, 1, 2, 1], "embed_dim": 24, "num_heads": [1, 2, 2, 4]}  # the structure, small
    src, sd, path = _official_swin_checkpoint(tmp_path, **kw)
    assert "layers.0.downsample.reduction.weight" in sd and "layers.3.downsample.reduction.weight" not in sd
    enc = TimmEncoder("swin-l", pretrained=str(path), **kw)
    own = enc.model.state_dict()
    for k, v in src.state_dict().items():
        if k.startswith(("head", "norm.")):
            continue
        key = k.replace("layers.", "layers_", 1) if k.replace("layers.", "layers_", 1) in own else k
        assert torch.equal(own[key], v), k


@pytest.mark.parametrize("setting, message", [
    ("model.init=msra", "'model.init' must be one of gedepth, torch or null, got str 'msra'"),
    ("model.neck={type: fpn}", "model.neck.type must be 'hahi'"),
    ("model.neck={heads: 8}", "unknown config key 'model.neck.heads' (did you mean 'model.neck.num_heads'?)"),
    ("model.neck={embedding_dim: 100}", "model.neck.embedding_dim (100) must be a multiple of 2 x num_heads (8)"),
])
def test_bad_neck_or_init_is_one_clear_error(tmp_path, setting, message):
    from click.testing import CliRunner

    from densefuse.cli import main

    res = CliRunner().invoke(main, ["train", "--task", "depth", "--set", setting, "--work-dir", str(tmp_path / "w")])
    assert res.exit_code == 2
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in res.output
    assert not (tmp_path / "w").exists()
