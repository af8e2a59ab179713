"""The one place that knows whether torch.distributed is running (detectron2's ``utils/comm.py`` shape).

Everything else asks :func:`rank`, :func:`world_size`, :func:`is_main` and uses the collectives here,
which are no-ops in a single process. :func:`init_from_env` starts the process group from the
variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``):
NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys
import tempfile
from typing import Any, Callable, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import DensefuseError

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 writes logs, CSVs, pictures and checkpoints."""
    return rank() == 0


def env_world_size() -> int:
    """The world size torchrun announces in the environment (1 when not launched by it)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DensefuseError(f"WORLD_SIZE must be an integer, got '{os.environ['WORLD_SIZE']}'") from None


def init_from_env(device_type: str, timeout_s: float = 1800.0) -> bool:
    """Start the default process group from torchrun's environment; True when this call started it.

    Does nothing in a single process or when a group is already running. A rendezvous that cannot be
    reached within ``timeout_s`` is a :class:`DensefuseError` naming the address, not a hang.
    """
    if env_world_size() <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DensefuseError(f"WORLD_SIZE is set but {', '.join(missing)} is not; launch with torchrun")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        with _quiet_native_stderr():
            dist.init_process_group(backend, timeout=_dt.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DensefuseError(f"cannot join the process group at {where} within {timeout_s:g}s "
                             f"(train.dist_timeout): {first}") from None
    return True


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Hold back what native code writes to stderr (c10d prints every failed connection attempt with a
    C++ stack): replayed when the block succeeds, dropped when it raises (its exception says it all)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                buf.seek(0)
                sys.stderr.write(buf.read().decode(errors="replace"))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks (a new tensor on ``t``'s device)."""
    if not is_distributed():
        return t.clone()
    out = t.detach().to(_collective_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def all_reduce_mean(values: list[float]) -> list[float]:
    """Mean over ranks of a few floats (one collective, float64)."""
    if not is_distributed():
        return list(values)
    t = all_reduce_sum(torch.tensor(values, dtype=torch.float64))
    return (t / world_size()).tolist()


def all_gather_object(obj: Any) -> list[Any]:
    """One picklable object per rank, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> Optional[T]:
    """Run ``fn`` on rank 0 only; a :class:`DensefuseError` it raises is raised on every rank (the
    others would otherwise wait forever in the next collective). Returns rank 0's result everywhere."""
    result, message = None, None
    if is_main():
        try:
            result = fn()
        except DensefuseError as e:
            if not is_distributed():
                raise
            message = (type(e), str(e))
    if not is_distributed():
        return result
    result, message = broadcast_object((result, message))
    if message is not None:
        raise message[0](message[1])
    return result


# -------------------------------------------------------------------------------------------------
# SyncBN and DDP


class _SyncBatchNormCPU(_BatchNorm):
    """Batch norm whose train-mode statistics span every rank, for gloo (CPU) process groups, where
    :class:`torch.nn.SyncBatchNorm` does not run. Two differentiable all-reduces (sum and count, then
    squared deviations) per layer; eval mode and running stats behave as in ``BatchNorm``."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        return self.synced(x, all_reduce)

    def synced(self, x: Tensor, all_reduce: Callable[[Tensor], Tensor]) -> Tensor:
        """Train-mode batch norm with statistics summed by ``all_reduce`` (differentiable; the identity
        gives the same statistics in one process, by this arithmetic rather than ``BatchNorm``'s kernel)."""
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dims), count]))
        n = total[-1]
        mean = total[:-1] / n
        centred = x - mean.view(shape)
        var = all_reduce(centred.square().sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def use_sync_bn(setting: Optional[bool]) -> bool:
    """``model.sync_bn``: ``null`` synchronizes BatchNorm whenever more than one process trains (the
    paper's recipes); ``true``/``false`` force it, though one process has nothing to synchronize with."""
    return is_distributed() and (setting is None or bool(setting))


def convert_sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """Replace every BatchNorm by a synchronized one: torch's SyncBatchNorm on GPUs, the gloo-capable
    :class:`_SyncBatchNormCPU` on CPU. Parameters and buffers are kept."""
    if device_type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, (_SyncBatchNormCPU, nn.SyncBatchNorm)):
        out = _SyncBatchNormCPU(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        out.load_state_dict(module.state_dict())
        out.train(module.training)
        if module.affine:
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        out = out.to(next(iter(module.state_dict().values())).device) if module.state_dict() else out
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the process group (the model itself in a single process)."""
    if not is_distributed():
        return model
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP and/or torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
