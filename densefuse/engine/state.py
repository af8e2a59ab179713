"""Checkpoints: atomic, ``torch.load(weights_only=True)``-loadable, complete enough to resume exactly.

``latest.pth`` holds the model, optimizer, scheduler, grad scaler, iteration, the loop's running sums and
metric history, and the RNG states of every rank (the sampler position follows from the iteration:
the infinite sampler is seeded, so ``iteration * batch_size * accum_steps`` samples are skipped).
``iter_<N>.pth`` are hard links to earlier ``latest.pth`` files (``train.keep_last`` of them are kept);
``best.pth`` and ``final.pth`` hold the weights, config and metrics only.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError, DensefuseError
from .runtime import file_mode

PathLike = Union[str, Path]

#: config keys that may differ between a run and its ``--resume`` (they change no result)
SAFE_RESUME_KEYS = ("train.log_interval", "train.tensorboard", "train.dist_timeout", "data.num_workers",
                    "eval.batch_size", "work_dir", "name")


def atomic_write(path: PathLike, write: Callable[[Any], None], binary: bool = True) -> Path:
    """Write ``path`` through ``write(file)`` into a temp file in the same directory, then rename it
    over ``path``: readers (and a resume after a kill) see the old or the new file, never half of one.
    The file gets the mode the user's umask gives new files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_checkpoint(path: PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; user-facing errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise DensefuseError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise DensefuseError(f"cannot read checkpoint {path} (corrupt or truncated?): {type(e).__name__}: {first}") from None
    if not isinstance(state, dict):
        raise DensefuseError(f"{path} is not a densefuse checkpoint")
    return state


def load_model_state(model: nn.Module, state: dict[str, Any], source: PathLike) -> None:
    """Load ``state['model']`` (or a bare state_dict) strictly, with a readable mismatch message."""
    sd = state.get("model", state)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise DensefuseError(f"checkpoint {source} does not match the model: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise DensefuseError(f"checkpoint {source} does not match the model: {'; '.join(parts)}")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, Mapping):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, Mapping) and v else {f"{prefix}{k}": v})
    return out


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
                       safe: Iterable[str] = SAFE_RESUME_KEYS) -> list[str]:
    """Dotted keys whose values differ between two configs, leaving out the ``safe`` ones."""
    a, b = _flatten(saved), _flatten(current)
    safe = tuple(safe)
    return sorted(k for k in set(a) | set(b)
                  if a.get(k) != b.get(k) and not any(k == s or k.startswith(s + ".") for s in safe))


def check_resume_config(saved: Mapping[str, Any], current: Mapping[str, Any], source: PathLike) -> None:
    """Refuse to resume with a config that changes results; name the differing keys."""
    diff = config_differences(saved, current)
    if diff:
        a, b = _flatten(saved), _flatten(current)
        shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4]) + ("; ..." if len(diff) > 4 else "")
        raise ConfigError(f"--resume with a config that differs from the run in {source} ({shown}); only "
                          f"{', '.join(SAFE_RESUME_KEYS)} may change")


class Checkpointer:
    """Writes ``latest.pth`` / ``iter_<N>.pth`` / ``best.pth`` / ``final.pth`` into a work dir (rank 0)."""

    def __init__(self, work_dir: PathLike, keep_last: int = 1) -> None:
        self.dir = Path(work_dir)
        self.keep_last = int(keep_last)

    @property
    def latest(self) -> Path:
        return self.dir / "latest.pth"

    def save(self, state: dict[str, Any], iteration: int) -> Path:
        """``latest.pth``, plus a hard link ``iter_<N>.pth`` when old checkpoints are kept."""
        save_checkpoint(self.latest, state)
        if self.keep_last > 0:
            link = self.dir / f"iter_{iteration:07d}.pth"
            tmp = self.dir / f".{link.name}.link"
            tmp.unlink(missing_ok=True)
            os.link(self.latest, tmp)
            os.replace(tmp, link)
            for old in sorted(self.dir.glob("iter_*.pth"))[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return self.latest

    def save_weights(self, name: str, state: Mapping[str, Any]) -> Path:
        """``best.pth`` / ``final.pth``: model, iteration, config and metrics."""
        return save_checkpoint(self.dir / name, {k: state[k] for k in ("model", "iter", "config", "metrics") if k in state})

    def load_latest(self, map_location: Any = "cpu", config: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
        """The resume state; with ``config``, refuse it when the run's config differs."""
        state = load_checkpoint(self.latest, map_location)
        missing = [k for k in ("model", "optimizer", "scheduler", "iter", "loop", "rng") if k not in state]
        if missing:
            raise DensefuseError(f"{self.latest} cannot be resumed: it lacks {', '.join(missing)}")
        if config is not None:
            check_resume_config(state.get("config", {}), config, self.latest)
        return state
