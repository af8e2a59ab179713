"""Δm of the multi-task model on the synthetic rooms: ``densefuse compare --task mtl`` (the multi-task model and
each single-task baseline, with and without scale EQ, over seeds) with the machine and load printed before and
after. Prints the per-run metrics, the per-metric summary and the Δm tables as Markdown; the CSV files
(runs.csv, summary.csv, delta_m.csv, delta_m_summary.csv) are in --out.

    python tools/mtl_compare.py --seeds 0,1,2 --out work_dirs/mtl_compare --set train.iters=200

``--finished-only`` trains nothing: the tables come from the runs already finished under --out, Δm from the
(mode, seed) pairs whose multi-task run and every baseline finished (an interrupted comparison, read as far as
it got).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
from _common import machine_line

import densefuse
from densefuse.engine.compare import (
    _read_result,
    compare,
    format_summary,
    members,
    run_config,
    summarize,
    task_tables,
)
from densefuse.tasks import TASKS, available_tasks, register_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="mtl/synthetic_hrnet_r18")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default="off,explicit")
    ap.add_argument("--out", default="work_dirs/mtl_compare")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    ap.add_argument("--finished-only", action="store_true", help="train nothing: tables of the finished runs")
    args = ap.parse_args()
    if "mtl" not in available_tasks() and "mtl" not in TASKS:  # an install made before the mtl entry point
        from densefuse_tasks.mtl import MTLTask

        register_task("mtl")(MTLTask)
    print(f"before: {machine_line()}")
    cfg = densefuse.load_config(args.config, args.overrides)
    t0 = time.time()
    modes, seeds = args.modes.split(","), [int(s) for s in args.seeds.split(",")]
    if args.finished_only:
        runs = finished_runs(cfg, modes, seeds, Path(args.out))
        if runs.empty:
            print("no (mode, seed) pair has finished every run yet")
            return
        summary = summarize(runs, {n: "mtl" for n in runs["config"]}, baseline=modes[0], metrics="all")
    else:
        runs, summary = compare([cfg], modes, seeds, Path(args.out), progress=False, metrics="all")
    print(f"after: {machine_line()}; {time.time() - t0:.0f} s")
    print(runs.to_markdown(index=False, floatfmt=".4g"))
    print()
    print(format_summary(summary))
    for name, table in task_tables(runs, members([cfg])).items():
        print(f"\n{name}:")
        print(table.to_markdown(index=False, floatfmt=".3f"))


def finished_runs(cfg: dict, modes: list[str], seeds: list[int], root: Path) -> pd.DataFrame:
    """The runs of the comparison that finished under ``root``, restricted to the (mode, seed) pairs every
    member (the multi-task model and each baseline) finished."""
    rows = []
    for member in members([cfg]):
        for mode in modes:
            for seed in seeds:
                result = _read_result(root / str(member["name"]) / f"{mode}_seed{seed}")
                if result is not None and result["config"] == run_config(member, mode, seed).to_dict():
                    rows.append({"config": str(member["name"]), "mode": mode, "seed": seed, "reused": True,
                                 **result["metrics"]})
    runs = pd.DataFrame(rows, columns=["config", "mode", "seed", "reused"] if not rows else None)
    if runs.empty:
        return runs
    complete = runs.groupby(["mode", "seed"])["config"].transform("nunique") == len(members([cfg]))
    return runs[complete].reset_index(drop=True)


if __name__ == "__main__":
    main()
