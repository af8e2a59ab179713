"""One optimizer step: mixed precision, gradient accumulation, clipping (detectron2's train step shape).

``amp``: ``off`` (float32), ``bf16`` (autocast to bfloat16; CUDA or CPU, no loss scaling needed) or
``fp16`` (autocast to float16 with a :class:`torch.amp.GradScaler`, CUDA only). The scaler's state is
part of the checkpoint. With ``accum_steps`` micro-batches the loss of each is divided by their number
and DDP synchronizes gradients only on the last one.

Finite-state guard (``train.nonfinite``): the total gradient norm is computed once per step (one fused
``torch._foreach_norm`` over the gradients, reused by ``grad_clip``) and a non-finite loss or norm
never reaches the optimizer. ``stop`` raises :class:`NonFiniteError` before the weights change (the
last checkpoint stays the last finite state); ``skip`` drops the step: the optimizer, its moments and
the grad scaler are untouched and the BN running statistics of the dropped forward are put back, while
the scheduler advances (the learning rate stays a function of the iteration, as planned and as a resume
computes it).

Every rank takes the same decision: a micro-batch whose loss is non-finite still runs its backward,
with one parameter's gradient made nan, so DDP's own gradient all-reduce carries the verdict and the
norm, computed from the all-reduced gradients, is non-finite on every rank at once. Only then (never
in a finite step) one small all-reduce tells every rank whether a loss or only the gradient went
non-finite, so all of them raise the same line or drop the same step. Under fp16 the gradients are
unscaled first; a non-finite norm with every loss finite is the grad scaler's overflow (it skips the
step and lowers its scale, as it does to find its scale), not a non-finite step.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.augment import SAMPLE_SEED
from ..errors import ConfigError, DensefuseError
from ..layers import name_sample_dropouts, sample_seeds
from ..tasks import Task

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}
NONFINITE = ("stop", "skip")


class NonFiniteError(DensefuseError):
    """The loss, the gradients or the weights became inf/nan; nothing was written after the last finite state."""


def grad_norm(params: Sequence[Tensor]) -> Tensor:
    """The total L2 norm of the gradients of ``params`` (one fused kernel per device and dtype)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)


def nonfinite_tensors(tensors: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` holding an inf or nan (one fused pass)."""
    names = [k for k, t in tensors.items() if isinstance(t, Tensor) and t.is_floating_point() and t.numel()]
    if not names:
        return []
    norms = torch._foreach_norm([tensors[k].detach().float() for k in names], 2.0)
    bad = ~torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms]))
    return [names[i] for i in bad.nonzero().flatten().tolist()]


def check_amp(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``train.amp`` on ``device``; a :class:`ConfigError` for unusable values."""
    if amp not in AMP_DTYPES:
        raise ConfigError(f"train.amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.amp: fp16 needs a CUDA device (device is {device.type}); use bf16 on CPU")
    return AMP_DTYPES[amp]


def check_compile(value: Any) -> Optional[str]:
    """The ``torch.compile`` backend of ``train.compile``: ``None`` for ``false``, ``inductor`` (torch's
    default) for ``true``, or a backend named by ``torch._dynamo.list_backends`` (debug backends such
    as ``aot_eager`` included: they compile in seconds, not minutes, on a CPU)."""
    if value is False:
        return None
    if value is True:
        return "inductor"
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if not isinstance(value, str) or value not in backends:
        shown = ", ".join(["false", "true", *torch._dynamo.list_backends()])
        raise ConfigError(f"train.compile must be true, false or a torch.compile backend ({shown}, or a debug "
                          f"backend such as aot_eager), got {value!r}")
    return value


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype``, or nothing when it is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class TrainStep:
    """Calls ``task.forward`` and ``task.loss`` on micro-batches and steps optimizer and scheduler."""

    def __init__(self, model: nn.Module, task: Task, optimizer: torch.optim.Optimizer, scheduler: Any,
                 device: torch.device, amp: str = "off", grad_clip: Optional[float] = None,
                 channels_last: bool = False, nonfinite: str = "stop") -> None:
        self.model, self.task, self.optimizer, self.scheduler = model, task, optimizer, scheduler
        self.device = device
        self.dtype = check_amp(amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.grad_clip = grad_clip
        self.channels_last = channels_last
        if nonfinite not in NONFINITE:
            raise ConfigError(f"train.nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        name_sample_dropouts(model)
        #: why the last call dropped its step (``None``: it stepped)
        self.skipped: Optional[str] = None

    def __call__(self, batches: Sequence[Mapping[str, Any]], iteration: int) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``batches``; returns this rank's mean loss and loss parts. With
        ``nonfinite: skip`` a non-finite step is dropped and :attr:`skipped` says why."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped = None
        n = len(batches)
        loss_sum, parts_sum, bad_loss = 0.0, {}, 0.0
        buffers = self._buffers() if self.nonfinite == "skip" else None
        for i, batch in enumerate(batches):
            if self.channels_last:
                batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
            sync = i == n - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast(self.device, self.dtype), sample_seeds(batch.get(SAMPLE_SEED)):
                    outputs = self.task.forward(self.model, batch)
                    loss, parts = self.task.loss(outputs, batch)
                value = float(loss.detach())
                if math.isfinite(value):
                    loss_sum += value
                else:  # backward anyway (the other ranks are in theirs), carrying the verdict in a gradient
                    bad_loss += value
                    loss = loss + self._poison()
                self.scaler.scale(loss / n).backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        norm = float(grad_norm(params))  # of the all-reduced gradients: the same on every rank
        if not math.isfinite(norm):
            why = self._verdict(loss_sum, bad_loss, norm, n, iteration)
            if why is not None:
                return self._drop(why, buffers, loss_sum / n if bad_loss == 0 else bad_loss)
        elif self.grad_clip:
            nn.utils.clip_grads_with_norm_(params, self.grad_clip, torch.tensor(norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_sum / n, {k: v / n for k, v in parts_sum.items()}

    def _poison(self) -> Tensor:
        """A nan term whose gradient makes one parameter's gradient nan (and adds nothing else)."""
        p = next(p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad)
        return p.sum() * float("nan")

    def _verdict(self, loss_sum: float, bad_loss: float, norm: float, n: int, iteration: int) -> Optional[str]:
        """What a non-finite gradient norm means, agreed by every rank (they all got here: the norm is of
        the all-reduced gradients): raises under ``stop``, returns why the step is dropped under ``skip``,
        or ``None`` for an fp16 overflow with every loss finite (the grad scaler handles it)."""
        from . import distributed as dist

        total = dist.all_reduce_sum(torch.tensor([loss_sum, bad_loss, float(bad_loss != 0)], dtype=torch.float64))
        world = dist.world_size()
        finite_loss, bad_value, bad_ranks = float(total[0]) / (n * world), float(total[1]), int(total[2])
        if bad_ranks:
            where = f" on {bad_ranks} of {world} processes" if world > 1 else ""
            if self.nonfinite == "stop":
                raise NonFiniteError(
                    f"loss became {bad_value} at iteration {iteration + 1}{where}; stopped before the weights "
                    "changed, so the last checkpoint is the last finite state; lower optim.lr, set train.grad_clip, "
                    "or train.nonfinite=skip to drop such steps")
            return f"loss {bad_value}{where}"
        if self.scaler.is_enabled():
            return None
        if self.nonfinite == "stop":
            raise NonFiniteError(
                f"gradient norm became {norm} at iteration {iteration + 1} (loss {finite_loss:.6g} was "
                "finite); stopped before the weights changed, so the last checkpoint is the last finite "
                "state; lower optim.lr, set train.grad_clip, or train.nonfinite=skip to drop such steps")
        return f"gradient norm {norm}"

    def _buffers(self) -> list[Tensor]:
        """Copies of the floating-point buffers (BN running statistics) a dropped step must put back."""
        return [b.detach().clone() for b in self.model.buffers() if b.is_floating_point()]

    def _drop(self, why: str, buffers: Optional[list[Tensor]], loss: float) -> tuple[float, dict[str, float]]:
        """Drop this step (``nonfinite: skip``): no optimizer or scaler update, BN statistics restored,
        the scheduler advanced."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler.is_enabled():  # forget this step's unscale, keeping the scale and its growth count
            self.scaler.update(self.scaler.get_scale())
        if buffers:  # (a model may have none)
            torch._foreach_copy_([b for b in self.model.buffers() if b.is_floating_point()], buffers)
        self.scheduler.step()
        self.skipped = why
        return loss, {}

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
