"""timm features_only wrapper: NCHW lists, channels/strides, output stride, any input size, local weights."""
import pytest
import timm
import torch

from densefuse import ConfigError
from densefuse.encoders import TimmEncoder


def _check(enc, x):
    feats = enc(x)
    assert len(feats) == len(enc.channels) == len(enc.strides)
    for f, c, s in zip(feats, enc.channels, enc.strides):
        assert f.shape[1] == c, (f.shape, c)
        assert f.shape[-2:] == (x.shape[-2] // s, x.shape[-1] // s), (f.shape, s)
    return feats


@pytest.mark.parametrize("os_, strides", [(None, [4, 8, 16, 32]), (16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])])
def test_resnet_output_stride(os_, strides):
    enc = TimmEncoder("resnet18", output_stride=os_)
    assert enc.strides == strides
    assert enc.channels == [64, 128, 256, 512]
    _check(enc, torch.randn(1, 3, 64, 64))


def test_convnext_nchw():
    enc = TimmEncoder("convnext_atto", out_indices=(0, 1, 2, 3))
    assert enc.strides == [4, 8, 16, 32]
    _check(enc, torch.randn(1, 3, 64, 96))


def test_swin_any_input_size_is_nchw():
    enc = TimmEncoder("swin_tiny_patch4_window7_224", out_indices=(0, 1, 2, 3))
    assert enc.channels == [96, 192, 384, 768]
    for size in ((224, 224), (128, 192)):
        feats = _check(enc, torch.randn(1, 3, *size))
        assert feats[0].shape[1] == 96  # channels first


def test_twins():
    enc = TimmEncoder("twins_svt_small", out_indices=(0, 1, 2, 3))
    assert enc.strides == [4, 8, 16, 32]
    _check(enc, torch.randn(1, 3, 64, 64))


def test_swin_rejects_output_stride():
    with pytest.raises(ConfigError, match="does not support output_stride"):
        TimmEncoder("swin_tiny_patch4_window7_224", output_stride=16)


def test_local_pretrained_weights_are_loaded(tmp_path):
    torch.manual_seed(0)
    cls_model = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "r18.pth"
    torch.save(cls_model.state_dict(), path)
    enc = TimmEncoder("resnet18", pretrained=str(path))
    sd = enc.model.state_dict()
    ref = cls_model.state_dict()
    shared = [k for k in sd if k in ref]
    assert len(shared) > 50
    assert all(torch.equal(sd[k], ref[k]) for k in shared)


def test_missing_weights_and_unknown_name(tmp_path):
    with pytest.raises(ConfigError, match="pretrained weights not found: .*nope.pth"):
        TimmEncoder("resnet18", pretrained=str(tmp_path / "nope.pth"))
    with pytest.raises(ConfigError, match="unknown timm encoder"):
        TimmEncoder("resnet_does_not_exist")
