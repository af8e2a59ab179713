"""The paper's comparison: configs trained without and with scale equalization over several seeds.

Each (config, equalizer mode, seed) is one training run under ``root/<config name>/<mode>_seed<k>/``.
A run is *finished* when its ``result.json`` exists (written last, atomically): a later ``compare``
over the same root reuses it instead of training again, so a comparison can be interrupted and
resumed, or extended with more seeds or configs. A run trains in a hidden ``.<mode>_seed<k>.partial-*``
directory that is renamed into place only when it finished; a failed or interrupted run therefore
never leaves a directory that blocks its re-run (stale partial directories are removed on the next
call). Checkpoints are deleted once a run finished unless ``keep_checkpoints`` is set: the table needs
only the final metrics.

The summary follows the paper's tables: one row per config and metric, columns ``w/o EQ`` and
``w/ EQ`` as mean ± std over seeds, and the difference of the means. The metrics are the task's:
its ``table_metrics`` (default: the primary metric alone; Tables 2/3: mIoU); ``"all"``
takes every metric of the task's summary (depth's Table 5: the nine metrics in the metric's order).

Two optional task hooks let a task compare more than its own config (the core knows no task): a task's
``compare_members(cfg)`` returns every config to train for ``cfg`` (e.g. a multi-task model and its
single-task baselines), and ``compare_tables(runs, configs)`` returns extra named tables computed from the
finished runs (e.g. Δm), written as ``<name>.csv`` next to ``summary.csv``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import pandas as pd

from ..config.schema import plain
from ..config.sections import CoreConfig
from ..equalizer import MODES
from ..errors import ConfigError
from ..tasks import Task, get_task, task_class
from .runtime import default_work_dir

#: The paper's number of seeds per setting.
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
RESULT = "result.json"
MODE_LABELS = {"off": "w/o EQ", "explicit": "w/ EQ", "fold": "w/ EQ (fold)"}


def format_metric(value: float) -> str:
    """A metric for people: 2 decimals from 1 up (mIoU ``62.93``, RMSE ``2.35``), 4 significant digits
    below 1 (abs_rel ``0.05123``, a std of ``0.0012``), so every metric the tasks report stays readable."""
    v = float(value)
    if v != v:
        return "nan"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.4g}"


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``{'mIoU': 62.93, 'abs_rel': 0.05123}``: each value through :func:`format_metric`, so small
    metrics (depth's abs_rel) keep their digits."""
    return "{" + ", ".join(f"'{k}': {format_metric(v)}" for k, v in metrics.items()) + "}"


def markdown_table(frame: pd.DataFrame) -> str:
    """A table as Markdown with every float through :func:`format_metric`."""
    shown = frame.copy()
    for col in shown.columns:
        if shown[col].dtype.kind == "f":
            shown[col] = [format_metric(v) for v in shown[col]]
    return shown.to_markdown(index=False, disable_numparse=True)


def run_config(cfg: CoreConfig, mode: str, seed: int) -> CoreConfig:
    """``cfg`` with the equalizer ``mode`` and ``seed`` of one run (a copy)."""
    run = copy.deepcopy(cfg)
    run["model"]["equalizer"]["mode"] = mode
    run["seed"] = int(seed)
    return run


def _plain(cfg: Mapping[str, Any]) -> dict:
    return json.loads(json.dumps(plain(cfg)))


def _read_result(run_dir: Path) -> Optional[dict]:
    path = run_dir / RESULT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path} ({e}); delete that run directory to train it again") from None


def _write_json(path: Path, data: Any) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def _check_inputs(configs: Sequence[CoreConfig], modes: Sequence[str], seeds: Sequence[int]) -> None:
    if not configs:
        raise ConfigError("compare needs at least one config")
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise ConfigError(f"unknown equalizer mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if len(modes) < 2 or len(set(modes)) != len(modes):
        raise ConfigError(f"compare needs a baseline mode and at least one other, each once; got {', '.join(modes) or 'none'}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"compare needs at least one seed, each once; got {', '.join(map(str, seeds)) or 'none'}")
    names = [str(c["name"]) for c in configs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two configs are named '{dup[0]}'; give them different 'name' keys")


def compare(
    configs: Sequence[CoreConfig],
    modes: Sequence[str] = ("off", "explicit"),
    seeds: Sequence[int] = DEFAULT_SEEDS,
    root: Optional[Path] = None,
    keep_checkpoints: bool = False,
    progress: Optional[bool] = False,
    log: Callable[[str], None] = print,
    metrics: Optional[Sequence[str] | str] = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every config once per (equalizer mode, seed), reusing finished runs under ``root``.

    Returns ``(runs, summary)``: one row per run (config, mode, seed, reused, its summary metrics) and
    :func:`summarize`'s table over ``metrics`` (see there). Both are written to ``root`` as ``runs.csv`` and ``summary.csv``.
    ``root`` defaults to ``work_dirs/compare`` (or ``work_dirs/<name>_compare`` for a single config).
    """
    from . import Trainer  # the trainer pulls in the data stack; only needed to train

    for cfg in configs:
        task_class(cfg["task"])  # an unknown task fails before anything trains
    configs = members(configs)
    _check_inputs(configs, modes, seeds)
    if root is None:
        root = default_work_dir(configs[0], "{name}_compare" if len(configs) == 1 else "compare")
    root = Path(root)
    rows = []
    for cfg in configs:
        cfg_root = root / str(cfg["name"])
        cfg_root.mkdir(parents=True, exist_ok=True)
        for stale in cfg_root.glob(".*.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        for mode in modes:
            for seed in seeds:
                run_cfg = run_config(cfg, mode, seed)
                run_dir = cfg_root / f"{mode}_seed{seed}"
                result = _read_result(run_dir)
                if result is None and run_dir.exists():
                    raise ConfigError(f"{run_dir} exists but holds no finished compare run ({RESULT} missing); "
                                      f"move it away or choose another --work-dir")
                reused = result is not None
                if reused:
                    if result.get("config") != _plain(run_cfg):
                        raise ConfigError(f"{run_dir} holds a finished run of different settings; "
                                          f"choose another --work-dir to compare these")
                    log(f"[{cfg['name']}, {mode}, seed {seed}] finished before -> reusing {run_dir}")
                    values = result["metrics"]
                else:
                    log(f"[{cfg['name']}, {mode}, seed {seed}] -> {run_dir}")
                    values = _train(Trainer, run_cfg, cfg_root, run_dir, keep_checkpoints, progress)
                rows.append({"config": str(cfg["name"]), "mode": mode, "seed": int(seed), "reused": reused,
                             **{k: float(v) for k, v in values.items()}})
    runs = pd.DataFrame(rows)
    summary = summarize(runs, {str(c["name"]): c["task"] for c in configs}, baseline=modes[0], metrics=metrics)
    root.mkdir(parents=True, exist_ok=True)
    runs.to_csv(root / "runs.csv", index=False)
    summary.to_csv(root / "summary.csv", index=False)
    for name, table in task_tables(runs, configs).items():
        table.to_csv(root / f"{name}.csv", index=False)
    return runs, summary


def members(configs: Sequence[CoreConfig]) -> list[CoreConfig]:
    """Every config to train: each given one, or what its task's ``compare_members`` hook returns for it."""
    out: list[CoreConfig] = []
    for cfg in configs:
        out += list(get_task(cfg["task"], cfg).compare_members(cfg))
    return out


def task_tables(runs: pd.DataFrame, configs: Sequence[CoreConfig]) -> dict[str, pd.DataFrame]:
    """The extra tables of each task (``Task.compare_tables``, e.g. mtl's delta-m), over the runs of its configs
    (``configs`` as :func:`members` returns them)."""
    out: dict[str, pd.DataFrame] = {}
    for name in dict.fromkeys(str(c["task"]) for c in configs):
        own = [c for c in configs if str(c["task"]) == name]
        out.update(get_task(name, own[0]).compare_tables(runs, own))
    return out


def _train(trainer_cls: Any, run_cfg: CoreConfig, cfg_root: Path, run_dir: Path, keep_checkpoints: bool,
           progress: Optional[bool]) -> dict[str, float]:
    """One run in a partial directory, renamed to ``run_dir`` when it finished; removed if it failed."""
    partial = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.partial-", dir=cfg_root))
    try:
        work = partial / "run"
        metrics = trainer_cls(run_cfg, work, progress=progress, log=lambda _msg: None).run()
        metrics = {k: float(v) for k, v in metrics.items()}
        if not keep_checkpoints:
            for ckpt in work.glob("*.pth"):
                ckpt.unlink()
        _write_json(work / RESULT, {"config": _plain(run_cfg), "metrics": metrics})
        os.replace(work, run_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return metrics


BOOKKEEPING = ("config", "mode", "seed", "reused")


def table_metrics(task: type[Task], recorded: Sequence[str], metrics: Optional[Sequence[str] | str] = None) -> list[str]:
    """The metrics of a task's comparison table: ``metrics`` as given; ``"all"`` = every recorded metric
    of the task's summary, in its order; ``None`` = the task's ``table_metrics`` when it declares them
    (``"all"`` as above: a task whose metrics depend on its config), else its primary metric."""
    if metrics == "all" or (metrics is None and task.table_metrics == "all"):
        return [c for c in recorded if c not in BOOKKEEPING]
    if metrics is not None:
        return [metrics] if isinstance(metrics, str) else list(metrics)
    return list(task.table_metrics or [task.primary_metric])


def summarize(runs: pd.DataFrame, tasks: Optional[Mapping[str, str]] = None, baseline: Optional[str] = None,
              metrics: Optional[Sequence[str] | str] = None) -> pd.DataFrame:
    """Per config, metric and mode: mean, std (over seeds, ddof 1) and number of seeds, plus
    ``delta`` = mean - baseline mean. ``tasks`` maps config -> task name (its metrics and direction);
    ``metrics`` as in :func:`table_metrics`."""
    order_modes = list(dict.fromkeys(runs["mode"]))
    base = baseline if baseline is not None else order_modes[0]
    out = []
    for config, g in runs.groupby("config", sort=False):
        if tasks is None or config not in tasks:
            raise ConfigError(f"summarize needs the task of config '{config}'")
        task = task_class(tasks[config])
        recorded = [c for c in g.columns if g[c].notna().any()]
        for metric in table_metrics(task, recorded, metrics):
            if metric not in g.columns:
                raise ConfigError(f"metric '{metric}' is not among the results of {config}: "
                                  f"{', '.join(c for c in recorded if c not in BOOKKEEPING)}")
            stats = g.groupby("mode", sort=False)[metric].agg(["mean", "std", "count"])
            for mode in order_modes:
                if mode not in stats.index:
                    continue
                out.append({"config": config, "metric": metric,
                            "direction": task.metric_direction if metric == task.primary_metric else "",
                            "mode": mode, "mean": float(stats.loc[mode, "mean"]), "std": float(stats.loc[mode, "std"]),
                            "seeds": int(stats.loc[mode, "count"]),
                            "delta": float(stats.loc[mode, "mean"] - stats.loc[base, "mean"]) if base in stats.index else float("nan")})
    return pd.DataFrame(out)


def paper_table(summary: pd.DataFrame, digits: Optional[int] = None) -> pd.DataFrame:
    """The paper's layout: rows = configs (and metrics), columns ``w/o EQ``, ``w/ EQ`` as
    ``mean ± std`` and ``Δ`` (each equalized mode minus the baseline), as strings: ``digits`` decimals,
    or by default :func:`format_metric` (readable for mIoU and for depth's abs_rel alike)."""
    fmt: Callable[[float], str] = format_metric if digits is None else (lambda v: f"{float(v):.{digits}f}")
    rows = []
    for (config, metric), g in summary.groupby(["config", "metric"], sort=False):
        direction = g["direction"].iloc[0]
        arrow = {"max": " ↑", "min": " ↓"}.get(direction, "")
        row: dict[str, Any] = {"config": config, "metric": f"{metric}{arrow}"}
        modes = list(g["mode"])
        for k, (_, r) in enumerate(g.iterrows()):
            label = MODE_LABELS.get(r["mode"], r["mode"])
            sd = f" ± {fmt(r['std'])}" if r["std"] == r["std"] else ""
            row[label] = f"{fmt(r['mean'])}{sd}"
            if k > 0:
                suffix = "" if len(modes) == 2 else f" ({label})"
                delta = fmt(r["delta"])
                row[f"Δ{suffix}"] = delta if delta.startswith("-") or delta == "nan" else f"+{delta}"
        row["seeds"] = int(g["seeds"].min())
        rows.append(row)
    return pd.DataFrame(rows)


def format_summary(summary: pd.DataFrame, digits: Optional[int] = None) -> str:
    """:func:`paper_table` as Markdown."""
    return paper_table(summary, digits).to_markdown(index=False)
