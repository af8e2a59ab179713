"""The HRNet-style head: all levels upsampled to the finest, fused through one calibrated Fusion, 1x1 Conv-BN-ReLU."""
import pytest
import torch

import densefuse
from densefuse.config import from_dict
from densefuse.errors import ConfigError
from densefuse.fusion import Fusion
from densefuse.heads import HEADS, HRNetHead


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run faster on one thread than on two threads of a busy machine (conftest restores it)."""
    torch.set_num_threads(1)


def _model(channels=16, mode="explicit"):
    cfg = from_dict({"model": {"num_classes": 3, "equalizer": {"mode": mode},
                               "decode_head": {"type": "hrnet", "channels": channels},
                               "encoder": {"name": "resnet10t"}}})
    torch.manual_seed(0)
    return densefuse.build_model(cfg)


def test_registered_and_structure():
    assert HEADS.get("hrnet") is HRNetHead
    model = _model(mode="off")
    sites = {n: f for n, f in model.named_modules() if isinstance(f, Fusion)}
    assert list(sites) == ["decode_head.fusion"]
    enc = model.encoder.channels
    assert sites["decode_head.fusion"].in_channels == tuple(enc[:4])
    conv = sites["decode_head.fusion"].fuse.conv
    assert conv.kernel_size == (1, 1) and conv.in_channels == sum(enc[:4]) and conv.out_channels == 16
    assert isinstance(sites["decode_head.fusion"].fuse.bn, torch.nn.BatchNorm2d)
    feats = model.encoder(torch.randn(2, 3, 64, 64))
    out = model.decode_head(feats)
    assert out.shape == (2, 16, *feats[0].shape[-2:])  # at the finest selected level
    assert model(torch.randn(2, 3, 64, 64))["out"].shape == (2, 3, 64, 64)


def test_channels_default_keeps_the_concat_width():
    head = HRNetHead([8, 16, 32, 64], eq_mode="off")
    assert head.out_channels == 8 + 16 + 32 + 64
    feats = [torch.randn(2, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate([8, 16, 32, 64])]
    assert head(feats).shape == (2, 120, 32, 32)


def test_calibration_equalizes_every_branch_in_the_live_forward():
    model = _model()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.rand(4, 3, 64, 64, generator=gen) * 3 - 1 for _ in range(2)]
    before = densefuse.measure(model, batches)
    # uncalibrated, the upsampled levels enter the concat at clearly different scales
    assert before["std_after"].max() / before["std_after"].min() > 1.5
    table = densefuse.calibrate(model, batches)
    assert list(table["ratio_h"]) == [1.0, 2.0, 4.0, 8.0]
    live = densefuse.measure(model, batches)
    assert len(live) == 4 and live["calibrated"].all()
    assert live["mean_after"].abs().max() < 0.05
    assert (live["var_after"] - 1).abs().max() < 0.05


def test_post_upsample_branch_pipelines_are_refused():
    with pytest.raises(ConfigError, match="branch"):
        from_dict({"model": {"decode_head": {"type": "hrnet", "branch": "conv_relu_up_bn"}}})
