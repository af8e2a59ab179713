"""Every decode head fuses through Fusion: sites, groups, upsampled branches, calibrate and fold."""
import copy

import pytest
import torch

import densefuse
from densefuse.config import DEFAULTS, from_dict
from densefuse.fusion import Fusion
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
    cfg = from_dict({"model": {"decode_head": {"type": "upper"}}})
    with pytest.raises(densefuse.ConfigError, match="unknown head type 'model.decode_head.type: upper' \\(did you mean 'uper'"):
        densefuse.build_model(cfg)
    assert "uper" in DEFAULTS["model"]["decode_head"]["type"]
