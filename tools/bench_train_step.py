"""The scale equalizer inside a whole training step, not only the fusion micro-benchmark.

UPerNet-R18 (densefuse's UPerHead on a timm ResNet-18, FCN auxiliary head) with ``--channels`` head
channels (512: the paper's setting), ``--size`` x ``--size`` inputs, batch ``--batch``; one training
step = forward + cross-entropy (+ 0.4 x auxiliary) + backward + AdamW step. Three models with the same
weights: equalizer ``off`` (the baseline), ``explicit`` (calibrated; the frozen affine in the forward)
and ``fold`` (calibrated and folded into the fusion convs, the paper's Algorithm 1).

Timing: ``--warmup`` rounds, then ``--rounds`` rounds; every round runs ``--steps`` steps of each mode,
in an order rotated every round, so drifts of the machine load hit all modes alike. Reported per
mode: the median step time and its IQR over rounds, and the median (IQR) over rounds of the paired
ratio to ``off`` in the same round. Writes ``steps.csv`` (every round) and ``summary.csv``.

    python tools/bench_train_step.py                           # 512 channels, 256x256, batch 2
    python tools/bench_train_step.py --rounds 15 --steps 2
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from _common import machine_line

import densefuse

MODES = ("off", "explicit", "fold")
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "seg" / "synthetic_upernet_r18.yaml"


def build(channels: int, size: int, batch: int, seed: int) -> dict[str, torch.nn.Module]:
    """The three models (same initial weights), calibrated / folded as their mode needs."""
    cfg = densefuse.load_config(CONFIG, overrides=[f"model.decode_head.channels={channels}"])
    torch.manual_seed(seed)
    base = densefuse.build_model(cfg)
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(batch, 3, size, size, generator=g) for _ in range(4)]
    models = {}
    for mode in MODES:
        m = copy.deepcopy(base)
        densefuse.set_mode(m, mode)
        if mode != "off":
            densefuse.calibrate(m, calib)
        if mode == "fold":
            densefuse.fold(m)
        models[mode] = m.train()
    return models


def step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    out = model(x)
    loss = F.cross_entropy(out["out"], y) + 0.4 * F.cross_entropy(out["aux"], y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=512)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=2, help="steps per mode per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/bench_train_step"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    models = build(args.channels, args.size, args.batch, args.seed)
    opts = {m: torch.optim.AdamW(models[m].parameters(), lr=1e-4) for m in MODES}
    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    y = torch.randint(0, 6, (args.batch, args.size, args.size), generator=g)

    rows = []
    for r in range(args.warmup + args.rounds):
        order = MODES[r % 3:] + MODES[: r % 3]
        for mode in order:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(models[mode], opts[mode], x, y)
            dt_s = (time.perf_counter() - t0) / args.steps
            if r >= args.warmup:
                rows.append({"round": r - args.warmup, "mode": mode, "step_s": dt_s})
            print(f"round {r - args.warmup:>3} {mode:<8} {dt_s:8.3f} s/step{' (warmup)' if r < args.warmup else ''}",
                  flush=True)
    steps = pd.DataFrame(rows)
    wide = steps.pivot(index="round", columns="mode", values="step_s")
    summary = []
    for mode in MODES:
        s = wide[mode]
        ratio = s / wide["off"]
        summary.append({
            "mode": mode,
            "median_step_s": s.median(),
            "iqr_step_s": s.quantile(0.75) - s.quantile(0.25),
            "ratio_of_medians": s.median() / wide["off"].median(),
            "paired_ratio_median": ratio.median(),
            "paired_ratio_iqr": ratio.quantile(0.75) - ratio.quantile(0.25),
        })
    summary = pd.DataFrame(summary)

    args.out.mkdir(parents=True, exist_ok=True)
    steps.to_csv(args.out / "steps.csv", index=False)
    summary.to_csv(args.out / "summary.csv", index=False)
    print(f"UPerNet-R18, {args.channels} head channels, {args.size}x{args.size}, batch {args.batch}, "
          f"fwd+bwd+AdamW step; {args.rounds} rounds x {args.steps} steps per mode (+{args.warmup} warmup), "
          f"interleaved; {machine_line()}")
    print()
    print(summary.to_markdown(index=False, floatfmt=".3f"))
    print()
    print(f"wrote {args.out / 'steps.csv'} and {args.out / 'summary.csv'}")
    return summary


if __name__ == "__main__":
    main()
