"""One contract every task honours: run over every registered task (seg today, depth when it lands).

Each task is exercised the way the trainer, evaluation and ``densefuse predict`` use it: its default
config with tiny sizes, dataset, batch transform, model, ``forward``, ``loss``, metric, ``predict`` and
``visualize``, plus the declarations the core reads (dense keys, config section, metric direction).
"""
from collections.abc import Mapping
from importlib.metadata import entry_points

import pandas as pd
import pytest
import torch

import densefuse
from densefuse.config import find_config
from densefuse.data.loader import build_loader
from densefuse.equalizer import equalizers
from densefuse.tasks import ENTRY_POINT_GROUP, DenseKey, task_class
from tests.conftest import declared_tasks

#: core keys only, so that every task's default config takes them
TINY = ["data.crop_size=[64, 64]", "train.batch_size=2", "eval.batch_size=2", "data.num_workers=0",
        "calibration.num_images=2", "calibration.batch_size=2"]
#: every installed task (entry points, and those setup.cfg declares that an older editable install's metadata
#: lacks: tests/conftest.py registers them); toy tasks that other test modules register in code are left out
TASKS = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | set(declared_tasks()))


def test_seg_is_registered():
    assert "seg" in TASKS


@pytest.fixture(scope="module", params=TASKS)
def setup(request):
    name = request.param
    cls = task_class(name)
    cfg = densefuse.load_config(cls.default_config, TINY)
    return name, cls, cfg, densefuse.get_task(name, cfg)


def test_declarations(setup):
    name, cls, cfg, task = setup
    assert cls.name == name and isinstance(task, densefuse.Task)
    assert find_config(cls.default_config).is_file() and cfg.task == name
    assert isinstance(cls.primary_metric, str) and cls.primary_metric
    assert cls.metric_direction in ("max", "min")
    better, worse = (2.0, 1.0) if cls.metric_direction == "max" else (1.0, 2.0)
    assert task.is_better(better, worse) and not task.is_better(worse, better) and task.is_better(worse, None)
    assert isinstance(cls.dense_keys, Mapping) and "image" not in cls.dense_keys
    for key, spec in cls.dense_keys.items():
        assert isinstance(key, str) and isinstance(spec, DenseKey)
        assert spec.resample in ("bilinear", "nearest") and isinstance(spec.fill, (int, float))
    assert isinstance(cls.config_section, Mapping)
    if cls.config_section:
        assert all(isinstance(k, str) for k in cls.config_section)
        assert set(cls.config_section) <= set(cfg[name])  # merged into the config and validated
    task.validate_config(cfg)


def _batch(task, cfg, split, train):
    data = task.build_dataset(cfg, cfg.data[split])
    assert len(data) > 0
    loader = build_loader(data, 2, train=train, num_workers=0, seed=0)
    batch = next(iter(loader))
    return task.build_transform(cfg, train=train)(batch)


def _check_dense(task, batch):
    image = batch["image"]
    assert image.dtype == torch.float32 and image.ndim == 4 and image.shape[1] == 3
    declared = type(task).dense_keys
    present = [k for k in declared if k in batch]  # optional keys (e.g. seg's "valid") come with some pipelines only
    assert present, f"none of the declared dense keys {sorted(declared)} is in the batch"
    for key in present:
        assert batch[key].shape[0] == image.shape[0] and batch[key].shape[-2:] == image.shape[-2:], key
    for key, value in batch.items():  # every other per-pixel tensor must be declared, or augmentation drops it
        if key not in ("image", "raw_image") and isinstance(value, torch.Tensor) and value.ndim >= 3 \
                and value.shape[-2:] == image.shape[-2:]:
            assert key in declared, f"per-pixel batch key '{key}' is not in {type(task).__name__}.dense_keys"


def test_train_step(setup):
    name, _, cfg, task = setup
    batch = _batch(task, cfg, "train_split", train=True)
    _check_dense(task, batch)
    assert tuple(batch["image"].shape[-2:]) == (64, 64)
    torch.manual_seed(0)
    model = task.build_model(cfg)
    if cfg.model.equalizer.mode != "off" and any(True for _ in equalizers(model)):
        table = densefuse.calibrate(model, [batch], forward=task.forward)
        assert len(table) > 0
    model.train()
    outputs = task.forward(model, batch)
    loss, parts = task.loss(outputs, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in parts.items())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_eval_metric_predict_visualize(setup):
    name, cls, cfg, task = setup
    batch = _batch(task, cfg, "val_split", train=False)
    _check_dense(task, batch)
    torch.manual_seed(0)
    model = task.build_model(cfg)
    if cfg.model.equalizer.mode != "off" and any(True for _ in equalizers(model)):
        densefuse.calibrate(model, [_batch(task, cfg, "train_split", train=True)], forward=task.forward)
    model.eval()
    with torch.no_grad():
        outputs = task.forward(model, batch)
    metric = task.metric(cfg)
    metric.update(outputs, batch)
    summary = metric.compute()
    assert cls.primary_metric in summary
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in summary.items())
    tables = metric.tables() if hasattr(metric, "tables") else {}
    assert all(isinstance(k, str) and isinstance(v, pd.DataFrame) for k, v in tables.items())
    metric.reset()

    prediction = task.predict(outputs)
    b, _, h, w = batch["image"].shape
    assert isinstance(prediction, torch.Tensor) and prediction.shape[0] == b and prediction.shape[-2:] == (h, w)
    # a task may stack several rows per sample (prediction, ground truth, legend): width and channels fixed,
    # height at least the image's
    pictures = task.visualize(batch, prediction)
    assert pictures.dtype == torch.uint8 and pictures.shape[:2] == (b, 3) and pictures.shape[-1] == w
    assert pictures.shape[-2] >= h
