"""Throughput of ``torchrun --nproc_per_node N -m densefuse train`` for N = 1 and 2 at the same global batch.

Each run trains the synthetic UPerNet config on gloo (CPU) or NCCL (GPU); the global batch is split
over the processes (``train.batch_size`` is per process). The augmentation is per sample (mmseg's
random resize, crop and flip, drawn from each sample's stream position, so every process draws what
one process would) with none on the device and no dropout, so the per-iteration losses of the runs
can be compared as well: the table shows the largest difference to the 1-process run.

    python tools/bench_ddp.py --iters 40 --global-batch 8 --out ddp.csv
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "seg" / "synthetic_upernet_r18.yaml"
_LINE = re.compile(r"iter (\d+)/\d+ loss ([\d.]+) lr \S+ ([\d.]+) img/s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, args: argparse.Namespace, work_dir: Path) -> pd.DataFrame:
    """One torchrun; returns (iteration, loss, img/s since the loop started) from rank 0's log.txt."""
    s = args.size
    sets = [f"train.iters={args.iters}", f"train.batch_size={args.global_batch // nproc}", "train.log_interval=1",
            f"train.val_interval={args.iters}", f"train.ckpt_interval={args.iters}", "train.keep_last=0",
            f"data.crop_size=[{s},{s}]", f"data.kwargs.size=[{s},{s}]", "data.kwargs.num_val=2",
            "data.pipeline=mmseg", "data.augment.photometric=false", "model.decode_head.dropout=0.0",
            "model.auxiliary_head.dropout=0.0", "optim.type=sgd", "optim.lr=0.01", "eval.batch_size=2",
            "calibration.num_images=8", "calibration.batch_size=4", f"device={args.device}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "densefuse", "train",
           "-c", str(CONFIG), "--work-dir", str(work_dir), "--no-progress"]
    for o in sets:
        cmd += ["--set", o]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun with {nproc} process(es) failed:\n{proc.stderr[-3000:]}")
    rows = []
    for line in (work_dir / "log.txt").read_text().splitlines():
        m = _LINE.search(line)
        if m:
            rows.append({"iter": int(m.group(1)), "loss": float(m.group(2)), "img_per_s": float(m.group(3))})
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=40)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="ddp.csv")
    args = ap.parse_args()
    rows, logs, reference = [], [], None
    with tempfile.TemporaryDirectory() as d:
        for n in [int(x) for x in args.nprocs.split(",")]:
            log = run(n, args, Path(d) / f"n{n}")
            reference = log if reference is None else reference
            logs.append(log.assign(processes=n, loss_diff_vs_first=(log["loss"] - reference["loss"]).abs()))
            rows.append({
                "processes": n, "batch_per_process": args.global_batch // n, "global_batch": args.global_batch,
                "size": args.size, "iters": args.iters, "img_per_s": float(log["img_per_s"].iloc[-1]),
                "max_loss_diff_vs_first": float((log["loss"] - reference["loss"]).abs().max()),
            })
    table = pd.DataFrame(rows)
    table["speedup"] = table["img_per_s"] / table["img_per_s"].iloc[0]
    print(f"device {args.device}, {os.cpu_count()} CPU cores, img/s over the whole loop")
    print(table.to_markdown(index=False, floatfmt=".4g"))
    table.to_csv(args.out, index=False)
    pd.concat(logs).to_csv(Path(args.out).with_suffix(".iters.csv"), index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
