"""The typed config: declared once, validated once, owned by its task; a third task needs no change in densefuse/."""
import copy

import pytest
import torch
import yaml
from click.testing import CliRunner
from torch import nn
from torch.utils.data import Dataset

import densefuse
from densefuse import ConfigError
from densefuse.cli import main
from densefuse.config import Rule, Section, configclass, from_dict, setting, subsection
from densefuse.config.sections import CoreConfig, EvalSection, TrainSection
from densefuse.registry import TASKS
from densefuse.tasks import Task, register_task, task_class

TINY_SEG = ["train.iters=2", "train.val_interval=2", "train.ckpt_interval=2", "train.batch_size=2",
            "data.kwargs.num_train=4", "data.kwargs.num_val=2", "data.crop_size=[32,32]", "data.kwargs.size=[32,32]",
            "calibration.num_images=2", "calibration.batch_size=2", "model.auxiliary_head=null", "device=cpu"]
TINY_DEPTH = ["train.iters=2", "train.val_interval=2", "train.ckpt_interval=2", "train.batch_size=2",
              "data.kwargs.num_train=4", "data.kwargs.num_val=2", "calibration.num_images=2",
              "calibration.batch_size=2", "device=cpu"]


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_the_config_is_typed_and_reads_like_a_dict(default_cfg):
    cfg = default_cfg
    assert type(cfg).__name__ == "SegConfig" and isinstance(cfg.train, TrainSection) and isinstance(cfg.eval, EvalSection)
    assert cfg["train"]["iters"] == cfg.train.iters and dict(cfg.eval.tta) == {"flip": False, "scales": None}
    cfg["train"]["iters"] = 3
    assert cfg.train.iters == 3
    with pytest.raises(KeyError, match="did you mean 'iters'"):
        cfg["train"]["itres"] = 3
    plain = cfg.to_dict()  # what checkpoints embed: plain dicts only
    assert type(plain) is dict and type(plain["model"]["equalizer"]) is dict and type(plain["model"]["decode_head"]) is dict
    assert from_dict(plain) == cfg and copy.deepcopy(cfg) == cfg


def test_each_section_belongs_to_its_owner():
    seg, depth = task_class("seg").config_class, task_class("depth").config_class
    assert "data.cat_max_ratio" in seg.rules() and "data.cat_max_ratio" not in depth.rules()
    assert "data.pipeline" not in CoreConfig.rules() and "depth.max_depth" in depth.rules()
    assert "model.neck" in depth.open_keys() and "seg.overlay_alpha" in seg.rules()
    with pytest.raises(ConfigError, match=r"--set data.pipeline: no config key 'data.pipeline'"):
        densefuse.load_config("depth/gedepth-vanilla_r18_1xb4-300_synthetic-64x192", ["data.pipeline=mmseg"])


def test_each_default_is_stated_once():
    import densefuse_tasks.seg.pipeline as pipeline

    import densefuse.engine.optim as optim
    import densefuse.inference as inference

    assert not any(hasattr(m, n) for m, n in ((optim, "PARAMWISE_DEFAULTS"), (inference, "EVAL_DEFAULTS"),
                                              (pipeline, "DATA_DEFAULTS")))
    from tools.config_keys import main as keys

    assert keys(["--check"]) == 0  # docs/configs.md's key tables are the declarations'


def test_a_checkpoint_config_of_an_older_version_still_loads(default_cfg):
    depth = densefuse.load_config("depth/gedepth-vanilla_r18_1xb4-300_synthetic-64x192").to_dict()
    depth["data"].update(pipeline="batch", scale=None, ratio_range=[0.5, 2.0], cat_max_ratio=0.75, test_scale=None)
    from densefuse.config.loader import drop_legacy_keys

    assert from_dict(drop_legacy_keys(depth)).data.crop_size == depth["data"]["crop_size"]
    depth["data"]["pipeline"] = "mmseg"  # a value a user set is not dropped
    with pytest.raises(ConfigError, match="unknown config key 'data.pipeline'"):
        from_dict(drop_legacy_keys(depth))


@pytest.fixture
def count_validations(monkeypatch):
    calls = []
    for name in ("seg", "depth"):
        cls = task_class(name)
        original = cls.validate_config
        monkeypatch.setattr(cls, "validate_config", lambda self, cfg, _o=original: (calls.append(1), _o(self, cfg))[1])
    return calls


def test_validation_runs_once_per_command(count_validations, tmp_path):
    calls = count_validations
    run = tmp_path / "seg"
    assert _cli("train", "--task", "seg", "--work-dir", run, *sum((["--set", o] for o in TINY_SEG), [])).exit_code == 0
    assert len(calls) == 1
    assert _cli("eval", "-k", run / "final.pth").exit_code == 0
    assert len(calls) == 2
    assert _cli("calibrate", "--task", "seg", "--out", tmp_path / "c.csv", "--num-images", 2,
                *sum((["--set", o] for o in TINY_SEG), [])).exit_code == 0
    assert len(calls) == 3
    result = _cli("train", "--task", "depth", "--work-dir", tmp_path / "depth",
                  *sum((["--set", o] for o in TINY_DEPTH), []))
    assert result.exit_code == 0, result.output
    assert len(calls) == 4


# ------------------------------------------------------------------------------------------ a third task
@configclass
class ToySection(Section):
    gain: float = setting(2.0, Rule("number", gt=0), "the target is the image's mean times this")
    width: int = setting(4, Rule("int", min=1), "channels of the toy network")


@configclass
class ToyConfig(CoreConfig):
    toy: ToySection = subsection(ToySection, "the toy task's own settings")


class ToyData(Dataset):
    def __init__(self, n, gain, seed):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
        self.gain = gain

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return {"image": image, "target": image.float().mean(0, keepdim=True) / 255 * self.gain}


class ToyMetric:
    def reset(self):
        self.sum, self.n = 0.0, 0

    def update(self, outputs, batch):
        self.sum += float(((outputs["out"] - batch["target"]) ** 2).mean()) * len(batch["target"])
        self.n += len(batch["target"])

    def compute(self):
        return {"mse": self.sum / max(self.n, 1)}

    def tables(self):
        return {}


class ToyTask(Task):
    """Per-pixel regression of a scaled brightness: its own section, dataset, model and metric."""

    default_config = ""
    primary_metric = "mse"
    metric_direction = "min"
    config_class = ToyConfig

    def validate_config(self, cfg):
        if cfg.data.type != "synthetic":
            raise ConfigError(f"the toy task has no dataset '{cfg.data.type}'")

    def build_dataset(self, cfg, split):
        return ToyData(4 if split == cfg.data.train_split else 2, cfg.toy.gain, cfg.seed)

    def build_model(self, cfg):
        w = cfg.toy.width
        return nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 1, 1))

    def forward(self, model, batch):
        return {"out": model(batch["image"])}

    def build_transform(self, cfg, train):
        mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
        return lambda b: {**b, "raw_image": b["image"], "image": (b["image"].float() - mean) / std}

    def loss(self, outputs, batch):
        loss = ((outputs["out"] - batch["target"]) ** 2).mean()
        return loss, {"mse": float(loss.detach())}

    def metric(self, cfg):
        m = ToyMetric()
        m.reset()
        return m

    def predict(self, outputs):
        return outputs["out"]


@pytest.fixture
def toy_task():
    register_task("toy")(ToyTask)
    yield ToyTask
    TASKS._items.pop("toy")


def test_a_third_task_with_its_own_section_trains_through_the_cli(toy_task, tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "task": "toy", "device": "cpu", "toy": {"gain": 3.0, "width": 2},
        "model": {"equalizer": {"mode": "off"}},
        "train": {"iters": 2, "batch_size": 2, "val_interval": 2, "ckpt_interval": 2, "log_interval": 1},
    }))
    bad = _cli("train", "-c", config, "--work-dir", tmp_path / "bad", "--set", "toy.gian=1")
    assert bad.exit_code == 2 and "--set toy.gian: no config key 'toy.gian' (did you mean 'toy.gain'?)" in bad.output
    assert not (tmp_path / "bad").exists()
    bad = _cli("train", "-c", config, "--work-dir", tmp_path / "bad", "--set", "toy.width=0")
    assert bad.exit_code == 2 and "'toy.width' must be int >= 1, got int 0" in bad.output
    result = _cli("train", "-c", config, "--work-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    saved = torch.load(tmp_path / "run" / "final.pth", weights_only=True)
    assert saved["config"]["toy"] == {"gain": 3.0, "width": 2}
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].count("mse")
