"""Depth on the synthetic road scenes: ground embedding (vanilla / none) and equalizer modes
(off / explicit / fold) over several seeds. Prints a Markdown table and writes runs.csv / summary.csv.

The decoder's four fusion sites are chained; the trainer's densefuse.calibrate measures them in dependency
order (one pass per site), so every concat subject enters its fusion conv standardized.

    python tools/depth_compare.py --iters 100 --seeds 0,1,2 --out work_dirs/depth_compare
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pandas as pd

import densefuse
from densefuse.engine.trainer import Trainer

CONFIG = "depth/gedepth-vanilla_r18_1xb4-300_synthetic-64x192"
VARIANTS = {  # name -> (ground_embedding, equalizer mode)
    "noGE-explicit": ("none", "explicit"),
    "GE-off": ("vanilla", "off"),
    "GE-explicit": ("vanilla", "explicit"),
    "GE-fold": ("vanilla", "fold"),
}
METRICS = ("a1", "a2", "a3", "abs_rel", "rmse", "log10", "rmse_log", "silog", "sq_rel")
SHOWN = ["abs_rel", "sq_rel", "rmse", "rmse_log", "a1", "silog"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from VARIANTS")
    ap.add_argument("--num-val", type=int, default=24)
    ap.add_argument("--out", default="work_dirs/depth_compare")
    args = ap.parse_args()
    out = Path(args.out)
    rows = []
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:  # seed-major, so an interrupted run still compares every variant on the first seeds
        for name in args.variants.split(","):
            ge, mode = VARIANTS[name]
            run_dir = out / f"{ge}_{mode}_seed{seed}"
            done = run_dir / "final.pth"
            t0 = time.time()
            if done.is_file():  # finished earlier: reuse its logged metrics
                last = pd.read_csv(run_dir / "metrics.csv").iloc[-1]
                metrics = {k: float(last[k]) for k in last.index if k in METRICS}
                wall = float(last["time_s"])
            else:
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                cfg = densefuse.load_config(CONFIG, [
                    f"depth.ground_embedding={ge}", f"model.equalizer.mode={mode}", f"seed={seed}",
                    f"train.iters={args.iters}", f"train.val_interval={args.iters}",
                    f"train.ckpt_interval={args.iters}", f"schedule.warmup_iters={min(30, args.iters // 4)}",
                    f"data.kwargs.num_val={args.num_val}"])
                metrics = Trainer(cfg, run_dir, progress=False, log=lambda _msg: None).run()
                wall = time.time() - t0
            rows.append({"variant": name, "seed": seed, "wall_s": round(wall, 1), **metrics})
            print(f"{name} seed {seed}: abs_rel {metrics['abs_rel']:.4f} rmse {metrics['rmse']:.3f} ({wall:.0f} s)",
                  flush=True)
            out.mkdir(parents=True, exist_ok=True)
            pd.DataFrame(rows).to_csv(out / "runs.csv", index=False)
    runs = pd.DataFrame(rows)
    g = runs.groupby("variant", sort=False)
    mean, std = g[SHOWN].mean(), g[SHOWN].std(ddof=1)
    table = pd.DataFrame({m: [f"{mean.loc[v, m]:.4f} ± {std.loc[v, m]:.4f}" for v in mean.index] for m in SHOWN},
                         index=mean.index)
    table.insert(0, "seeds", g["seed"].count())
    table.to_csv(out / "summary.csv")
    print(runs[["variant", "seed", "wall_s", *SHOWN]].to_markdown(index=False, floatfmt=".4f"))
    print()
    print(table.to_markdown())


if __name__ == "__main__":
    main()
