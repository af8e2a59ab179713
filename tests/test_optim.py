"""Param-wise optimizer rules: which tensor gets which lr and weight decay, as mmseg's recipes."""
import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from densefuse import ConfigError
from densefuse.config import from_dict
from densefuse.encoders import PAPER_ENCODERS
from densefuse.engine.optim import build_optimizer, build_scheduler, paramwise_rules


def _upernet(name):
    cfg = from_dict({"model": {
        "num_classes": 150,
        "encoder": {"name": name, "out_indices": list(PAPER_ENCODERS[name].out_indices)},
        "decode_head": {"type": "uper", "channels": 512},
        "auxiliary_head": {"type": "fcn", "in_index": 2, "channels": 256, "num_convs": 1, "concat_input": False},
    }})
    from densefuse.model import build_model

    with torch.device("meta"):
        return build_model(cfg)


def _norm_params(model, prefix="encoder."):
    """Names of the parameters of LayerNorm-like modules (by type, not by name) under ``prefix``."""
    out = set()
    for mod_name, mod in model.named_modules():
        if mod_name.startswith(prefix) and isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            out |= {f"{mod_name}.{n}" for n, _ in mod.named_parameters(recurse=False)}
    return out


SWIN_KEYS = {"absolute_pos_embed": {"decay_mult": 0.0}, "relative_position_bias_table": {"decay_mult": 0.0},
             "norm": {"decay_mult": 0.0}}


def test_swin_t_decay_rules_match_mmseg():
    model = _upernet("swin-t")
    rules = {r["name"]: r for r in paramwise_rules(model, {"paramwise": {"custom_keys": SWIN_KEYS}})}
    assert len(rules) == 220  # 212 without mmseg's 4 output norms (weight, bias)
    zero = {n for n, r in rules.items() if r["decay_mult"] == 0}
    rel = {n for n in rules if n.endswith("relative_position_bias_table")}
    assert len(rel) == 12  # one per block (2 + 2 + 6 + 2)
    assert zero == _norm_params(model) | rel
    assert len(zero) == 76
    # the heads' BatchNorms are named ".bn." and keep the full decay under the Swin rules, as in mmseg
    bn = [n for n in rules if ".bn." in n]
    assert bn and all(rules[n]["decay_mult"] == 1 for n in bn)
    assert all(r["lr_mult"] == 1 for r in rules.values())


def test_twins_svt_s_pos_block_and_norms_get_no_decay():
    model = _upernet("twins-svt-s")
    keys = {"pos_block": {"decay_mult": 0.0}, "norm": {"decay_mult": 0.0}}
    rules = {r["name"]: r for r in paramwise_rules(model, {"paramwise": {"custom_keys": keys}})}
    zero = {n for n, r in rules.items() if r["decay_mult"] == 0}
    pos = {n for n in rules if ".pos_block." in n}
    assert len(pos) == 8  # one depthwise conv (weight, bias) per stage
    assert zero == _norm_params(model) | pos


def test_longest_custom_key_wins():
    model = _upernet("swin-t")
    keys = {"norm": {"decay_mult": 0.0}, "norm1": {"decay_mult": 0.5, "lr_mult": 2.0}}
    rules = {r["name"]: r for r in paramwise_rules(model, {"paramwise": {"custom_keys": keys}})}
    n1 = "encoder.model.layers_0.blocks.0.norm1.weight"
    n2 = "encoder.model.layers_0.blocks.0.norm2.weight"
    assert (rules[n1]["lr_mult"], rules[n1]["decay_mult"]) == (2.0, 0.5)
    assert (rules[n2]["lr_mult"], rules[n2]["decay_mult"]) == (1.0, 0.0)


def test_convnext_t_stage_wise_layer_decay_matches_mmseg():
    model = _upernet("convnext-t")
    rules = {r["name"]: r for r in paramwise_rules(model, {"paramwise": {"layer_decay": {"rate": 0.9, "num_layers": 6}}})}
    # L = 8: stem and downsampling 0.9^7, stage i blocks 0.9^(6 - i), output norms and heads 1.0
    assert rules["encoder.model.stem_0.weight"]["lr_mult"] == pytest.approx(0.9 ** 7)
    assert rules["encoder.model.stages_2.downsample.1.weight"]["lr_mult"] == pytest.approx(0.9 ** 7)
    for i in range(4):
        assert rules[f"encoder.model.stages_{i}.blocks.0.conv_dw.weight"]["lr_mult"] == pytest.approx(0.9 ** (6 - i))
    assert rules["encoder.out_norms.3.weight"]["lr_mult"] == 1.0
    assert rules["decode_head.fpn_fusion.fuse.conv.weight"]["lr_mult"] == 1.0
    # every 1-D tensor or bias: no decay; conv / linear weights: full decay
    for name, r in rules.items():
        assert r["decay_mult"] == (0.0 if r["param"].ndim == 1 or name.endswith(".bias") else 1.0), name


def test_convnext_s_uses_twelve_layers():
    model = _upernet("convnext-s")
    rules = {r["name"]: r for r in paramwise_rules(model, {"paramwise": {"layer_decay": {"rate": 0.9, "num_layers": 12}}})}
    assert rules["encoder.model.stages_3.blocks.0.conv_dw.weight"]["lr_mult"] == pytest.approx(0.9 ** 9)
    assert rules["encoder.model.stem_0.weight"]["lr_mult"] == pytest.approx(0.9 ** 13)


def test_generic_norm_and_bias_multipliers():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 3, groups=4))
    cfg = {"paramwise": {"norm_decay_mult": 0.0, "bias_decay_mult": 0.5, "bias_lr_mult": 2.0, "dwconv_decay_mult": 0.1}}
    rules = {r["name"]: r for r in paramwise_rules(model, cfg)}
    assert (rules["0.bias"]["lr_mult"], rules["0.bias"]["decay_mult"]) == (2.0, 0.5)
    assert rules["1.weight"]["decay_mult"] == 0.0 and rules["1.bias"]["decay_mult"] == 0.0
    assert rules["1.bias"]["lr_mult"] == 1.0  # norm biases are not biases for bias_lr_mult (mmengine)
    assert rules["2.weight"]["decay_mult"] == 0.1


def test_optimizer_groups_and_schedule_keep_the_multipliers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    cfg = {"type": "adamw", "lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999],
           "paramwise": {"custom_keys": {"1.": {"decay_mult": 0.0, "lr_mult": 0.5}}}}
    opt = build_optimizer(model, cfg)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model[0].weight)]["weight_decay"] == pytest.approx(0.05)
    assert by_id[id(model[1].weight)]["weight_decay"] == 0.0
    assert by_id[id(model[1].weight)]["lr"] == pytest.approx(5e-4)
    sched = build_scheduler(opt, {"type": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 0}, total_iters=10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert by_id[id(model[0].weight)]["lr"] == pytest.approx(5e-4)
    assert by_id[id(model[1].weight)]["lr"] == pytest.approx(2.5e-4)


@pytest.mark.parametrize("paramwise, match", [
    ({"custom_key": {}}, "unknown config key 'optim.paramwise.custom_key'"),
    ({"custom_keys": {"norm": {"decay": 0}}}, "custom_keys.norm must be a mapping with lr_mult"),
    ({"layer_decay": {"rate": 0.9}}, "layer_decay must be"),
    ({"layer_decay": {"rate": 0.9, "num_layers": 6, "family": "swin"}}, "only 'convnext'"),
])
def test_bad_paramwise_config(paramwise, match):
    with pytest.raises(ConfigError, match=match):
        paramwise_rules(torch.nn.Linear(2, 2), {"paramwise": paramwise})


def test_bn_is_not_decayed_by_generic_rule_only_when_asked():
    model = torch.nn.BatchNorm2d(2)
    rules = paramwise_rules(model, {"paramwise": {"custom_keys": {}}})
    assert all(r["decay_mult"] == 1.0 for r in rules)
    assert isinstance(model, _BatchNorm)
