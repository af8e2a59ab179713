"""One contract every installed task honours, generated per task (every entry point of ``densefuse.tasks``).

Each member of :class:`densefuse.tasks.Task` and :class:`densefuse.tasks.Metric` is exercised the way the
core uses it: the default config with tiny sizes, dataset, batch transform, model, ``forward``, ``loss``
(finite, backward reaches the weights), the metric (``update`` / ``compute`` / ``tables``), ``predict``,
``merge_tta`` on real flip views, ``predict_sample`` -> ``test_pipeline`` -> ``save_prediction`` as
``densefuse predict`` runs them, ``visualize``, ``is_better``, plus the declarations the core reads.
Toy tasks that other test modules register in code are left out: they implement only what they test.
"""
from collections.abc import Mapping
from importlib.metadata import entry_points

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

import densefuse
from densefuse.calibration import equalizers
from densefuse.config import find_config
from densefuse.config.sections import CoreConfig
from densefuse.data.loader import build_loader
from densefuse.engine.evaluate import evaluate_full, infer_outputs
from densefuse.inference import infer
from densefuse.tasks import ENTRY_POINT_GROUP, DenseKey, Metric, Task, task_class, unwrap_outputs
from tests.conftest import declared_tasks

#: core keys only, so that every task's default config takes them (resnet10t: the smallest timm ResNet)
TINY = ["data.crop_size=[64, 64]", "train.batch_size=2", "eval.batch_size=2", "data.num_workers=0", "model.encoder.name=resnet10t",
        "calibration.num_images=2", "calibration.batch_size=2"]
#: every installed task (entry points, and those setup.cfg declares that an older editable install's metadata
#: lacks: tests/conftest.py registers them); toy tasks that other test modules register in code are left out
TASKS = sorted({ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)} | set(declared_tasks()))


def test_the_shipped_tasks_are_installed():
    assert {"seg", "depth", "normals"} <= set(TASKS)


def _batch(task, cfg, split, train):
    data = task.build_dataset(cfg, cfg.data[split])
    assert len(data) > 0
    loader = build_loader(data, 2, train=train, num_workers=0, seed=0)
    return task.build_transform(cfg, train=train)(next(iter(loader)))


@pytest.fixture(scope="module", params=TASKS)
def built(request):
    """``(name, class, config, task, model, train batch, val batch)``; the model is calibrated on the train
    batch when its config equalizes (as the trainer does before step 0)."""
    name = request.param
    cls = task_class(name)
    cfg = densefuse.load_config(cls.default_config, TINY)
    task = densefuse.get_task(name, cfg)
    train, val = _batch(task, cfg, "train_split", True), _batch(task, cfg, "val_split", False)
    torch.manual_seed(0)
    model = task.build_model(cfg)
    if cfg.model.equalizer.mode != "off" and any(True for _ in equalizers(model)):
        assert len(densefuse.calibrate(model, [train], forward=task.forward)) > 0
    return name, cls, cfg, task, model.eval(), train, val


def test_declarations(built):
    name, cls, cfg, task, *_ = built
    assert cls.name == name and isinstance(task, Task) and task.cfg is cfg
    assert find_config(cls.default_config).is_file() and cfg.task == name
    assert isinstance(cls.primary_metric, str) and cls.primary_metric
    assert cls.metric_direction in ("max", "min")
    better, worse = (2.0, 1.0) if cls.metric_direction == "max" else (1.0, 2.0)
    assert task.is_better(better, worse) and not task.is_better(worse, better) and task.is_better(worse, None)
    assert isinstance(cls.dense_keys, Mapping) and "image" not in cls.dense_keys
    for key, spec in cls.dense_keys.items():
        assert isinstance(key, str) and isinstance(spec, DenseKey)
        assert spec.resample in ("bilinear", "nearest") and isinstance(spec.fill, (int, float))
    assert issubclass(cls.config_class, CoreConfig) and type(cfg) is cls.config_class  # its schema, validated
    assert all(isinstance(m, str) for m in cls.table_metrics) and isinstance(cls.predict_calib, bool)
    task.validate_config(cfg)


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


def test_train_step(built):
    _, _, cfg, task, model, batch, _ = built
    _check_dense(task, batch)
    assert tuple(batch["image"].shape[-2:]) == (64, 64)
    model.train()
    try:
        loss, parts = task.loss(task.forward(model, batch), batch)
        assert loss.ndim == 0 and torch.isfinite(loss) and loss.requires_grad
        assert all(isinstance(k, str) and isinstance(v, float) for k, v in parts.items())
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def test_metric_predict_visualize(built):
    _, cls, cfg, task, model, _, batch = built
    _check_dense(task, batch)
    with torch.no_grad():
        outputs = task.forward(model, batch)
    metric = task.metric(cfg)
    assert isinstance(metric, Metric)
    metric.reset()
    metric.update(outputs, batch)
    summary = metric.compute()
    listed = summary if cls.table_metrics == "all" else cls.table_metrics  # "all": every summary metric
    assert task.primary_metric in summary and set(listed) <= set(summary)
    assert all(isinstance(k, str) and isinstance(v, float) for k, v in summary.items())
    tables = metric.tables()
    assert isinstance(tables, dict)
    assert all(isinstance(k, str) and isinstance(v, pd.DataFrame) for k, v in tables.items())
    # the evaluation path reads the same members, with nothing but the protocol
    full, full_tables = evaluate_full(model, task, [batch], lambda b: b, torch.device("cpu"))
    assert set(full) == set(summary) and set(full_tables) == set(tables)

    prediction = task.predict(outputs)
    b, _, h, w = batch["image"].shape
    assert isinstance(prediction, torch.Tensor) and prediction.shape[0] == b and prediction.shape[-2:] == (h, w)
    # a task may stack several rows per sample (prediction, ground truth, legend): width and channels fixed,
    # height at least the image's
    pictures = task.visualize(batch, prediction)
    assert pictures.dtype == torch.uint8 and pictures.shape[:2] == (b, 3) and pictures.shape[-1] == w
    assert pictures.shape[-2] >= h


def _mirrored(batch):
    """The batch seen in a mirror: every per-pixel tensor of the image's size flipped."""
    size = batch["image"].shape[-2:]
    return {k: v.flip(-1) if isinstance(v, torch.Tensor) and v.ndim >= 3 and v.shape[-2:] == size else v
            for k, v in batch.items()}


def test_merge_tta_on_flip_views(built):
    _, _, cfg, task, model, _, batch = built
    with torch.no_grad():
        plain = unwrap_outputs(task.forward(model, batch))["out"]
        back = unwrap_outputs(task.forward(model, _mirrored(batch)))["out"].flip(-1)
        merged = task.merge_tta([plain, back], [False, True])
        core = infer(task.forward, model, batch, {"tta": {"flip": True}}, merge=task.merge_tta)["out"]
    assert isinstance(merged, dict) and merged["out"].shape == plain.shape and torch.isfinite(merged["out"]).all()
    torch.testing.assert_close(core, merged["out"], rtol=1e-4, atol=1e-5)  # the core hands over these views
    prediction = task.predict(merged)
    assert prediction.shape == task.predict({"out": plain}).shape
    # one view twice merges to that view's prediction
    twice = task.predict(task.merge_tta([plain, plain], [False, False]))
    torch.testing.assert_close(twice.float(), task.predict({"out": plain}).float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        task.merge_tta([], [])


def _read(path):
    if path.suffix == ".npy":
        return np.load(path)
    with Image.open(path) as im:
        return np.asarray(im)


def test_predict_sample_pipeline_and_save_prediction(built, tmp_path):
    """``densefuse predict`` for one picture: predict_sample -> test_pipeline -> collate -> transform ->
    inference -> predict -> save_prediction, the files readable and at the picture's size."""
    _, _, cfg, task, model, _, _ = built
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8, generator=g)
    picture = tmp_path / "in" / "picture.png"
    picture.parent.mkdir()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(picture)
    sample = task.predict_sample(image, picture)
    assert isinstance(sample, dict) and torch.equal(sample["image"], image)
    pipeline = task.test_pipeline(cfg)
    assert pipeline is None or callable(pipeline)
    if pipeline is not None:
        sample = pipeline(sample)
        assert isinstance(sample, dict) and sample["image"].shape[0] == 3
    batch = task.build_transform(cfg, train=False)(default_collate([sample]))
    with torch.no_grad():
        prediction = task.predict(infer_outputs(model, task, batch))
    assert prediction.shape[0] == 1 and prediction.shape[-2:] == image.shape[-2:]  # back at the picture's size
    paths = task.save_prediction(prediction[0], tmp_path / "out" / "picture", image=image)
    # under the stem's folder, named after it (a composite task writes one subfolder per sub-task)
    assert paths and all(p.is_file() and (tmp_path / "out") in p.parents and p.name.startswith("picture") for p in paths)
    arrays = [_read(p) for p in paths]
    assert arrays[0].shape[:2] == tuple(image.shape[-2:]) or arrays[0].shape[-2:] == tuple(image.shape[-2:])


def test_the_base_class_defaults(tmp_path):
    """What a task gets without overriding: mean TTA merge, the image as its predict sample, ``.npy``
    predictions, no tables, the primary metric alone in comparison tables, ``--calib`` refused."""

    class Bare(Task):
        primary_metric = "err"
        build_dataset = build_transform = loss = metric = predict = None  # type: ignore[assignment]

    class Count(Metric):
        def reset(self):
            self.n = 0

        def update(self, outputs, batch):
            self.n += 1

        def compute(self):
            return {"err": float(self.n)}

    task = Bare()
    a, b = torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 4)
    merged = task.merge_tta([{"out": a, "aux": a}, b], [False, True])
    assert set(merged) == {"out"} and torch.equal(merged["out"], torch.full_like(a, 0.5))
    picture = a[0]
    sample = task.predict_sample(picture, "x.png", None)
    assert list(sample) == ["image"] and sample["image"] is picture
    path, = task.save_prediction(b[0], tmp_path / "p")
    assert path == tmp_path / "p.npy" and np.array_equal(np.load(path), b[0].numpy())
    assert Count().tables() == {} and task.table_metrics == () and task.predict_calib is False
    with pytest.raises(TypeError):
        Metric()  # reset / update / compute are abstract
