"""Every paper-row config (configs/seg/paper) loads, builds, and matches mmseg's parameter counts."""
from pathlib import Path

import pytest
import torch
from densefuse_tasks.seg.pipeline import build_test_pipeline, build_train_pipeline

from densefuse import ConfigError
from densefuse.config import load_config
from densefuse.config.sections import EvalSection
from densefuse.engine.optim import paramwise_rules
from densefuse.model import build_model

PAPER = Path(__file__).resolve().parent.parent / "configs" / "seg" / "paper"
CONFIGS = sorted(PAPER.glob("*.yaml"))


def _load(path, *overrides):
    return load_config(path, ["model.encoder.pretrained=null", *overrides])


def _build(cfg):
    with torch.device("meta"):
        return build_model(cfg)


def _count(model):
    return sum(p.numel() for p in model.parameters())


def test_thirty_three_files_cover_the_thirty_five_rows():
    names = {p.stem for p in CONFIGS}
    assert len(names) == 33  # Table 2: 18, Table 3: 8, Table 6: 4, Table 4: 3 (+ 2 rows = Swin-T with mode off / fold)
    assert "upernet_swin-t_4xb4-160k_ade20k-512x512" in names
    assert "deeplabv3plus_r101-d8_4xb2-80k_cityscapes-512x1024" in names
    assert "fcn_r50-d8_4xb4-160k_ade20k-512x512" in names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_builds_and_reads(path):
    cfg = _load(path)
    model = _build(cfg)
    assert _count(model) > 1_000_000
    assert isinstance(cfg["eval"], EvalSection)
    train = build_train_pipeline(cfg)
    assert train.cat_max_ratio == 0.75 and train.ratio_range == (0.5, 2.0)
    assert train.scale == ((2048, 1024) if "cityscapes" in path.stem else (2048, 512))
    assert build_test_pipeline(cfg).scale == train.scale
    paramwise_rules(model, cfg["optim"])
    for mode in ("off", "explicit", "fold"):
        assert _load(path, f"model.equalizer.mode={mode}")["model"]["equalizer"]["mode"] == mode


def test_upernet_swin_t_ade20k_matches_mmseg_parameter_count():
    cfg = _load(PAPER / "upernet_swin-t_4xb4-160k_ade20k-512x512.yaml")
    assert _count(_build(cfg)) == 59_941_862


def test_swin_s_adds_twelve_mmseg_swin_blocks_of_width_384():
    t = _count(_build(_load(PAPER / "upernet_swin-t_4xb4-160k_ade20k-512x512.yaml")))
    s = _count(_build(_load(PAPER / "upernet_swin-s_4xb4-160k_ade20k-512x512.yaml")))
    c, heads, win = 384, 12, 7
    block = (2 * c) * 2 + (c * 3 * c + 3 * c) + (c * c + c) + (2 * win - 1) ** 2 * heads + (c * 4 * c + 4 * c) + (4 * c * c + c)
    assert s - t == 12 * block


def test_class_count_and_depth_differences_of_the_resnet_rows():
    ade = _count(_build(_load(PAPER / "pspnet_r101-d8_4xb4-160k_ade20k-512x512.yaml")))
    city = _count(_build(_load(PAPER / "pspnet_r101-d8_4xb2-80k_cityscapes-512x1024.yaml")))
    r50 = _count(_build(_load(PAPER / "pspnet_r50-d8_4xb4-160k_ade20k-512x512.yaml")))
    assert ade - city == (150 - 19) * (512 + 1) + (150 - 19) * (256 + 1)  # two classifiers (decode + aux)
    # ResNet-101 has 17 more bottlenecks (1024 -> 256 -> 1024) in layer3 than ResNet-50
    block = 1024 * 256 + 256 * 256 * 9 + 256 * 1024 + 2 * (256 + 256 + 1024)
    assert ade - r50 == 17 * block


def test_recipes():
    swin = _load(PAPER / "upernet_swin-t_4xb4-160k_ade20k-512x512.yaml")
    assert (swin.optim.type, swin.optim.lr, swin.optim.weight_decay) == ("adamw", 6e-5, 0.01)
    assert swin.schedule.warmup_iters == 1500 and swin.train.iters == 160000 and swin.train.batch_size == 4
    assert set(swin.optim.paramwise.custom_keys) == {"absolute_pos_embed", "relative_position_bias_table", "norm"}
    cnx = _load(PAPER / "upernet_convnext-b_4xb4-160k_ade20k-512x512.yaml")
    assert cnx.optim.paramwise.layer_decay == {"rate": 0.9, "num_layers": 12, "family": "convnext"}
    assert cnx.train.amp == "fp16" and cnx.eval.mode == "slide" and cnx.eval.stride == [341, 341]
    city = _load(PAPER / "fcn_r101-d8_4xb2-80k_cityscapes-512x1024.yaml")
    assert (city.optim.type, city.optim.lr, city.schedule.power, city.schedule.min_lr) == ("sgd", 0.01, 0.9, 1e-4)
    assert city.train.iters == 80000 and city.train.batch_size == 2 and city.data.crop_size == [512, 1024]
    t4 = _load(PAPER / "upernet_swin-t_conv-relu-up-gn_4xb4-160k_ade20k-512x512.yaml")
    assert t4.model.decode_head.branch == "conv_relu_up_gn" and t4.model.equalizer.mode == "off"


def test_a_row_without_its_pretrained_file_names_it():
    cfg = load_config(PAPER / "upernet_swin-t_4xb4-160k_ade20k-512x512.yaml")
    with pytest.raises(ConfigError, match=r"pretrained weights not found: checkpoints/swin_tiny_patch4_window7_224"):
        build_model(cfg)


@pytest.mark.parametrize("branch, groups", [("gn", 32), ("ln", 1), ("bn", None)])
def test_table4_rows_build_their_branch_pipeline(branch, groups):
    cfg = _load(PAPER / f"upernet_swin-t_conv-relu-up-{branch}_4xb4-160k_ade20k-512x512.yaml")
    assert cfg.model.decode_head.branch == f"conv_relu_up_{branch}"
    model = _build(cfg)
    assert model.decode_head.post_norm == branch
    gn = [m.num_groups for m in model.decode_head.modules() if isinstance(m, torch.nn.GroupNorm)]
    if groups is None:  # Conv-ReLU-UP-BN: no GroupNorm, the BN sits after the upsample
        assert gn == []
    else:
        assert gn and set(gn) == {groups}
