"""Multi-task loss weighting: equal, fixed, uncertainty (Kendall et al.) and DWA (Liu et al.'s mtan).

Every scheme is an ``nn.Module`` called as ``total, logs = weighting(losses)`` with ``losses`` a mapping
``task -> scalar loss``. A task whose loss is missing or ``None`` in a step (no sample of the batch has its
label) contributes nothing to that step. Whatever a scheme learns or remembers (uncertainty's log-variances,
DWA's loss history) lives in its parameters and buffers, so its ``state_dict`` saved in a checkpoint makes a
resumed run continue exactly. ``logs`` holds ``loss_<task>`` and ``weight_<task>`` (the factor in front of the
task's loss in this step) as floats for the training log.
"""
from __future__ import annotations

import abc
import math
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from densefuse.errors import ConfigError, did_you_mean

#: ``mtl.weighting`` values
WEIGHTINGS = ("equal", "fixed", "uncertainty", "dwa")
#: task kinds of the uncertainty weighting (Kendall et al.'s two likelihoods)
UNCERTAINTY_KINDS = ("regression", "classification")

Losses = Mapping[str, Optional[Tensor]]


class LossWeighting(nn.Module, abc.ABC):
    """Base: a fixed list of tasks and the weighted sum of the losses present in a step."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        tasks = [str(t) for t in tasks]
        if not tasks:
            raise ConfigError("mtl.tasks is empty: a loss weighting needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ConfigError(f"mtl.tasks names a task twice: {tasks}")
        self.tasks = tasks

    def _present(self, losses: Losses) -> list[tuple[int, str, Tensor]]:
        unknown = [t for t in losses if t not in self.tasks]
        if unknown:
            raise KeyError(f"loss of unknown task '{unknown[0]}' (weighting tasks: {', '.join(self.tasks)})")
        out = [(i, t, losses[t]) for i, t in enumerate(self.tasks) if losses.get(t) is not None]
        if not out:
            raise ValueError("no task has a loss in this step")
        return out

    @abc.abstractmethod
    def weights(self) -> dict[str, float]:
        """The current factor of every task's loss (what the next step uses)."""

    def forward(self, losses: Losses) -> tuple[Tensor, dict[str, float]]:
        w = self.weights()
        present = self._present(losses)
        total = sum(w[t] * loss for _, t, loss in present)
        return total, _logs(present, w)


def _logs(present: list[tuple[int, str, Tensor]], weights: Mapping[str, float]) -> dict[str, float]:
    logs = {f"loss_{t}": float(loss.detach()) for _, t, loss in present}
    logs.update({f"weight_{t}": float(weights[t]) for _, t, _ in present})
    return logs


class EqualWeighting(LossWeighting):
    """``sum_t L_t`` (every weight 1, as LibMTL's EW)."""

    def weights(self) -> dict[str, float]:
        return {t: 1.0 for t in self.tasks}


class FixedWeighting(LossWeighting):
    """``sum_t w_t L_t`` with user-given weights ``w_t >= 0`` (``mtl.weights``), one for every task."""

    def __init__(self, tasks: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__(tasks)
        weights = dict(weights or {})
        for t in weights:
            if t not in self.tasks:
                raise ConfigError(f"mtl.weights names '{t}', which is not in mtl.tasks"
                                  f"{did_you_mean(str(t), self.tasks)}; tasks: {', '.join(self.tasks)}")
        missing = [t for t in self.tasks if t not in weights]
        if missing:
            raise ConfigError(f"mtl.weighting 'fixed' needs a weight for every task: mtl.weights lacks "
                              f"{', '.join(missing)}")
        bad = {t: v for t, v in weights.items()
               if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0}
        if bad:
            t, v = next(iter(bad.items()))
            raise ConfigError(f"mtl.weights.{t} must be a number >= 0, got {v!r}")
        self.register_buffer("fixed", torch.tensor([float(weights[t]) for t in self.tasks], dtype=torch.float64))

    def weights(self) -> dict[str, float]:
        return {t: float(w) for t, w in zip(self.tasks, self.fixed)}


class UncertaintyWeighting(LossWeighting):
    """Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018) with learned
    log-variances ``s_t = log sigma_t^2`` (parameters, initialised to 0; they must be in the optimizer).

    Without ``kinds`` every task uses the simplified form common to the multi-task codebases:
    ``exp(-s_t) L_t + s_t`` (twice Kendall's regression term: same minimiser ``s_t = log L_t``).
    With ``kinds`` (``task -> "regression" | "classification"``) the paper's exact factors apply:
    regression (Gaussian likelihood) ``0.5 exp(-s_t) L_t + 0.5 s_t``, classification (scaled softmax)
    ``exp(-s_t) L_t + 0.5 s_t``. The logged weight is the factor in front of ``L_t``.
    """

    def __init__(self, tasks: Sequence[str], kinds: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(tasks)
        self.log_vars = nn.Parameter(torch.zeros(len(self.tasks)))
        loss_factor, reg_factor = [], []
        for t in self.tasks:
            kind = (kinds or {}).get(t)
            if kind is None and kinds is not None:
                raise ConfigError(f"mtl.uncertainty_kinds lacks task '{t}' (regression or classification)")
            if kind is not None and kind not in UNCERTAINTY_KINDS:
                raise ConfigError(f"mtl.uncertainty_kinds.{t} must be regression or classification, got {kind!r}"
                                  f"{did_you_mean(str(kind), UNCERTAINTY_KINDS)}")
            loss_factor.append({None: 1.0, "regression": 0.5, "classification": 1.0}[kind])
            reg_factor.append(1.0 if kind is None else 0.5)
        self.register_buffer("loss_factor", torch.tensor(loss_factor))
        self.register_buffer("reg_factor", torch.tensor(reg_factor))

    def weights(self) -> dict[str, float]:
        w = self.loss_factor * torch.exp(-self.log_vars.detach())
        return {t: float(v) for t, v in zip(self.tasks, w)}

    def forward(self, losses: Losses) -> tuple[Tensor, dict[str, float]]:
        present = self._present(losses)
        total = sum(self.loss_factor[i] * torch.exp(-self.log_vars[i]) * loss + self.reg_factor[i] * self.log_vars[i]
                    for i, _, loss in present)
        logs = _logs(present, self.weights())
        logs.update({f"log_var_{t}": float(self.log_vars[i].detach()) for i, t, _ in present})
        return total, logs


class DWAWeighting(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019, mtan):
    ``w_t(k) = T * softmax_t(r_t(k-1) / temperature)`` with ``r_t(k-1) = L_t(k-1) / L_t(k-2)``, where
    ``L_t(k)`` is task t's mean loss over interval ``k`` (an epoch in mtan) and T the number of tasks.
    The first two intervals use ``w_t = 1``. Weights stay fixed within an interval.

    With ``interval`` (steps), every training-mode call counts a step and closes the interval after that
    many; without it, call :meth:`end_interval` (e.g. at each epoch end). A task with no loss in a whole
    interval keeps ratio 1 for the next one. Everything is kept in buffers (exact resume).
    """

    def __init__(self, tasks: Sequence[str], temperature: float = 2.0, interval: Optional[int] = None) -> None:
        super().__init__(tasks)
        if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature > 0):
            raise ConfigError(f"mtl.dwa_temperature must be a number > 0, got {temperature!r}")
        if interval is not None and (isinstance(interval, bool) or not isinstance(interval, int) or interval < 1):
            raise ConfigError(f"mtl.dwa_interval must be an int >= 1 or null, got {interval!r}")
        self.temperature, self.interval = float(temperature), interval
        n = len(self.tasks)
        self.register_buffer("current", torch.ones(n, dtype=torch.float64))
        self.register_buffer("history", torch.full((2, n), float("nan"), dtype=torch.float64))  # L(k-2), L(k-1)
        self.register_buffer("sums", torch.zeros(n, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(n, dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # steps in the open interval
        self.register_buffer("closed", torch.zeros((), dtype=torch.long))  # intervals closed so far

    def weights(self) -> dict[str, float]:
        return {t: float(w) for t, w in zip(self.tasks, self.current)}

    def forward(self, losses: Losses) -> tuple[Tensor, dict[str, float]]:
        total, logs = super().forward(losses)
        if self.training:
            for i, _, loss in self._present(losses):
                self.sums[i] += float(loss.detach())
                self.counts[i] += 1
            self.steps += 1
            if self.interval is not None and int(self.steps) >= self.interval:
                self.end_interval()
        return total, logs

    def end_interval(self) -> dict[str, float]:
        """Close the current interval: record its mean losses and set the next interval's weights."""
        seen = self.counts > 0
        means = torch.where(seen, self.sums / self.counts.clamp_min(1), self.history[1])
        self.history = torch.stack([self.history[1], means])
        self.closed += 1
        self.sums.zero_()
        self.counts.zero_()
        self.steps.zero_()
        if int(self.closed) >= 2:
            ratio = self.history[1] / self.history[0]
            ratio = torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))
            self.current = len(self.tasks) * torch.softmax(ratio / self.temperature, dim=0)
        return self.weights()


def build_weighting(kind: str, tasks: Sequence[str], weights: Optional[Mapping[str, float]] = None,
                    kinds: Optional[Mapping[str, str]] = None, temperature: float = 2.0,
                    interval: Optional[int] = None) -> LossWeighting:
    """The weighting ``mtl.weighting`` names, over ``tasks``; an unknown name lists the choices."""
    if kind == "equal":
        return EqualWeighting(tasks)
    if kind == "fixed":
        return FixedWeighting(tasks, weights or {})
    if kind == "uncertainty":
        return UncertaintyWeighting(tasks, kinds)
    if kind == "dwa":
        return DWAWeighting(tasks, temperature, interval)
    raise ConfigError(f"mtl.weighting must be one of {', '.join(WEIGHTINGS)}, got {kind!r}"
                      f"{did_you_mean(str(kind), WEIGHTINGS)}")
