"""Helpers shared by the scripts in tools/ (run as ``python tools/<script>.py``, so this directory is on
``sys.path``): the machine line every benchmark prints next to its table, and the parallel map the
dataset converters use."""
from __future__ import annotations

import datetime as dt
import os
import platform
from multiprocessing import Pool
from typing import Callable, Iterable, Optional, TypeVar

import numpy as np

T = TypeVar("T")


def load_average() -> str:
    """``1m/5m/15m`` load averages, or ``n/a`` where the OS has none: timings on a busy machine say so."""
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def paired_ci(ratios: np.ndarray, level: float = 0.95, boot: int = 10000, seed: int = 0) -> dict[str, float]:
    """Geometric mean of per-round ratios with a Student-t interval on their logs and a percentile
    bootstrap interval of the same statistic (the two agree when the rounds are well behaved)."""
    from scipy import stats

    logs = np.log(np.asarray(ratios, dtype=float))
    n = len(logs)
    mean = float(logs.mean())
    if n < 2:
        return {"ratio": float(np.exp(mean)), "t_lo": float("nan"), "t_hi": float("nan"), "boot_lo": float("nan"),
                "boot_hi": float("nan"), "half_width_pct": float("nan"), "rounds": n}
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * logs.std(ddof=1) / np.sqrt(n))
    rng = np.random.default_rng(seed)
    means = logs[rng.integers(0, n, (boot, n))].mean(1)
    lo_b, hi_b = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"ratio": float(np.exp(mean)), "t_lo": float(np.exp(mean - half)), "t_hi": float(np.exp(mean + half)),
            "boot_lo": float(np.exp(lo_b)), "boot_hi": float(np.exp(hi_b)),
            "half_width_pct": float((np.exp(half) - 1) * 100), "rounds": n}


def machine_line() -> str:
    """One line naming what a benchmark ran on: torch, threads, CPU, core count, load and date."""
    import torch

    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average {load_average()}; "
            f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC")


def parallel_errors(work: Callable[[T], Optional[str]], items: Iterable[T], nproc: int, chunksize: int = 16) -> list[str]:
    """Run ``work`` on every item, in ``nproc`` processes when more than one, and return the error
    messages it returned (``None`` means success), so that one bad file does not stop the others."""
    if nproc > 1:
        with Pool(nproc) as pool:
            return [e for e in pool.imap_unordered(work, items, chunksize=chunksize) if e]
    return [e for e in map(work, items) if e]
