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


# --- the paper's encoders ---------------------------------------------------------------------------------------

from densefuse.config import from_dict  # noqa: E402
from densefuse.encoders import PAPER_ENCODERS  # noqa: E402
from densefuse.model import build_model  # noqa: E402


def _upernet(name, num_classes=150, channels=512, aux=256):
    cfg = from_dict({"model": {
        "num_classes": num_classes,
        "encoder": {"name": name, "out_indices": list(PAPER_ENCODERS[name].out_indices)},
        "decode_head": {"type": "uper", "channels": channels},
        "auxiliary_head": {"type": "fcn", "in_index": 2, "channels": aux, "num_convs": 1, "concat_input": False},
    }})
    with torch.device("meta"):
        return build_model(cfg)


def test_upernet_swin_t_has_mmseg_parameter_count():
    model = _upernet("swin-t")
    assert sum(p.numel() for p in model.parameters()) == 59_941_862  # mmseg UPerNet Swin-T, ADE20K
    # mmseg's norm0-3: one LayerNorm per output, 2 * (96 + 192 + 384 + 768) parameters
    assert sum(p.numel() for p in model.encoder.out_norms.parameters()) == 2880


@pytest.mark.parametrize("name, drop_path", [("swin-t", 0.3), ("twins-svt-s", 0.2), ("twins-svt-l", 0.3),
                                             ("convnext-t", 0.4), ("convnext-s", 0.3), ("convnext-b", 0.4)])
def test_recipe_drop_path(name, drop_path):
    assert PAPER_ENCODERS[name].drop_path_rate == drop_path
    with torch.device("meta"):
        enc = TimmEncoder(name)
    rates = [m.drop_prob for m in enc.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(drop_path)


def test_output_norms_standardise_every_level():
    torch.manual_seed(0)
    enc = TimmEncoder("twins-svt-s").eval()
    for f in enc(torch.randn(1, 3, 64, 64)):
        per_pixel = f.mean(1)
        assert per_pixel.abs().max() < 1e-4  # LayerNorm over channels at init (weight 1, bias 0)


def test_resnet_d8_is_dilated_with_default_levels():
    enc = TimmEncoder("r50-d8")
    assert enc.strides == [4, 8, 8, 8]
    assert enc.channels == [256, 512, 1024, 2048]
    assert enc.out_norms is None


@pytest.mark.parametrize("name, n", [("swin-t", 4), ("convnext_atto", 4), ("resnet18", 5)])
def test_wrong_out_indices_is_config_error_naming_the_range(name, n):
    with pytest.raises(ConfigError, match=rf"valid indices are 0\.\.{n - 1}"):
        TimmEncoder(name, out_indices=(1, 2, 3, n))


def test_pretrained_true_without_cache_names_what_to_download(monkeypatch):
    import densefuse.encoders as encoders

    monkeypatch.setattr(encoders, "timm_cache_file", lambda name: None)
    with pytest.raises(ConfigError, match=r"not in the timm/Hugging Face cache.*timm/convnext_atto"):
        TimmEncoder("convnext_atto", pretrained=True)


def test_pretrained_true_uses_the_cached_file(monkeypatch, tmp_path):
    import densefuse.encoders as encoders

    torch.manual_seed(1)
    ref = timm.create_model("convnext_atto", pretrained=False)
    path = tmp_path / "model.safetensors"
    from safetensors.torch import save_file

    save_file(ref.state_dict(), str(path))
    monkeypatch.setattr(encoders, "timm_cache_file", lambda name: path)
    enc = TimmEncoder("convnext_atto", pretrained=True)
    assert torch.equal(enc.model.stages_3.blocks[0].conv_dw.weight, ref.stages[3].blocks[0].conv_dw.weight)


def test_malicious_or_corrupt_pretrained_file_is_one_clear_error(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(ConfigError, match=r"cannot load weights from .*evil\.pth: not a weights-only"):
        TimmEncoder("resnet18", pretrained=str(bad))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load weights from .*junk.pth"):
        TimmEncoder("resnet18", pretrained=str(junk))


def test_pretrained_with_foreign_keys_lists_them(tmp_path):
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    sd["layer9.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    with pytest.raises(ConfigError, match=r"1 key without a parameter .*layer9\.0\.conv1\.weight"):
        TimmEncoder("resnet18", pretrained=str(path))
