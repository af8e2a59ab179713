"""The paper's comparison: one config trained with and without scale equalization over several seeds."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import pandas as pd

from ..config import Config
from ..equalizer import MODES
from ..errors import ConfigError
from .trainer import Trainer


def compare(
    cfg: Config,
    modes: Sequence[str] = ("off", "explicit"),
    seeds: Sequence[int] = (0, 1, 2),
    root: Optional[Path] = None,
    progress: Optional[bool] = False,
    log: Callable[[str], None] = print,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train ``cfg`` once per (equalizer mode, seed) under ``root/<mode>_seed<k>/``.

    Returns ``(runs, summary)``: one row per run with its final metrics, and per mode the mean and
    std over seeds of every metric plus its difference to the first mode (the baseline). Both are
    also written to ``root`` as CSV.
    """
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown equalizer mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if not modes or not seeds:
        raise ConfigError("compare needs at least one mode and one seed")
    root = Path(root) if root is not None else Path(cfg.get("work_dir") or "work_dirs") / f"{cfg['name']}_compare"
    taken = [p for p in (root / f"{m}_seed{s}" for m in modes for s in seeds) if (p / "config.yaml").exists()]
    if taken:
        raise ConfigError(f"{taken[0]} already holds a run; choose another --work-dir")
    rows = []
    for mode in modes:
        for seed in seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg["model"]["equalizer"]["mode"] = mode
            run_cfg["seed"] = int(seed)
            run_dir = root / f"{mode}_seed{seed}"
            log(f"[{mode}, seed {seed}] -> {run_dir}")
            metrics = Trainer(run_cfg, run_dir, progress=progress, log=lambda _msg: None).run()
            rows.append({"mode": mode, "seed": int(seed), **{k: float(v) for k, v in metrics.items() if "." not in k}})
    runs = pd.DataFrame(rows)
    summary = summarize(runs, baseline=modes[0])
    runs.to_csv(root / "runs.csv", index=False)
    summary.to_csv(root / "summary.csv")
    return runs, summary


def summarize(runs: pd.DataFrame, baseline: Optional[str] = None) -> pd.DataFrame:
    """Per mode: ``<metric>`` mean, ``<metric>_std`` over seeds and ``<metric>_delta`` to ``baseline``."""
    metrics = [c for c in runs.columns if c not in ("mode", "seed")]
    order = list(dict.fromkeys(runs["mode"]))
    grouped = runs.groupby("mode", sort=False)[metrics]
    mean, std = grouped.mean().loc[order], grouped.std(ddof=1).loc[order]
    out = pd.DataFrame(index=pd.Index(order, name="mode"))
    out["seeds"] = runs.groupby("mode", sort=False)["seed"].count().loc[order]
    base = baseline if baseline is not None else order[0]
    for m in metrics:
        out[m] = mean[m]
        out[f"{m}_std"] = std[m]
        out[f"{m}_delta"] = mean[m] - mean.loc[base, m]
    return out


def format_summary(summary: pd.DataFrame, metrics: Optional[Sequence[str]] = None) -> str:
    """Markdown table with ``mean ± std (delta)`` cells, as in the paper's tables."""
    names = metrics or [c for c in summary.columns if not c.endswith(("_std", "_delta")) and c != "seeds"]
    table: dict[str, Any] = {"seeds": summary["seeds"]}
    for m in names:
        cells = []
        for mode in summary.index:
            sd = summary.loc[mode, f"{m}_std"]
            sd_txt = f" ± {sd:.2f}" if sd == sd else ""
            cells.append(f"{summary.loc[mode, m]:.2f}{sd_txt} ({summary.loc[mode, f'{m}_delta']:+.2f})")
        table[m] = cells
    return pd.DataFrame(table, index=summary.index).to_markdown()
