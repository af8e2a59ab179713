"""Config loading: _base_ inheritance, overrides, strict keys with hints, type checks."""
import re

import pytest
import torch
import yaml

import densefuse
from densefuse import ConfigError
from densefuse.config import find_config


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_resolves_bases(default_cfg):
    cfg = default_cfg
    assert cfg.task == "seg"
    assert cfg.name == "synthetic_upernet_r18"
    assert cfg.model.decode_head["type"] == "uper"
    assert cfg.model.auxiliary_head["loss_weight"] == 0.4
    assert cfg.data.type == "synthetic"
    assert cfg.model.equalizer.mode == "explicit"


def test_base_inheritance_and_override_order(tmp_path):
    _write(tmp_path / "a.yaml", {"train": {"iters": 5, "batch_size": 3}, "seed": 1, "model": {"num_classes": 2}})
    _write(tmp_path / "b.yaml", {"_base_": "a.yaml", "train": {"iters": 7}})
    cfg = densefuse.load_config(tmp_path / "b.yaml", ["seed=9", "optim.lr=0.5", "train.channels_last=true"])
    assert cfg.train.iters == 7 and cfg.train.batch_size == 3
    assert cfg.seed == 9 and cfg.optim.lr == 0.5 and cfg.train.channels_last is True
    assert cfg.train.val_interval == densefuse.config.DEFAULTS["train"]["val_interval"]


def test_delete_replaces_a_section(tmp_path):
    _write(tmp_path / "a.yaml", {"model": {"num_classes": 2, "decode_head": {"type": "uper", "pool_scales": [1, 2]}}})
    _write(tmp_path / "b.yaml", {"_base_": ["a.yaml"], "model": {"decode_head": {"_delete_": True, "type": "fcn"}}})
    assert densefuse.load_config(tmp_path / "b.yaml").model.decode_head == {"type": "fcn"}


def test_unknown_key_has_did_you_mean(tmp_path):
    _write(tmp_path / "c.yaml", {"train": {"itres": 5}})
    with pytest.raises(ConfigError, match=r"unknown config key 'train.itres' \(did you mean 'train.iters'\?\)"):
        densefuse.load_config(tmp_path / "c.yaml")


def test_set_unknown_key_and_bad_type(tmp_path):
    _write(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError, match=r"--set train.batchsize: no config key 'train.batchsize' \(did you mean 'train.batch_size'"):
        densefuse.load_config(tmp_path / "c.yaml", ["train.batchsize=4"])
    with pytest.raises(ConfigError, match=r"--set train.iters=many: 'train.iters' must be int >= 1, got str 'many'"):
        densefuse.load_config(tmp_path / "c.yaml", ["train.iters=many"])
    with pytest.raises(ConfigError, match="key=value"):
        densefuse.load_config(tmp_path / "c.yaml", ["train.iters"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        densefuse.load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: invalid YAML: .*expected ',' or '\]'"):
        densefuse.load_config(tmp_path / "bad.yaml")
    (tmp_path / "indent.yaml").write_text("train:\n  iters: 3\n   batch_size: 2\n")
    with pytest.raises(ConfigError, match=r"indent.yaml:3:\d+: invalid YAML: mapping values are not allowed here"):
        densefuse.load_config(tmp_path / "indent.yaml")
    _write(tmp_path / "child.yaml", {"_base_": "missing_base.yaml"})
    with pytest.raises(ConfigError, match="_base_ file not found: missing_base.yaml"):
        densefuse.load_config(tmp_path / "child.yaml")
    _write(tmp_path / "loop.yaml", {"_base_": "loop.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        densefuse.load_config(tmp_path / "loop.yaml")


def test_head_kwargs_are_checked_when_a_config_is_validated(default_cfg):
    data = default_cfg.to_dict()
    data["model"]["decode_head"]["pool_scale"] = [1, 2]
    with pytest.raises(ConfigError, match=r"model.decode_head.pool_scale' for model.decode_head.type 'uper' "
                                          r"\(did you mean 'model.decode_head.pool_scales'"):
        densefuse.config.from_dict(data)


def test_bare_names_resolve_in_configs_dir():
    assert find_config("seg/synthetic_upernet_r18").name == "synthetic_upernet_r18.yaml"


def test_yaml12_booleans_keep_mode_off_a_string(tmp_path):
    (tmp_path / "m.yaml").write_text("model:\n  num_classes: 2\n  equalizer:\n    mode: off\ntrain:\n  channels_last: true\n")
    cfg = densefuse.load_config(tmp_path / "m.yaml", ["data.augment.flip=false"])
    assert cfg.model.equalizer.mode == "off"
    assert cfg.train.channels_last is True and cfg.data.augment.flip is False
    cfg = densefuse.load_config(tmp_path / "m.yaml", ["model.equalizer.mode=fold"])
    assert cfg.model.equalizer.mode == "fold"


# ----------------------------------------------------------------------- values checked at load time
def test_exponent_floats_in_files_and_set(tmp_path):
    (tmp_path / "e.yaml").write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-2\nmodel:\n  num_classes: 2\n  equalizer:\n"
                                     "    eps: 1e-6\n")
    cfg = densefuse.load_config(tmp_path / "e.yaml")
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 0.05 and cfg.model.equalizer.eps == 1e-6
    cfg = densefuse.load_config(tmp_path / "e.yaml", ["optim.lr=5e-4", "train.grad_clip=1e1", "seed=010"])
    assert cfg.optim.lr == 5e-4 and cfg.train.grad_clip == 10.0 and cfg.seed == 10
    assert isinstance(cfg.seed, int)


@pytest.mark.parametrize("override, message", [
    ("train.batch_size=0", "'train.batch_size' must be int >= 1, got int 0"),
    ("train.iters=-5", "'train.iters' must be int >= 1, got int -5"),
    ("train.ckpt_interval=0", "'train.ckpt_interval' must be int >= 1, got int 0"),
    ("train.val_interval=0", "'train.val_interval' must be int >= 1, got int 0"),
    ("train.log_interval=0", "'train.log_interval' must be int >= 1, got int 0"),
    ("train.grad_clip=abc", "'train.grad_clip' must be number > 0 or null, got str 'abc'"),
    ("calibration.num_images=0", "'calibration.num_images' must be int >= 1 or null, got int 0"),
    ("calibration.batch_size=1", "'calibration.batch_size' must be int >= 2, got int 1"),
    ("data.crop_size=[64]", "'data.crop_size' must be a list of 2 ints >= 1, got list [64]"),
    ("data.crop_size=[64, 0]", "'data.crop_size' must be a list of 2 ints >= 1, got list [64, 0]"),
    ("data.mean=[1, 2]", "'data.mean' must be a list of 3 numbers, got list [1, 2]"),
    ("data.std=[1, 0, 1]", "'data.std' must be a list of 3 numbers > 0, got list [1, 0, 1]"),
    ("device=gpu0", "'device' must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got str 'gpu0'"),
    ("model.equalizer.mode=explict", "'model.equalizer.mode' must be one of off, explicit, fold, got str 'explict'"),
    ("work_dir=5", "'work_dir' must be str or null, got int 5"),
    ("model.encoder.output_stride=12", "'model.encoder.output_stride' must be one of 8, 16, 32 or null, got int 12"),
    ("optim.lr=0", "'optim.lr' must be number > 0, got int 0"),
])
def test_bad_values_are_one_line_errors_naming_key_and_value(override, message):
    with pytest.raises(ConfigError) as info:
        densefuse.load_config("seg/synthetic_upernet_r18", [override])
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"--set {override}: ")
    assert message in text


def test_bad_value_in_a_file_names_the_file(tmp_path):
    _write(tmp_path / "v.yaml", {"train": {"batch_size": 0}})
    with pytest.raises(ConfigError, match=r"v.yaml: 'train.batch_size' must be int >= 1, got int 0"):
        densefuse.load_config(tmp_path / "v.yaml")


def test_good_values_pass():
    cfg = densefuse.load_config("seg/synthetic_upernet_r18", [
        "device=cuda:1", "train.grad_clip=null", "calibration.num_images=null", "work_dir=runs/x",
        "model.encoder.output_stride=8", "data.crop_size=[32, 48]"])
    assert cfg.device == "cuda:1" and cfg.train.grad_clip is None and cfg.data.crop_size == [32, 48]


def test_pool_branch_batch_norm_needs_two_images():
    with pytest.raises(ConfigError, match=r"train.batch_size=1 is too small for model.decode_head.type 'uper': its "
                                          r"pool-scale-1 branch batch-normalizes a 1x1 map.*use train.batch_size >= 2"):
        densefuse.load_config("seg/synthetic_upernet_r18", ["train.batch_size=1"])
    cfg = densefuse.load_config("seg/synthetic_upernet_r18", ["train.batch_size=1", "model.decode_head.type=fcn"])
    assert cfg.train.batch_size == 1


# ------------------------------------------------------------------------------- switching heads
@pytest.mark.parametrize("head", ["psp", "aspp", "fcn", "sep_aspp", "uper"])
def test_switching_the_head_with_set_just_works(head):
    cfg = densefuse.load_config("seg/synthetic_upernet_r18", [f"model.decode_head.type={head}",
                                                              "model.equalizer.mode=off"])
    spec = cfg.model.decode_head
    assert spec["type"] == head and spec["channels"] == 64 and spec["dropout"] == 0.1  # inherited and accepted
    if head in ("psp", "aspp", "fcn", "sep_aspp"):
        assert "in_index" not in spec  # UPerHead's list: the new head's default applies
    if head in ("aspp", "fcn", "sep_aspp"):
        assert "pool_scales" not in spec
    model = densefuse.build_model(cfg).eval()
    assert model(torch.randn(1, 3, 64, 64))["out"].shape == (1, 6, 64, 64)


def test_switching_the_head_in_the_top_file(tmp_path):
    base = find_config("seg/synthetic_upernet_r18").resolve()
    _write(tmp_path / "psp.yaml", {"_base_": [str(base)], "model": {"decode_head": {"type": "psp", "in_index": 3}}})
    spec = densefuse.load_config(tmp_path / "psp.yaml").model.decode_head
    assert spec == {"type": "psp", "in_index": 3, "channels": 64, "pool_scales": [1, 2, 3, 6], "dropout": 0.1}


def test_keys_the_user_wrote_are_never_dropped(tmp_path):
    with pytest.raises(ConfigError) as info:
        densefuse.load_config("seg/synthetic_upernet_r18", ["model.decode_head.type=fcn",
                                                            "model.decode_head.pool_scales=[1, 2]"])
    assert str(info.value).startswith("--set model.decode_head.pool_scales=[1, 2]: unknown config key "
                                      "'model.decode_head.pool_scales' for model.decode_head.type 'fcn'; remove it")
    with pytest.raises(ConfigError, match=r"'model.decode_head.in_index' must be int for model.decode_head.type "
                                          r"'psp', got list \[0, 1\]; remove it to use the default -1"):
        densefuse.load_config("seg/synthetic_upernet_r18", ["model.decode_head.type=psp",
                                                            "model.decode_head.in_index=[0, 1]"])
    base = find_config("seg/synthetic_upernet_r18").resolve()
    _write(tmp_path / "t.yaml", {"_base_": [str(base)], "model": {"decode_head": {"type": "fcn", "pool_scales": [1]}}})
    with pytest.raises(ConfigError, match=r"t.yaml: unknown config key 'model.decode_head.pool_scales' for "):
        densefuse.load_config(tmp_path / "t.yaml")


def test_head_values_checked_at_load():
    with pytest.raises(ConfigError, match=r"'model.decode_head.branch' must be one of conv_bn_relu_up, "
                                          r"conv_relu_up_bn, conv_relu_up_gn, conv_relu_up_ln, got str 'conv_relu_up_bm'"):
        densefuse.load_config("seg/synthetic_upernet_r18", ["model.decode_head.branch=conv_relu_up_bm"])
    with pytest.raises(ConfigError, match=r"unknown model.decode_head.predictor 'clsseg' \(did you mean 'cls_seg'"):
        densefuse.load_config("seg/synthetic_upernet_r18", ["model.decode_head.predictor=clsseg"])
    with pytest.raises(ConfigError, match=r"unknown model.auxiliary_head.type 'fcm' \(did you mean 'fcn'"):
        densefuse.load_config("seg/synthetic_upernet_r18", ["model.auxiliary_head.type=fcm"])


def test_a_head_with_a_required_argument_says_so():
    from torch import nn

    from densefuse.registry import HEADS

    @HEADS.register("test_needs_width")
    class NeedsWidth(nn.Module):
        def __init__(self, in_channels, width, align_corners=False, eq_mode="explicit", eq_eps=1e-5):
            super().__init__()

    try:
        with pytest.raises(ConfigError, match=r"model.decode_head.type 'test_needs_width' needs "
                                              r"'model.decode_head.width' \(required arguments: width\)"):
            densefuse.load_config("seg/synthetic_upernet_r18", ["model.decode_head.type=test_needs_width"])
    finally:
        HEADS._items.pop("test_needs_width")


@pytest.mark.parametrize("key, value, message", [
    ("train.amp", "fp32", "'train.amp' must be one of off, fp16, bf16"),
    ("train.accum_steps", "0", "'train.accum_steps' must be int >= 1"),
    ("train.keep_last", "-1", "'train.keep_last' must be int >= 0"),
    ("train.dist_timeout", "0", "'train.dist_timeout' must be number > 0"),
    ("model.sync_bn", "yes", "'model.sync_bn' must be bool or null"),
    ("data.pipeline", "legacy", "'data.pipeline' must be one of batch, mmseg"),
    ("eval.mode", "tiles", "'eval.mode' must be one of whole, slide"),
    ("eval.mode", "slide", "eval.mode 'slide' needs eval.crop_size and eval.stride"),
    ("eval.tta.scales", "[0.5, -1]", "'eval.tta.scales' must be a list of numbers > 0"),
    ("optim.paramwise.layer_decay", "{rate: 2, num_layers: 6}", "0 < rate <= 1"),
])
def test_engine_eval_and_paper_keys_are_checked_at_load(key, value, message):
    with pytest.raises(densefuse.ConfigError, match=re.escape(message)):
        densefuse.load_config("seg/synthetic_upernet_r18", [f"{key}={value}"])


def test_paper_keys_have_defaults_and_accept_good_values():
    cfg = densefuse.load_config("seg/synthetic_upernet_r18", [
        "eval.mode=slide", "eval.crop_size=[64, 64]", "eval.stride=[32, 32]", "eval.tta.flip=true",
        "optim.paramwise.custom_keys={norm: {decay_mult: 0.0}}", "data.pipeline=mmseg", "train.amp=bf16"])
    assert cfg.eval.stride == [32, 32] and cfg.eval.tta.flip is True and cfg.eval.tta.scales is None
    assert cfg.optim.paramwise.custom_keys == {"norm": {"decay_mult": 0.0}}
    assert cfg.data.pipeline == "mmseg" and cfg.data.cat_max_ratio == 0.75
    assert densefuse.load_config("seg/synthetic_smp_upernet_r18").data.pipeline == "batch"


def test_find_config_adds_yaml_to_names_with_dots(tmp_path, monkeypatch):
    (tmp_path / "configs" / "depth").mkdir(parents=True)
    f = tmp_path / "configs" / "depth" / "gedepth-vanilla_swin-l_8xb2-76.8k_kitti-352x704.yaml"
    f.write_text("seed: 1\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("depth/gedepth-vanilla_swin-l_8xb2-76.8k_kitti-352x704").resolve() == f.resolve()
    assert find_config(str(f)) == f


def test_a_file_switching_the_dataset_drops_the_bases_dataset_keys(tmp_path):
    """The top file (like --set) switching data.type drops the base's data.kwargs for the old dataset; its
    own data.kwargs are checked against the new dataset."""
    base = find_config("seg/synthetic_upernet_r18").resolve()
    _write(tmp_path / "ade.yaml", {"_base_": [str(base)], "model": {"num_classes": 150},
                                   "data": {"type": "ade20k", "root": "ade", "kwargs": {"reduce_zero_label": False}}})
    cfg = densefuse.load_config(tmp_path / "ade.yaml")
    assert dict(cfg.data.kwargs) == {"reduce_zero_label": False}
    _write(tmp_path / "bad.yaml", {"_base_": [str(base)], "model": {"num_classes": 150},
                                   "data": {"type": "ade20k", "root": "ade", "kwargs": {"size": [32, 32]}}})
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'data.kwargs.size' for data.type 'ade20k'; "
                                          r"it takes: reduce_zero_label"):
        densefuse.load_config(tmp_path / "bad.yaml")
    # without a switch every key counts: the synthetic dataset's own kwargs are checked as before
    with pytest.raises(ConfigError, match=r"unknown config key 'data.kwargs.reduce_zero_label' for data.type 'synthetic'"):
        densefuse.load_config("seg/synthetic_upernet_r18", ["data.kwargs.reduce_zero_label=true"])


def test_an_embedded_config_keeps_every_key(default_cfg):
    """A checkpoint's config has no _base_ layers: nothing counts as inherited, so nothing is dropped."""
    from densefuse.config import from_dict

    data = default_cfg.to_dict()
    data["data"]["type"] = "ade20k"
    data["data"]["root"] = "ade"
    data["model"]["num_classes"] = 150
    with pytest.raises(ConfigError, match=r"unknown config key 'data.kwargs.num_train' for data.type 'ade20k'"):
        from_dict(data)


def test_task_rules_list_choices_for_any_type():
    from densefuse.config import Rule
    from densefuse.config.loader import config_class

    rules = config_class("depth").rules()
    assert rules["depth.eval_crop"] == Rule("str", choices=("garg", "eigen", "none"))
    assert "train.amp" in rules and not any(k.startswith("depth.") for k in config_class("seg").rules())
    assert "data.pipeline" in config_class("seg").rules() and "data.pipeline" not in rules
    with pytest.raises(ConfigError, match=r"'depth.eval_crop' must be one of garg, eigen, none, got int 3"):
        densefuse.load_config("depth/gedepth-vanilla_r18_1xb4-300_synthetic-64x192", ["depth.eval_crop=3"])


def test_optim_type_is_a_choice_in_any_letter_case():
    assert densefuse.load_config("seg/synthetic_upernet_r18", ["optim.type=AdamW"]).optim.type == "AdamW"
    with pytest.raises(ConfigError, match=r"'optim.type' must be one of adamw, sgd, got str 'adam'"):
        densefuse.load_config("seg/synthetic_upernet_r18", ["optim.type=adam"])


def test_a_config_that_is_not_text_or_has_a_bad_base_is_one_line(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match=r"bin.yaml: not a UTF-8 text file \(byte 0: invalid start byte\)"):
        densefuse.load_config(tmp_path / "bin.yaml")
    (tmp_path / "ok.yaml").write_text("seed: 1\n")
    for bad, shown in (("5", "5"), ("[ok.yaml, 3]", r"\['ok.yaml', 3\]")):
        (tmp_path / "b.yaml").write_text(f"_base_: {bad}\n")
        with pytest.raises(ConfigError, match=rf"b.yaml: _base_ must be a file name or a list of file names, got {shown}"):
            densefuse.load_config(tmp_path / "b.yaml")
