"""Δm, the multi-task gain over single-task baselines (Maninis et al. 2019; Vandenhende et al. 2021):

    Δm = mean over (task, metric) of  (-1)^l * (M_mtl - M_single) / M_single * 100

with ``l = 0`` when a larger metric is better (mIoU, % within 11.25°) and ``l = 1`` when a smaller one is
(abs_rel, mean angle), so a positive Δm is a gain. ``average="tasks"`` first averages each task's metrics
and then the tasks (LibMTL's Δp), which weighs a task with many metrics like one with few.

Over seeds the comparison is *paired*: seed s of the multi-task model against seed s of every single-task
baseline; :func:`paired_delta_m` gives one Δm per seed and their mean ± sample std (ddof 1).
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import pandas as pd

#: ``average`` choices
AVERAGES = ("metrics", "tasks")

Table = Mapping[str, Mapping[str, float]]  # task -> metric -> value


def relative_gains(mtl: Table, single: Table, directions: Table) -> pd.DataFrame:
    """One row per (task, metric) of ``directions`` (``"max"`` / ``"min"``): both values and the signed
    relative gain in percent. A metric missing from either table, or a zero baseline, is an error."""
    rows = []
    for task, metrics in directions.items():
        for metric, direction in metrics.items():
            if direction not in ("max", "min"):
                raise ValueError(f"direction of {task}/{metric} must be 'max' or 'min', got {direction!r}")
            for name, table in (("multi-task", mtl), ("single-task", single)):
                if metric not in table.get(task, {}):
                    raise KeyError(f"the {name} results lack {task}/{metric}")
            m, b = float(mtl[task][metric]), float(single[task][metric])
            if b == 0 or not math.isfinite(b):
                raise ValueError(f"single-task {task}/{metric} is {b}: Δm divides by it")
            sign = 1.0 if direction == "max" else -1.0
            rows.append({"task": task, "metric": metric, "direction": direction, "mtl": m, "single": b,
                         "gain": sign * (m - b) / b * 100.0})
    if not rows:
        raise ValueError("no metric to compare")
    return pd.DataFrame(rows)


def delta_m(mtl: Table, single: Table, directions: Table, average: str = "metrics") -> float:
    """Δm in percent over the metrics named in ``directions`` (see the module docstring)."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    gains = relative_gains(mtl, single, directions)
    if average == "metrics":
        return float(gains["gain"].mean())
    return float(gains.groupby("task", sort=False)["gain"].mean().mean())


def paired_delta_m(runs: pd.DataFrame, directions: Table, average: str = "metrics",
                   by: Sequence[str] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Δm per seed and its mean ± std over seeds, from a long table of results.

    ``runs`` has one row per (``seed``, ``model``, ``task``, ``metric``) with its ``value``; ``model`` is
    ``"mtl"`` or ``"single"`` (the single-task baseline of that task); extra columns named in ``by``
    (e.g. ``eq``: with / without scale equalization) split the comparison into groups, each paired on
    its own. Returns ``(per_seed, summary)``: ``per_seed`` with columns ``*by, seed, delta_m``;
    ``summary`` with ``*by, delta_m_mean, delta_m_std, seeds`` (std over seeds with ddof 1, NaN for one
    seed). A seed lacking either side of a pair is an error naming it.
    """
    need = {"seed", "model", "task", "metric", "value", *by}
    missing = need - set(runs.columns)
    if missing:
        raise KeyError(f"results table lacks columns {sorted(missing)}")
    bad = set(runs["model"]) - {"mtl", "single"}
    if bad:
        raise ValueError(f"model must be 'mtl' or 'single', got {sorted(bad)}")
    dup = runs.duplicated([*by, "seed", "model", "task", "metric"])
    if dup.any():
        raise ValueError(f"results table has repeated rows, first: {runs[dup].iloc[0].to_dict()}")
    rows = []
    groups = runs.groupby(list(by), sort=True) if by else [((), runs)]
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        for seed, g in group.groupby("seed", sort=True):
            tables = {}
            for model in ("mtl", "single"):
                part = g[g["model"] == model]
                if part.empty:
                    where = ", ".join(f"{c}={v}" for c, v in zip(by, key))
                    raise ValueError(f"seed {seed}{' (' + where + ')' if where else ''} has no {model} results: "
                                     "Δm pairs every seed of the multi-task model with the same seed of the baselines")
                tables[model] = {t: dict(zip(p["metric"], p["value"])) for t, p in part.groupby("task")}
            rows.append({**dict(zip(by, key)), "seed": seed,
                         "delta_m": delta_m(tables["mtl"], tables["single"], directions, average)})
    per_seed = pd.DataFrame(rows)
    agg = per_seed.groupby(list(by), sort=True) if by else per_seed.assign(_all=0).groupby("_all")
    summary = agg["delta_m"].agg(delta_m_mean="mean", delta_m_std="std", seeds="count").reset_index()
    if not by:
        summary = summary.drop(columns="_all")
    return per_seed, summary
