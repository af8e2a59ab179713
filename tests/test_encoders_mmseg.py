"""The paper's Swin / Twins encoders handle window borders and output norms as mmseg's backbones do.

(tools/check_mmseg_parity.py compares whole converted segmentors with MMSegmentation 1.2.2 itself; these
tests pin the behaviour without mmseg.)"""
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.twins import LocallyGroupedAttn

from densefuse.encoders import TimmEncoder, _mmseg_swin_attn, _mmseg_twins_lsa, use_mmseg_windows

TINY_SWIN = {"embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4]}
TINY_TWINS = {"embed_dims": [16, 32, 64, 128], "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4]}


def test_swin_window_attention_equals_timms_where_both_agree():
    torch.manual_seed(0)
    block = SwinTransformerBlock(16, (14, 14), num_heads=2, window_size=7, shift_size=3).eval()
    x = torch.randn(2, 14, 14, 16)  # whole windows, a map larger than one window: no padding, same shift
    with torch.no_grad():
        torch.testing.assert_close(_mmseg_swin_attn(block, x), SwinTransformerBlock._attn(block, x))


def test_swin_pads_before_shifting_and_keeps_the_last_stages_shift():
    torch.manual_seed(0)
    enc = TimmEncoder("swin-t", **TINY_SWIN).eval()
    blocks = [m for m in enc.modules() if isinstance(m, SwinTransformerBlock)]
    assert [b.target_shift_size[0] for b in blocks] == [0, 3] * 4  # mmseg shifts every second block
    last = blocks[-1]
    assert last.shift_size[0] == 0  # timm dropped it (7x7 at 224); mmseg's forward keeps it
    x = torch.randn(1, 7, 7, last.attn.qkv.in_features)
    with torch.no_grad():
        assert not torch.allclose(last._attn(x), SwinTransformerBlock._attn(last, x), atol=1e-4)
        # a 9x9 map: mmseg pads to 14x14 and then rolls; timm rolls the 9x9 map and then pads
        y = torch.randn(1, 9, 9, blocks[1].attn.qkv.in_features)
        assert not torch.allclose(blocks[1]._attn(y), SwinTransformerBlock._attn(blocks[1], y), atol=1e-4)


def test_twins_local_attention_masks_padding_from_real_tokens():
    torch.manual_seed(0)
    attn = LocallyGroupedAttn(16, num_heads=2, ws=7).eval()
    h = w = 9  # windows of 7: the bottom-right window holds 2x2 real tokens and 45 padded ones
    x = torch.randn(1, h * w, 16)
    with torch.no_grad():
        out = _mmseg_twins_lsa(attn, x, (h, w)).view(1, h, w, 16)
        # reference: attention among the 4 real tokens of that window only
        corner = x.view(1, h, w, 16)[:, 7:, 7:].reshape(1, 4, 16)
        q, k, v = attn.qkv(corner).reshape(1, 4, 3, 2, 8).permute(2, 0, 3, 1, 4)
        ref = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, 4, 16))
        torch.testing.assert_close(out[:, 7:, 7:].reshape(1, 4, 16), ref)
        # a full window (no padding in it) is what timm computes
        torch.testing.assert_close(out[:, :7, :7], LocallyGroupedAttn.forward(attn, x, (h, w)).view(1, h, w, 16)[:, :7, :7])


def test_twins_output_norm_feeds_the_next_stage():
    torch.manual_seed(0)
    enc = TimmEncoder("twins-svt-s", **TINY_TWINS).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = enc(x)
        enc.out_norms[0].weight.mul_(2.0)  # stage 1's norm: changes every later level too
        after = enc(x)
    assert not torch.allclose(before[1], after[1])
    assert len(enc.out_norms) == 4 and [f.shape[1] for f in after] == [16, 32, 64, 128]


def test_mmseg_windows_keep_parameters_and_survive_copies():
    import copy
    import pickle

    torch.manual_seed(0)
    enc = TimmEncoder("swin-t", **TINY_SWIN).eval()
    keys = list(enc.state_dict())
    assert use_mmseg_windows(copy.deepcopy(enc.model), "swin") == 8
    for clone in (copy.deepcopy(enc), pickle.loads(pickle.dumps(enc))):
        assert list(clone.state_dict()) == keys
        assert all(b._attn.block is b for b in clone.modules() if isinstance(b, SwinTransformerBlock))
        x = torch.randn(1, 3, 72, 72)
        with torch.no_grad():
            for a, b in zip(clone(x), enc(x)):
                torch.testing.assert_close(a, b)
