"""Every paper encoder takes any input size, with the token grids and padding of MMSegmentation 1.2.2.

mmseg's Swin and Twins pad each patch embedding's input (and Swin each odd map before a patch merging) with
zeros at the bottom and right (``padding='corner'``): every grid rounds up. mmpretrain's ConvNeXt (used by mmseg)
has unpadded stride-4 and stride-2 convolutions: grids round down and the remainder is never seen. ResNetV1c-D8
pads its stride-2 3x3 convolutions by 1: grids round up. (tools/check_mmseg_parity.py compares converted segmentors
with mmseg itself at such sizes; these tests pin the behaviour without mmseg, on tiny random encoders.)
"""
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from densefuse.config import load_config
from densefuse.encoders import PAPER_ENCODERS, TimmEncoder
from densefuse.model import build_model

#: tiny architectures per family (same code paths as the paper sizes, a fraction of the compute)
TINY = {
    "swin": {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)},
    "twins": {"embed_dims": (16, 32, 64, 128), "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)},
    "convnext": {"dims": (16, 32, 64, 128), "depths": (1, 1, 1, 1)},
    "resnet": {"layers": (1, 1, 1, 1)},
}
#: 131x173, 375x500 / 5 and 512x683 / 4 (rounded): odd, one side a multiple of 4, the ADE20K test shape
SIZES = [(131, 173), (75, 100), (128, 171)]


def _grids(family: str, h: int, w: int) -> list[tuple[int, int]]:
    """The four output grids mmseg 1.2.2's backbone of ``family`` gives for an h x w input."""
    if family in ("swin", "twins"):  # patch 4, then three stride-2 stages, every one padded up
        sizes = [(math.ceil(h / 4), math.ceil(w / 4))]
        for _ in range(3):
            sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
        return sizes
    if family == "convnext":  # no padding: the convolutions drop what does not fill a whole stride
        sizes = [(h // 4, w // 4)]
        for _ in range(3):
            sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))
        return sizes
    # ResNetV1c-D8: stem conv (s2, p1) and max pool (s2, p1), layer2 s2 (p1), layers 3-4 dilated at stride 8
    s4 = (math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2))
    s8 = (math.ceil(s4[0] / 2), math.ceil(s4[1] / 2))
    return [s4, s8, s8, s8]


@functools.lru_cache(maxsize=None)
def _encoder(name: str) -> TimmEncoder:
    """A tiny, randomly initialised paper encoder ``name`` (built once per test session)."""
    torch.manual_seed(0)
    return TimmEncoder(name, **TINY[PAPER_ENCODERS[name].family]).eval()


@pytest.mark.parametrize("name", sorted(PAPER_ENCODERS))
def test_every_paper_encoder_gives_mmsegs_grids_at_odd_sizes(name):
    enc = _encoder(name)
    family = PAPER_ENCODERS[name].family
    for h, w in SIZES:
        with torch.no_grad():
            feats = enc(torch.randn(1, 3, h, w))
        assert [tuple(f.shape[-2:]) for f in feats] == _grids(family, h, w), (name, h, w)
        assert [f.shape[1] for f in feats] == enc.channels
        assert all(torch.isfinite(f).all() for f in feats)


@pytest.mark.parametrize("name", [n for n, s in PAPER_ENCODERS.items() if s.family in ("swin", "twins")])
def test_swin_and_twins_pad_zeros_at_the_bottom_right(name):
    """An odd input gives exactly the features of the same input zero-padded at the bottom and right to whole
    4x4 patches (mmseg's corner padding; the later stages pad their odd maps the same way in both runs)."""
    enc = _encoder(name)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w)
        padded = F.pad(x, (0, -w % 4, 0, -h % 4))
        with torch.no_grad():
            for a, b in zip(enc(x), enc(padded)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # and not the centred ('same') padding, nor a crop: those change the first level
        centred = F.pad(x, ((-w % 4) // 2, -w % 4 - (-w % 4) // 2, (-h % 4) // 2, -h % 4 - (-h % 4) // 2))
        if (-h % 4) > 1 or (-w % 4) > 1:
            with torch.no_grad():
                assert not torch.allclose(enc(x)[0], enc(centred)[0], atol=1e-3)


def test_twins_later_stages_round_up_too():
    """132x172 needs no padding at the image, but its 33x43 grid does at the second patch embedding: timm's
    Twins would give 16x21 there, mmseg's gives 17x22."""
    enc = _encoder("twins-svt-s")
    with torch.no_grad():
        feats = enc(torch.randn(1, 3, 132, 172))
    assert [tuple(f.shape[-2:]) for f in feats] == [(33, 43), (17, 22), (9, 11), (5, 6)]


@pytest.mark.parametrize("name", ["convnext-t", "convnext-b"])
def test_convnext_ignores_the_remainder_as_mmpretrain_does(name):
    enc = _encoder(name)
    for h, w in SIZES:
        x = torch.randn(1, 3, h, w)
        with torch.no_grad():
            for a, b in zip(enc(x), enc(x[..., : h - h % 4, : w - w % 4])):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_paper_swin_config_segments_an_odd_image_at_its_size():
    """The whole paper model (UPerNet Swin-T, tiny) on a 375x500-like image: logits at the input size."""
    cfg = load_config("configs/seg/paper/upernet_swin-t_4xb4-160k_ade20k-512x512.yaml",
                      ["model.encoder.pretrained=null", "model.decode_head.channels=16",
                       "model.auxiliary_head.channels=16", "model.equalizer.mode=off"])
    cfg["model"]["encoder"]["kwargs"] = dict(TINY["swin"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 75, 101))["out"]
    assert out.shape == (1, cfg["model"]["num_classes"], 75, 101)
    assert torch.isfinite(out).all()
