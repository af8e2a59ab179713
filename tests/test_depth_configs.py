"""The KITTI configs: GEDepth's no-decay rule (position tables, norms) through optim.paramwise.custom_keys."""
import pytest

import densefuse
from densefuse.engine.optim import paramwise_rules

SWIN_L = ["depth/gedepth-vanilla_swin-l_8xb2-76.8k_kitti-352x704.yaml",
          "depth/gedepth-adaptive_swin-l_8xb2-76.8k_kitti-352x704.yaml"]
#: a Swin of the same structure but tiny, so the test builds in a second
TINY_SWIN = ["model.encoder.kwargs={embed_dim: 16, depths: [1, 1, 1, 1], num_heads: [1, 1, 1, 1]}",
             "model.encoder.pretrained=null", "model.neck.embedding_dim=16",
             "model.decode_head.stem_channels=8", "model.decode_head.attention_channels=8", "data.root=unused"]


@pytest.mark.parametrize("name", SWIN_L)
def test_swin_l_configs_take_no_decay_on_position_tables_and_norms(name):
    cfg = densefuse.load_config(name, TINY_SWIN)
    assert cfg["model"]["encoder"]["name"] == "swin-l"
    model = densefuse.get_task("depth", cfg).build_model(cfg)
    rules = paramwise_rules(model, cfg["optim"])
    no_decay = {r["name"] for r in rules if r["decay_mult"] == 0.0}
    assert any("relative_position_bias_table" in n for n in no_decay)
    assert any(".norm" in n for n in no_decay)
    for r in rules:
        expected = 0.0 if any(k in r["name"] for k in ("absolute_pos_embed", "relative_position_bias_table", "norm")) else 1.0
        assert r["decay_mult"] == expected, r["name"]
        assert r["lr_mult"] == 1.0
    # the decoder's fusion convs keep the decay
    assert any(r["name"].startswith("decode_head.fusions") and r["decay_mult"] == 1.0 for r in rules)


@pytest.mark.parametrize("name", SWIN_L)
def test_swin_l_configs_build_gedepths_model(name):
    """swin-l paper encoder with its output norms, HAHI on, GEDepth's init and cosine schedule, and the 22k
    checkpoint named as a local file."""
    raw = densefuse.load_config(name, ["data.root=unused", "model.encoder.pretrained=null"])
    assert raw["model"]["neck"]["type"] == "hahi" and raw["model"]["neck"]["embedding_dim"] == 512
    assert raw["model"]["init"] == "gedepth" and raw["model"]["sync_bn"] is False  # GEDepth: plain BN
    s = raw["schedule"]
    assert (s["type"], s["warmup_iters"], s["warmup_ratio"]) == ("cosine", 25600, 1e-3)
    assert s["min_lr"] / raw["optim"]["lr"] == pytest.approx(1e-8)  # GEDepth's min_lr_ratio
    text = (densefuse.config.find_config(name)).read_text() + (
        densefuse.config.find_config("depth/_base_/gedepth_swin-l.yaml")).read_text()
    assert "swin_large_patch4_window7_224_22k.pth" in text
    cfg = densefuse.load_config(name, TINY_SWIN)
    model = densefuse.get_task("depth", cfg).build_model(cfg)
    assert model.encoder.out_norms is not None and len(model.encoder.out_norms) == 4
    assert model.neck is not None and model.init == "gedepth"


def test_swin_l_config_names_the_missing_checkpoint():
    from densefuse.errors import ConfigError

    cfg = densefuse.load_config(SWIN_L[0], [t for t in TINY_SWIN if "pretrained" not in t])
    with pytest.raises(ConfigError, match="swin_large_patch4_window7_224_22k.pth"):
        densefuse.get_task("depth", cfg).build_model(cfg)
