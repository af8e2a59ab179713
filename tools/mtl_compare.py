"""Δm of the multi-task model on the synthetic rooms: ``densefuse compare --task mtl`` (the multi-task model and
each single-task baseline, with and without scale EQ, over seeds) with the machine and load printed before and
after. Prints the per-run metrics, the per-metric summary and the Δm tables as Markdown; the CSV files
(runs.csv, summary.csv, delta_m.csv, delta_m_summary.csv) are in --out.

    python tools/mtl_compare.py --seeds 0,1,2 --out work_dirs/mtl_compare --set train.iters=200
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from _common import machine_line

import densefuse
from densefuse.engine.compare import compare, format_summary, members, task_tables
from densefuse.tasks import TASKS, available_tasks, register_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="mtl/synthetic_hrnet_r18")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default="off,explicit")
    ap.add_argument("--out", default="work_dirs/mtl_compare")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override key=value")
    args = ap.parse_args()
    if "mtl" not in available_tasks() and "mtl" not in TASKS:  # an install made before the mtl entry point
        from densefuse_tasks.mtl import MTLTask

        register_task("mtl")(MTLTask)
    print(f"before: {machine_line()}")
    cfg = densefuse.load_config(args.config, args.overrides)
    t0 = time.time()
    runs, summary = compare([cfg], args.modes.split(","), [int(s) for s in args.seeds.split(",")], Path(args.out),
                            progress=False, metrics="all")
    print(f"after: {machine_line()}; {time.time() - t0:.0f} s")
    print(runs.to_markdown(index=False, floatfmt=".4g"))
    print()
    print(format_summary(summary))
    for name, table in task_tables(runs, members([cfg])).items():
        print(f"\n{name}:")
        print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
