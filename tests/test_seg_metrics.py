"""SegMetrics: mmseg IoUMetric semantics on hand-computed confusion matrices."""
import math

import numpy as np
import pytest
import torch
from densefuse_tasks.seg import SegTask
from densefuse_tasks.seg.metrics import SegMetrics


def naive_metrics(preds, targets, num_classes, ignore=255):
    """Reference: loop over pixels, sum intersect/pred/label areas over the dataset (mmseg style)."""
    inter = np.zeros(num_classes)
    area_p = np.zeros(num_classes)
    area_t = np.zeros(num_classes)
    for p, t in zip(preds, targets):
        for pv, tv in zip(np.asarray(p).ravel(), np.asarray(t).ravel()):
            if tv == ignore:
                continue
            area_p[pv] += 1
            area_t[tv] += 1
            if pv == tv:
                inter[tv] += 1
    union = area_p + area_t - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / union, np.nan)
        acc = np.where(area_t > 0, inter / area_t, np.nan)
    return {"mIoU": np.nanmean(iou) * 100, "mAcc": np.nanmean(acc) * 100,
            "aAcc": inter.sum() / area_t.sum() * 100, "iou": iou * 100}


def test_hand_computed_with_ignore():
    target = torch.tensor([[0, 0, 1, 1],
                           [0, 2, 2, 255]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 2, 0, 1]])  # the last pixel is ignored whatever it predicts
    m = SegMetrics(3)
    m.update(pred, target)
    assert m.confusion.tolist() == [[2, 1, 0],
                                    [0, 2, 0],
                                    [1, 0, 1]]
    r = m.compute()
    assert set(r) == {"mIoU", "mAcc", "aAcc"}  # the summary only; per-class values are a table
    iou = m.tables()["per_class"].set_index("class")["IoU"]
    # IoU: c0 2/(3+3-2)=0.5, c1 2/(2+3-2)=2/3, c2 1/(2+1-1)=0.5
    assert iou["class0"] == pytest.approx(50.0)
    assert iou["class1"] == pytest.approx(200 / 3)
    assert iou["class2"] == pytest.approx(50.0)
    assert r["mIoU"] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert r["mAcc"] == pytest.approx((2 / 3 + 1 + 1 / 2) / 3 * 100)
    assert r["aAcc"] == pytest.approx(5 / 7 * 100)


def test_absent_classes():
    # class 2 predicted but not in GT -> IoU 0 (counts); class 3 absent from both -> NaN, excluded
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 2, 1, 1]])
    m = SegMetrics(4)
    m.update(pred, target)
    r = m.compute()
    frame = m.tables()["per_class"]
    assert frame["IoU"][2] == 0.0
    assert math.isnan(frame["IoU"][3])
    assert r["mIoU"] == pytest.approx((50 + 100 + 0) / 3)
    # Acc of class 2 is NaN (no GT pixels), so mAcc averages classes 0 and 1 only
    assert r["mAcc"] == pytest.approx((50 + 100) / 2)
    assert list(frame.columns) == ["class", "IoU", "Acc"]
    assert list(frame["class"]) == ["class0", "class1", "class2", "class3"]
    assert frame["Acc"][0] == pytest.approx(50.0) and math.isnan(frame["Acc"][2])


def test_dataset_level_accumulation_matches_naive_reference():
    g = torch.Generator().manual_seed(0)
    m = SegMetrics(5, class_names=list("abcde"))
    preds, targets = [], []
    for _ in range(4):
        t = torch.randint(0, 5, (2, 7, 9), generator=g)
        t[torch.rand(t.shape, generator=g) < 0.2] = 255
        p = torch.randint(0, 4, (2, 7, 9), generator=g)  # class 4 never predicted
        p = torch.where(torch.rand(p.shape, generator=g) < 0.5, t.clamp(max=4), p)
        m.update(p, t)
        preds += list(p.numpy())
        targets += list(t.numpy())
    ref = naive_metrics(preds, targets, 5)
    r = m.compute()
    for k in ("mIoU", "mAcc", "aAcc"):
        assert r[k] == pytest.approx(ref[k])
    assert list(m.tables()["per_class"]["IoU"]) == pytest.approx(list(ref["iou"]))
    # the ratio of sums differs from the mean of per-image ratios
    per_image = []
    for p, t in zip(preds, targets):
        one = SegMetrics(5)
        one.update(torch.as_tensor(p), torch.as_tensor(t))
        per_image.append(one.compute()["mIoU"])
    assert r["mIoU"] != pytest.approx(float(np.mean(per_image)))


def test_logits_and_metric_protocol():
    target = torch.tensor([[[0, 1], [1, 255]]])
    logits = torch.zeros(1, 2, 2, 2)
    logits[0, 1, 0, 1] = 5  # predicts class 1 at (0,1), class 0 elsewhere
    a, b = SegMetrics(2), SegMetrics(2)
    a.update(logits, target)
    b.update({"out": logits, "aux": logits}, {"label": target, "image": torch.zeros(1, 3, 2, 2)})
    assert torch.equal(a.confusion, b.confusion)
    assert a.confusion.tolist() == [[1, 0], [1, 1]]
    # low-resolution logits are resized to the label size before the argmax
    c = SegMetrics(2)
    c.update(torch.zeros(1, 2, 1, 1).index_fill_(1, torch.tensor([1]), 1.0), target)
    assert c.confusion.tolist() == [[0, 1], [0, 2]]
    a.reset()
    assert math.isnan(a.compute()["mIoU"])


def test_bad_inputs_raise():
    m = SegMetrics(2)
    with pytest.raises(ValueError):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError):
        m.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 7))


def test_task_metric_and_predict():
    cfg = {"model": {"num_classes": 3, "align_corners": False}, "data": {"type": "synthetic"}}
    task = SegTask(cfg)
    metric = task.metric(cfg)
    assert metric.class_names == ["background", "disk", "rectangle"]
    logits = torch.randn(2, 3, 4, 4)
    pred = task.predict({"out": logits})
    assert torch.equal(pred, logits.argmax(1))
    assert torch.equal(task.predict(logits), pred)
    metric.update({"out": logits}, {"label": pred})
    assert metric.compute()["aAcc"] == pytest.approx(100.0)
