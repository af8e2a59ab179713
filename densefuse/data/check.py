"""Reading every sample of a dataset before training (``densefuse check-data``, ``data.verify``), and
replacing unreadable samples deterministically (``data.skip_bad``).

A dataset built inside :func:`collect_missing` lists the files its index names but cannot find instead
of stopping at the first one, so a single pass reports missing files together with the samples that do
not decode (a truncated JPEG, an undecodable depth PNG), whose label does not match the image size or
holds values out of range, or whose target has no valid pixel (every label ignored, every depth 0).
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DataError
from .io import IGNORE_INDEX
from .loader import _Wrapped

#: datasets with fewer samples (all splits used together) are checked before training when
#: ``data.verify`` is null: about 1.5 min at the (loaded-machine) rate measured in docs/training.md
VERIFY_DEFAULT_MAX = 2000

_missing: contextvars.ContextVar[Optional[list[str]]] = contextvars.ContextVar("densefuse_missing", default=None)


@contextlib.contextmanager
def collect_missing() -> Iterator[list[str]]:
    """Inside the block, dataset builders record missing files (via :func:`missing_file`) and leave
    their samples out instead of raising; the list holds one message per missing file."""
    found: list[str] = []
    token = _missing.set(found)
    try:
        yield found
    finally:
        _missing.reset(token)


def missing_file(message: str) -> None:
    """A file a dataset's index names is missing: a :class:`DataError`, or recorded inside
    :func:`collect_missing` (the caller then leaves the sample out)."""
    found = _missing.get()
    if found is None:
        raise DataError(message)
    found.append(message)


#: the valid pixels of each target a task's sample may hold
VALID: dict[str, Callable[[Tensor], Tensor]] = {
    "label": lambda t: t != IGNORE_INDEX,
    "depth": lambda t: t > 0,
}


def sample_files(dataset: Dataset, index: int) -> list[str]:
    """The files sample ``index`` is read from (for reports), when the dataset says."""
    for attr in ("samples", "items"):
        entries = getattr(dataset, attr, None)
        if isinstance(entries, Sequence) and index < len(entries):
            return [str(p) for p in entries[index] if isinstance(p, Path)]
    return [f"sample {index}"]


def reads_files(dataset: Dataset) -> bool:
    """Whether ``dataset`` reads files (an index of ``samples`` or ``items``), unlike generated data."""
    return isinstance(getattr(dataset, "samples", None), Sequence) or isinstance(getattr(dataset, "items", None), Sequence)


def decode_sample(dataset: Dataset, index: int) -> dict[str, Any]:
    """Sample ``index`` before its random per-sample transform (``load``), or as ``dataset[index]``."""
    load = getattr(dataset, "load", None)
    return load(index) if callable(load) else dataset[index]


def check_sample(dataset: Dataset, index: int) -> Optional[str]:
    """Why sample ``index`` cannot be trained on (one line naming its file), or None when it is good."""
    try:
        sample = decode_sample(dataset, index)
    except DataError as e:
        return str(e)
    for key, valid in VALID.items():
        target = sample.get(key) if isinstance(sample, dict) else None
        if isinstance(target, Tensor) and target.numel() and not bool(valid(target).any()):
            files = sample_files(dataset, index)
            what = "every label value is ignored (255)" if key == "label" else "every depth is 0 (no ground truth)"
            return f"{key} file {files[-1]} has no valid pixel: {what}"
    return None


@dataclass
class Report:
    """The bad samples of one dataset: ``bad`` maps a sample index to its reason; ``missing`` lists
    files its index names but that are not there."""

    name: str
    size: int
    bad: dict[int, str]
    missing: list[str]
    seconds: float
    threads: int

    @property
    def ok(self) -> bool:
        return not self.bad and not self.missing

    def lines(self) -> list[str]:
        rate = self.size / self.seconds if self.seconds > 0 else float("inf")
        head = (f"{self.name}: {self.size} samples read in {self.seconds:.1f}s ({rate:.0f}/s, {self.threads} "
                f"threads): {len(self.bad) + len(self.missing)} bad")
        return [head, *(f"  {m}" for m in self.missing), *(f"  {self.bad[i]}" for i in sorted(self.bad))]


def default_threads() -> int:
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def check_dataset(dataset: Dataset, name: str, threads: Optional[int] = None, missing: Sequence[str] = (),
                  progress: Optional[Callable[[int, int], None]] = None) -> Report:
    """Read every sample of ``dataset`` on ``threads`` threads (decoders release the GIL) and return the
    :class:`Report`. ``progress(done, total)`` is called as samples finish."""
    n = len(dataset)  # type: ignore[arg-type]
    threads = threads or default_threads()
    bad: dict[int, str] = {}
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]), ThreadPoolExecutor(threads) as pool:
        for i, reason in enumerate(pool.map(lambda k: check_sample(dataset, k), range(n), chunksize=8)):
            if reason is not None:
                bad[i] = reason
            if progress is not None and ((i + 1) % 200 == 0 or i + 1 == n):
                progress(i + 1, n)
    return Report(name, n, bad, list(missing), time.perf_counter() - t0, threads)


class SkipBad(_Wrapped):
    """``data.skip_bad``: a dataset whose unreadable samples are replaced by the next readable one (by
    index, wrapping around), so the replacement depends only on the index and a resume reads the same
    stream. ``known`` bad indices (from a check) are replaced without being read; others are found when
    read, and each is announced once on stderr."""

    def __init__(self, dataset: Dataset, known: Sequence[int] = ()) -> None:
        super().__init__(dataset)
        self.known = set(int(i) for i in known)
        self._told: set[int] = set()

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        for step in range(n):
            j = (index + step) % n
            if j in self.known:
                continue
            try:
                return self.dataset[j]
            except DataError as e:
                if j not in self._told:
                    self._told.add(j)
                    print(f"data.skip_bad: {e}; using the next readable sample instead", file=sys.stderr)
                self.known.add(j)
        raise DataError("data.skip_bad: no sample of the dataset is readable")


def check_splits(task: Any, cfg: Any, splits: Sequence[str], threads: Optional[int] = None,
                 progress: Optional[Callable[[str, int, int], None]] = None) -> list[Report]:
    """Build ``task``'s dataset of every split in ``splits`` (missing files collected, not raised) and
    read every sample: one :class:`Report` per split."""
    reports = []
    for split in dict.fromkeys(splits):
        with collect_missing() as missing:
            dataset = task.build_dataset(cfg, split)
        name = f"{cfg['data']['type']} {split}"
        tick = (lambda done, total, _n=name: progress(_n, done, total)) if progress is not None else None
        reports.append(check_dataset(dataset, name, threads, missing, tick))
    return reports


def verify_default(sizes: Sequence[int]) -> bool:
    """``data.verify: null``: check datasets of fewer than :data:`VERIFY_DEFAULT_MAX` samples in all."""
    return sum(sizes) < VERIFY_DEFAULT_MAX
