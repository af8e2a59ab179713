"""One optimizer step: mixed precision, gradient accumulation, clipping (detectron2's train step shape).

``amp``: ``off`` (float32), ``bf16`` (autocast to bfloat16; CUDA or CPU, no loss scaling needed) or
``fp16`` (autocast to float16 with a :class:`torch.amp.GradScaler`, CUDA only). The scaler's state is
part of the checkpoint. With ``accum_steps`` micro-batches the loss of each is divided by their number
and DDP synchronizes gradients only on the last one.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import ConfigError, DensefuseError
from ..tasks import Task

AMP_DTYPES = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}


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
                 channels_last: bool = False) -> None:
        self.model, self.task, self.optimizer, self.scheduler = model, task, optimizer, scheduler
        self.device = device
        self.dtype = check_amp(amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.grad_clip = grad_clip
        self.channels_last = channels_last

    def __call__(self, batches: Sequence[Mapping[str, Any]], iteration: int) -> tuple[float, dict[str, float]]:
        """One optimizer step over ``batches``; returns this rank's mean loss and loss parts."""
        self.optimizer.zero_grad(set_to_none=True)
        n = len(batches)
        loss_sum, parts_sum = 0.0, {}
        for i, batch in enumerate(batches):
            if self.channels_last:
                batch = {**batch, "image": batch["image"].contiguous(memory_format=torch.channels_last)}
            sync = i == n - 1 or not hasattr(self.model, "no_sync")
            with contextlib.nullcontext() if sync else self.model.no_sync():
                with autocast(self.device, self.dtype):
                    outputs = self.task.forward(self.model, batch)
                    loss, parts = self.task.loss(outputs, batch)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise DensefuseError(f"loss became {value} at iteration {iteration + 1}; lower optim.lr")
                self.scaler.scale(loss / n).backward()
            loss_sum += value
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + float(v)
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss_sum / n, {k: v / n for k, v in parts_sum.items()}

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
