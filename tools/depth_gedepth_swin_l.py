"""GEDepth-Vanilla / -Adaptive Swin-L (the KITTI configs: swin-l, HAHI, GEDepth init): parameters and the time
of one forward at 352x704 on this machine. Prints a Markdown table and writes gedepth_swin_l.csv.

The equalizers run in ``explicit`` mode with an identity affine marked calibrated (a per-channel multiply-add
per fusion input, as after calibration; its statistics do not change the cost). No pretrained file is read.

    python tools/depth_gedepth_swin_l.py --out work_dirs/gedepth_swin_l [--repeats 1] [--threads 2]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from _common import load_average, machine_line

import densefuse

CONFIGS = {"GEDepth-Vanilla Swin-L": "depth/gedepth-vanilla_swin-l_8xb2-76.8k_kitti-352x704",
           "GEDepth-Adaptive Swin-L": "depth/gedepth-adaptive_swin-l_8xb2-76.8k_kitti-352x704"}


def _mark_identity_calibrated(model: torch.nn.Module) -> int:
    """Every equalizer: identity affine, calibrated (the cost of the calibrated explicit forward)."""
    n = 0
    for m in model.modules():
        if hasattr(m, "calibrated") and hasattr(m, "_is_calibrated"):
            m.calibrated.fill_(True)
            m._is_calibrated = True
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="work_dirs/gedepth_swin_l")
    ap.add_argument("--size", default="352,704")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.split(","))
    load_before = load_average()
    rows = []
    for name, cfg_name in CONFIGS.items():
        cfg = densefuse.load_config(cfg_name, ["data.root=unused", "model.encoder.pretrained=null"])
        torch.manual_seed(0)
        model = densefuse.get_task("depth", cfg).build_model(cfg).eval()
        sites = _mark_identity_calibrated(model)
        params = sum(p.numel() for p in model.parameters())
        image, ground = torch.randn(1, 3, h, w), torch.rand(1, 1, h, w) * 80
        inv = 1.0 / ground.clamp_min(1.0)
        times = []
        with torch.no_grad():
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                model(image, ground, inv)
                times.append(time.perf_counter() - t0)
        rows.append({"model": name, "params": params, "params_M": round(params / 1e6, 3), "sites": sites,
                     "size": f"{h}x{w}", "batch": 1, "forward_s": round(min(times), 2),
                     "repeats": args.repeats, "threads": torch.get_num_threads()})
        del model
    load_after = load_average()
    df = pd.DataFrame(rows)
    df["load_before"], df["load_after"] = load_before, load_after
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "gedepth_swin_l.csv", index=False)
    print(machine_line())
    print(f"load average before {load_before}, after {load_after}")
    print(df[["model", "params", "size", "batch", "forward_s", "threads"]].to_markdown(index=False))


if __name__ == "__main__":
    main()
