"""Segmentation loss: mmseg's averaging (sum over non-ignored pixels / all pixels) and the aux term."""
import pytest
import torch
import torch.nn.functional as F
from densefuse_tasks.seg import SegTask
from densefuse_tasks.seg.loss import seg_cross_entropy


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 4, (2, 5, 6), generator=g)
    target[0, :2] = 255  # 12 of 60 pixels ignored
    return logits, target


def test_mmseg_averaging_divides_by_all_pixels():
    logits, target = _data()
    keep = target != 255
    # by hand: -log softmax at the target class, summed over kept pixels, divided by all 60 pixels
    logp = torch.log_softmax(logits, 1)
    picked = logp.gather(1, target.clamp(max=3).unsqueeze(1)).squeeze(1)
    expected = -(picked[keep]).sum() / target.numel()
    assert seg_cross_entropy(logits, target) == pytest.approx(float(expected), rel=1e-5)
    torch_mean = F.cross_entropy(logits, target, ignore_index=255)
    assert seg_cross_entropy(logits, target) == pytest.approx(float(torch_mean) * keep.sum().item() / target.numel(), rel=1e-5)
    assert seg_cross_entropy(logits, target, avg_non_ignore=True) == pytest.approx(float(torch_mean), rel=1e-5)


def test_all_ignored_is_zero_not_nan():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    loss = seg_cross_entropy(logits, target)
    loss.backward()
    assert loss.item() == 0.0
    assert seg_cross_entropy(logits, target, avg_non_ignore=True).item() == 0.0


def test_logits_resized_to_label_size():
    logits, target = _data()
    small = logits[:, :, ::2, ::2].contiguous()  # 3x3
    up = F.interpolate(small, size=(5, 6), mode="bilinear", align_corners=False)
    assert seg_cross_entropy(small, target) == pytest.approx(float(seg_cross_entropy(up, target)), rel=1e-6)


def test_task_loss_with_aux_weight_from_config():
    logits, target = _data()
    aux = torch.randn_like(logits)
    cfg = {"model": {"num_classes": 4, "auxiliary_head": {"type": "fcn", "loss_weight": 0.25}}}
    total, parts = SegTask(cfg).loss({"out": logits, "aux": aux}, {"label": target})
    ce, ce_aux = seg_cross_entropy(logits, target), seg_cross_entropy(aux, target)
    assert total.item() == pytest.approx(float(ce + 0.25 * ce_aux), rel=1e-6)
    assert parts["loss_ce"] == pytest.approx(float(ce), rel=1e-6)
    assert parts["loss_aux"] == pytest.approx(float(ce_aux), rel=1e-6)
    # default weight 0.4 without an auxiliary_head section; a plain tensor (smp) has no aux term
    total, _ = SegTask({"model": {"num_classes": 4}}).loss({"out": logits, "aux": aux}, {"label": target})
    assert total.item() == pytest.approx(float(ce + 0.4 * ce_aux), rel=1e-6)
    total, parts = SegTask(cfg).loss(logits, {"label": target})
    assert set(parts) == {"loss_ce"} and total.item() == pytest.approx(float(ce), rel=1e-6)


def test_loss_gradient_flows():
    logits, target = _data()
    logits.requires_grad_(True)
    total, _ = SegTask({}).loss({"out": logits}, {"label": target})
    total.backward()
    assert logits.grad is not None
    # ignored pixels get no gradient
    assert logits.grad[0, :, :2].abs().max() == 0
    assert logits.grad[0, :, 2:].abs().max() > 0
