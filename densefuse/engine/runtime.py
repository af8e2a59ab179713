"""Run-time plumbing: seeds and RNG state, the device, batches on the device, the work dir, and the
safety of every output place (never overwrite, probe before any work).

The work dir belongs to one run at a time (an ``flock`` on ``.densefuse.lock``, released by the OS even
when the process is killed) and densefuse only writes into a directory it created: an existing
directory must be empty or hold a densefuse run (its ``config.yaml``).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Union

import numpy as np
import torch

from ..config import dump
from ..errors import ConfigError, DensefuseError

LOCK_NAME = ".densefuse.lock"
#: files and folders densefuse writes into a work dir
RUN_FILES = ("config.yaml", "log.txt", "metrics.csv", "per_class.csv", "calibration.csv", "predictions.png",
             "latest.pth", "best.pth", "final.pth", "tensorboard", LOCK_NAME)
_ITER_CKPT = re.compile(r"^iter_\d+\.pth$")
#: temp files of :func:`densefuse.engine.state.atomic_write`: ``.<name>.<random>``
_TEMP = re.compile(r"^\.(?:[\w.-]+)\.(?:pth|csv|yaml)\.\w+$")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Every RNG state of this process, as ``torch.load(weights_only=True)``-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return {
        "python": [version, list(py_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class OutOfMemoryError(DensefuseError):
    """An allocation failed (device or host memory); the message names the settings that size it."""


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a failed allocation: ``torch.OutOfMemoryError`` (CUDA, MPS) or the CPU
    allocator's ``RuntimeError`` (``DefaultCPUAllocator: can't allocate ...`` / ``not enough memory``)."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(
        s in text for s in ("DefaultCPUAllocator: can't allocate", "not enough memory", "out of memory"))


@contextlib.contextmanager
def out_of_memory_hint(what: str, settings: str) -> Iterator[None]:
    """Turn a failed allocation inside the block into one :class:`OutOfMemoryError` line: ``what`` ran
    out of memory; lower ``settings``."""
    try:
        yield
    except (RuntimeError, MemoryError) as e:
        if not is_out_of_memory(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.split(". Tried to allocate")[0].split(" (Tried to allocate")[0]
        raise OutOfMemoryError(f"out of memory {what} ({type(e).__name__}: {first[:160]}); lower {settings}") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a torch device name; anything else, or CUDA asked for
    where there is none, is a :class:`ConfigError` (one line, exit 2). The one resolver of the project: the
    check of a command's config and the commands that build on the device give the same answer."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device '{name}' is not a device name; use auto, cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' requested but CUDA is not available")
    return device


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The tensors of ``batch`` on ``device`` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def timestamp() -> str:
    """``YYYYmmdd_HHMMSS``: the time part of default output names."""
    return _dt.datetime.now().strftime("%Y%m%d_%H%M%S")


def default_work_dir(cfg: Mapping[str, Any], pattern: str = "{name}/{time}") -> Path:
    """Where a command writes when not told: ``pattern`` (``{name}``: the config's name, ``{time}``: a
    :func:`timestamp`) under the config's ``work_dir`` (default ``work_dirs``). The one place that path is
    built: a run ``{name}/{time}``, ``calibrate``'s ``{name}/calibration-{time}.csv``, ``inspect``'s
    ``{name}/inspect-{time}``, ``compare``'s ``{name}_compare`` or ``compare``."""
    return Path(cfg.get("work_dir") or "work_dirs") / pattern.format(name=cfg["name"], time=timestamp())


def refuse_overwrite(path: Union[str, Path]) -> None:
    """A file the user has is never overwritten: an existing ``path`` is one error line."""
    if Path(path).exists():
        raise DensefuseError(f"{path} already exists; not overwriting it")


def check_writable(directory: Path, label: Optional[str] = None) -> None:
    """``directory`` can be created and written: probe it (or its nearest existing parent) with a temporary
    file, so a read-only or impossible output place is one error line, naming ``label`` (default ``work dir
    <directory>``), before any work."""
    import tempfile

    target = Path(directory)
    existing = target
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if label is None and existing == target and not target.is_dir():
        raise DensefuseError(f"work dir {target} is a file")
    label = label or f"work dir {target}"
    if not existing.is_dir():
        raise DensefuseError(f"cannot create {label}: {existing} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".densefuse-probe-", dir=existing)
    except OSError as e:
        where = "" if existing == target else f" ({existing})"
        raise DensefuseError(f"{label} is not writable{where}: {e.strerror or e}") from None
    os.close(fd)
    os.unlink(probe)


def check_out_file(path: Union[str, Path]) -> None:
    """An ``--out`` file: not there yet (never overwritten), and its folder can be created and written."""
    refuse_overwrite(path)
    check_writable(Path(path).parent, f"--out {path}")


def file_mode() -> int:
    """The mode a new file gets under the user's umask (``open()`` semantics)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or bool(_ITER_CKPT.match(name)) or bool(_TEMP.match(name))


class WorkDir:
    """A run directory: ownership checks, the one-run-at-a-time lock, stale temp files."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fd: Optional[int] = None

    def open(self, cfg: Mapping[str, Any], resume: bool) -> None:
        """Check the directory, take the lock, clean temp files of killed saves, write ``config.yaml``
        for a new run. A run that failed before its first checkpoint is replaced by the new one."""
        wd = self.path
        if wd.exists() and not wd.is_dir():
            raise DensefuseError(f"work dir {wd} is a file")
        if wd.is_dir() and os.access(wd, os.W_OK) and (wd / LOCK_NAME).exists():
            self._lock()  # a run using the dir is told first, whatever else the dir holds
        entries = sorted(p.name for p in wd.iterdir()) if wd.is_dir() else []
        checkpoints = [e for e in entries if e == "latest.pth" or _ITER_CKPT.match(e)]
        if resume and not checkpoints:
            self.close()
            raise DensefuseError(f"nothing to resume in {wd} (no latest.pth)")
        if resume and "config.yaml" not in entries and all(_is_run_file(e) for e in entries):
            pass  # the trainer restores config.yaml from the checkpoint it resumes
        elif entries and "config.yaml" not in entries:
            self.close()
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise DensefuseError(f"work dir {wd} holds files densefuse did not create ({shown}); "
                                 "choose an empty or new --work-dir")
        if not resume and "config.yaml" in entries and any(e in entries for e in ("latest.pth", "final.pth")):
            self.close()
            raise DensefuseError(f"work dir {wd} already holds a run; pass --resume or choose another --work-dir")
        foreign = [e for e in entries if not _is_run_file(e)]
        if foreign and not resume:  # a run's own dir may hold the user's extra files (eval CSVs): left alone
            self.close()
            raise DensefuseError(f"work dir {wd} holds files densefuse did not create ({', '.join(foreign[:3])}); "
                                 "choose another --work-dir")
        try:
            wd.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DensefuseError(f"cannot create work dir {wd}: {e.strerror}") from None
        if not os.access(wd, os.W_OK):
            raise DensefuseError(f"work dir {wd} is not writable")
        if self._lock_fd is None:
            self._lock()
        entries = sorted(p.name for p in wd.iterdir())
        if not resume and any(e in entries for e in ("latest.pth", "final.pth")):
            self.close()
            raise DensefuseError(f"work dir {wd} already holds a run; pass --resume or choose another --work-dir")
        for name in entries:
            if _TEMP.match(name):
                (wd / name).unlink(missing_ok=True)
        if not resume:  # nothing of a failed start is kept: a new run
            for name in entries:
                if name == LOCK_NAME or _TEMP.match(name):
                    continue
                p = wd / name
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
            dump(cfg, wd / "config.yaml")

    def _lock(self) -> None:
        import fcntl

        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DensefuseError(f"another densefuse run is using {self.path}; wait for it or choose another --work-dir") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
