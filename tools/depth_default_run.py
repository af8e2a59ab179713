"""Time the default `densefuse train --task depth` and print its final nine metrics (Markdown table + CSV).

    python tools/depth_default_run.py --out work_dirs/depth_default_run.csv
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

METRICS = ["a1", "a2", "a3", "abs_rel", "rmse", "log10", "rmse_log", "silog", "sq_rel"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default=None, help="run directory (default: work_dirs/depth_default_<time>)")
    ap.add_argument("--out", default="work_dirs/depth_default_run.csv")
    args = ap.parse_args()
    wd = Path(args.work_dir or f"work_dirs/depth_default_{dt.datetime.now():%Y%m%d_%H%M%S}")
    cmd = [sys.executable, "-m", "densefuse.cli", "train", "--task", "depth", "--work-dir", str(wd), "--no-progress"]
    t0, c0 = time.time(), os.times()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall, c1 = time.time() - t0, os.times()
    cpu = (c1.children_user - c0.children_user) + (c1.children_system - c0.children_system)
    last = pd.read_csv(wd / "metrics.csv").iloc[-1]
    row = {"date": f"{dt.date.today()}", "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "load_avg_1m": round(os.getloadavg()[0], 1), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "iters": int(last["iter"]), **{m: float(last[m]) for m in METRICS}}
    table = pd.DataFrame([row])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    print(table.to_markdown(index=False, floatfmt=".4f"))


if __name__ == "__main__":
    main()
