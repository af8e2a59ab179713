"""Config loading: _base_ inheritance, overrides, strict keys with hints, type checks."""
import pytest
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
    _write(tmp_path / "a.yaml", {"train": {"iters": 5, "batch_size": 3}, "seed": 1})
    _write(tmp_path / "b.yaml", {"_base_": "a.yaml", "train": {"iters": 7}})
    cfg = densefuse.load_config(tmp_path / "b.yaml", ["seed=9", "optim.lr=0.5", "train.amp=true"])
    assert cfg.train.iters == 7 and cfg.train.batch_size == 3
    assert cfg.seed == 9 and cfg.optim.lr == 0.5 and cfg.train.amp is True
    assert cfg.train.val_interval == densefuse.config.DEFAULTS["train"]["val_interval"]


def test_delete_replaces_a_section(tmp_path):
    _write(tmp_path / "a.yaml", {"model": {"decode_head": {"type": "uper", "pool_scales": [1, 2]}}})
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
    with pytest.raises(ConfigError, match=r"'train.iters' must be int, got str 'many'"):
        densefuse.load_config(tmp_path / "c.yaml", ["train.iters=many"])
    with pytest.raises(ConfigError, match="key=value"):
        densefuse.load_config(tmp_path / "c.yaml", ["train.iters"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        densefuse.load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        densefuse.load_config(tmp_path / "bad.yaml")
    _write(tmp_path / "child.yaml", {"_base_": "missing_base.yaml"})
    with pytest.raises(ConfigError, match="_base_ file not found: missing_base.yaml"):
        densefuse.load_config(tmp_path / "child.yaml")
    _write(tmp_path / "loop.yaml", {"_base_": "loop.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        densefuse.load_config(tmp_path / "loop.yaml")


def test_head_kwargs_are_checked_at_build(default_cfg):
    default_cfg.model.decode_head["pool_scale"] = [1, 2]
    with pytest.raises(ConfigError, match=r"model.decode_head.pool_scale' \(did you mean 'model.decode_head.pool_scales'"):
        densefuse.build_model(default_cfg)


def test_bare_names_resolve_in_configs_dir():
    assert find_config("seg/synthetic_upernet_r18").name == "synthetic_upernet_r18.yaml"


def test_yaml12_booleans_keep_mode_off_a_string(tmp_path):
    (tmp_path / "m.yaml").write_text("model:\n  equalizer:\n    mode: off\ntrain:\n  amp: true\n")
    cfg = densefuse.load_config(tmp_path / "m.yaml", ["data.augment.flip=false"])
    assert cfg.model.equalizer.mode == "off"
    assert cfg.train.amp is True and cfg.data.augment.flip is False
    cfg = densefuse.load_config(tmp_path / "m.yaml", ["model.equalizer.mode=fold"])
    assert cfg.model.equalizer.mode == "fold"
