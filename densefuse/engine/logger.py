"""What a run reports, written by rank 0 only: ``log.txt``, ``metrics.csv`` (atomic, one row per
evaluation), per-class tables, a progress bar on a terminal or plain periodic lines otherwise, and
optionally TensorBoard scalars."""
from __future__ import annotations

import datetime as _dt
import importlib.util
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import pandas as pd

from ..errors import ConfigError
from .state import atomic_write


def check_tensorboard(wanted: bool) -> None:
    """``train.tensorboard: true`` needs the ``tensorboard`` package: say so before any work."""
    if wanted and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.tensorboard is true but the tensorboard package is not installed "
                          "(pip install tensorboard, or set train.tensorboard=false)")


def _eta(seconds: float) -> str:
    return str(_dt.timedelta(seconds=int(max(seconds, 0))))


class RunLogger:
    """Rank 0's reporter. On other ranks (``enabled=False``) every method does nothing."""

    def __init__(self, work_dir: Path, enabled: bool, progress: bool, echo: Callable[[str], None],
                 tensorboard: bool = False) -> None:
        self.dir = Path(work_dir)
        self.enabled = enabled
        self.progress = progress and enabled
        self._echo = echo
        self._bar: Any = None
        self._tb: Any = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        self._t0 = time.time()
        self._start = 0
        self._total = 0

    def info(self, msg: str, echo: bool = True) -> None:
        """A line in ``log.txt``; also shown (above the bar, if any) when ``echo``."""
        if not self.enabled:
            return
        with open(self.dir / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{_dt.datetime.now():%Y-%m-%d %H:%M:%S} {msg}\n")
        if echo:
            if self._bar is not None:
                self._bar.write(msg)
            else:
                self._echo(msg)

    def start(self, start: int, total: int) -> None:
        self._t0, self._start, self._total = time.time(), start, total
        if self.progress and start < total:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def iteration(self, done: int, loss: float, lr: float, images_per_iter: int, report: bool) -> None:
        """Called every iteration; ``report`` (every ``log_interval``) writes the line with the global loss."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.3f}")
        if report:
            elapsed = max(time.time() - self._t0, 1e-9)
            n = done - self._start
            speed = n * images_per_iter / elapsed
            eta = _eta(elapsed / max(n, 1) * (self._total - done))
            self.info(f"iter {done}/{self._total} loss {loss:.6f} lr {lr:.3e} {speed:.1f} img/s eta {eta}",
                      echo=self._bar is None)
            if self._tb is not None:
                self._tb.add_scalar("train/loss", loss, done)
                self._tb.add_scalar("train/lr", lr, done)

    def evaluation(self, done: int, history: list[dict[str, Any]], tables: Mapping[str, pd.DataFrame]) -> None:
        """Rewrite ``metrics.csv`` (atomically) from ``history``; tables to ``<name>.csv``."""
        if not self.enabled:
            return
        frame = pd.DataFrame(history)
        atomic_write(self.dir / "metrics.csv", lambda f: frame.to_csv(f, index=False), binary=False)
        for name, table in tables.items():
            out = table.copy()
            out.insert(0, "iter", done)
            atomic_write(self.dir / f"{name}.csv", lambda f, t=out: t.to_csv(f, index=False), binary=False)
        row = history[-1]
        shown = " ".join(f"{k} {v:.2f}" for k, v in row.items() if k not in ("iter", "lr", "time_s")
                         and not k.startswith("loss"))
        self.info(f"eval @ iter {done}: {shown}")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("iter", "time_s"):
                    self._tb.add_scalar(f"val/{k}" if not k.startswith("loss") else f"train/{k}_mean", v, done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()
