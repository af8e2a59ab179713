"""Multi-task loss weightings on hand-computed cases; their state_dict makes a resumed run continue exactly."""
import math

import pytest
import torch
from densefuse_tasks.mtl import DWAWeighting, EqualWeighting, FixedWeighting, UncertaintyWeighting, build_weighting

from densefuse.errors import ConfigError

T = ["seg", "depth"]


def L(**kw):
    return {k: torch.tensor(float(v), requires_grad=True) for k, v in kw.items()}


def test_equal_and_fixed():
    total, logs = EqualWeighting(T)(L(seg=2.0, depth=3.0))
    assert total.item() == 5.0 and logs == {"loss_seg": 2.0, "loss_depth": 3.0, "weight_seg": 1.0, "weight_depth": 1.0}
    w = FixedWeighting(T, {"seg": 0.5, "depth": 2.0})
    total, logs = w(L(seg=2.0, depth=3.0))
    assert total.item() == pytest.approx(0.5 * 2 + 2 * 3) and logs["weight_depth"] == 2.0
    # a task without a loss in this step (no sample had its label) contributes nothing
    total, logs = w({"seg": torch.tensor(2.0), "depth": None})
    assert total.item() == 1.0 and "loss_depth" not in logs


def test_fixed_weights_are_checked():
    with pytest.raises(ConfigError, match="mtl.weights lacks depth"):
        FixedWeighting(T, {"seg": 1.0})
    with pytest.raises(ConfigError, match=r"'sge'.*did you mean 'seg'"):
        FixedWeighting(T, {"sge": 1.0, "depth": 1.0})
    with pytest.raises(ConfigError, match="mtl.weights.seg must be a number >= 0"):
        FixedWeighting(T, {"seg": -1.0, "depth": 1.0})
    with pytest.raises(ConfigError, match="did you mean 'dwa'"):
        build_weighting("dwaa", T)


def test_uncertainty_simplified_form_and_gradients():
    w = UncertaintyWeighting(T)
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([0.5, -1.0]))
    losses = L(seg=2.0, depth=3.0)
    total, logs = w(losses)
    want = math.exp(-0.5) * 2 + 0.5 + math.exp(1.0) * 3 - 1.0
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert logs["weight_seg"] == pytest.approx(math.exp(-0.5)) and logs["log_var_depth"] == pytest.approx(-1.0)
    total.backward()
    # d/ds [exp(-s) L + s] = 1 - exp(-s) L ; d/dL = exp(-s)
    assert w.log_vars.grad.tolist() == pytest.approx([1 - math.exp(-0.5) * 2, 1 - math.exp(1.0) * 3], rel=1e-6)
    assert float(losses["depth"].grad) == pytest.approx(math.exp(1.0), rel=1e-6)


def test_uncertainty_kendall_factors():
    w = UncertaintyWeighting(T, kinds={"seg": "classification", "depth": "regression"})
    with torch.no_grad():
        w.log_vars.copy_(torch.tensor([math.log(2.0), math.log(4.0)]))  # sigma^2 = 2, 4
    total, logs = w(L(seg=2.0, depth=3.0))
    # classification: L/sigma^2 + log sigma ; regression: L/(2 sigma^2) + log sigma
    want = 2 / 2 + 0.5 * math.log(2) + 3 / 8 + 0.5 * math.log(4)
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert logs["weight_seg"] == pytest.approx(0.5) and logs["weight_depth"] == pytest.approx(1 / 8)
    with pytest.raises(ConfigError, match="regression or classification"):
        UncertaintyWeighting(T, kinds={"seg": "classif", "depth": "regression"})


def test_dwa_hand_computed():
    w = DWAWeighting(T, temperature=2.0)
    for epoch_losses in ([(1.0, 2.0), (1.0, 2.0)], [(0.4, 2.0), (0.6, 2.0)]):  # means (1, 2) then (0.5, 2)
        for s, d in epoch_losses:
            total, logs = w(L(seg=s, depth=d))
            assert logs["weight_seg"] == 1.0 and total.item() == pytest.approx(s + d)  # first two intervals: 1
        w.end_interval()
    r = [0.5 / 1.0, 2.0 / 2.0]
    e = [math.exp(x / 2.0) for x in r]
    want = [2 * v / sum(e) for v in e]
    assert [w.weights()[t] for t in T] == pytest.approx(want, rel=1e-6)
    total, _ = w(L(seg=1.0, depth=1.0))
    assert total.item() == pytest.approx(sum(want), rel=1e-6)
    # the next interval's ratio uses L(k-1) / L(k-2) = mean(1.0) / 0.5 and 1.0 / 2.0
    w.end_interval()
    e = [math.exp(2.0 / 2.0), math.exp(0.5 / 2.0)]
    assert [w.weights()[t] for t in T] == pytest.approx([2 * v / sum(e) for v in e], rel=1e-6)


def test_dwa_interval_counts_training_steps_only():
    w = DWAWeighting(T, interval=2)
    w.eval()
    for _ in range(5):
        w(L(seg=1.0, depth=1.0))
    assert int(w.closed) == 0
    w.train()
    for s in (1.0, 1.0, 0.5, 0.5):
        w(L(seg=s, depth=1.0))
    assert int(w.closed) == 2
    e = [math.exp(0.5 / 2), math.exp(1.0 / 2)]
    assert [w.weights()[t] for t in T] == pytest.approx([2 * v / sum(e) for v in e])


@pytest.mark.parametrize("kind", ["uncertainty", "dwa"])
def test_state_dict_resumes_exactly(kind):
    def make():
        torch.manual_seed(0)
        w = build_weighting(kind, T, interval=3)
        opt = torch.optim.SGD(w.parameters(), lr=0.1) if kind == "uncertainty" else None
        return w, opt

    def step(w, opt, i):
        losses = {"seg": torch.tensor(1.0 + 0.1 * i), "depth": torch.tensor(2.0 / (i + 1))}
        total, logs = w(losses)
        if opt is not None:
            opt.zero_grad()
            total.backward()
            opt.step()
        return total.item(), logs

    ref, ref_opt = make()
    straight = [step(ref, ref_opt, i) for i in range(10)]
    first, first_opt = make()
    for i in range(4):
        step(first, first_opt, i)
    state = {"w": first.state_dict(), "opt": first_opt.state_dict() if first_opt else None}
    resumed, resumed_opt = make()
    resumed.load_state_dict(state["w"])
    if resumed_opt is not None:
        resumed_opt.load_state_dict(state["opt"])
    again = [step(resumed, resumed_opt, i) for i in range(4, 10)]
    assert again == straight[4:]
    assert any(v != 1.0 for k, v in straight[-1][1].items() if k.startswith("weight_"))
