"""Toolkit overhead: ``densefuse train`` iteration time vs a bare forward/backward/step loop.

Same model, batch and input size, measured interleaved in one run (rounds of: bare loop on fixed
tensors, bare loop fed by the same DataLoader and batch transform, the same loop fed by a DataLoader
without per-sample seeding, the densefuse Trainer; the order rotates every round), so a busy machine
slows all of them alike. The Trainer's iteration time is the median gap between consecutive iterations
of its loop (data, augmentation, step, logging; calibration and model building excluded), in wall time
and in process CPU time (``time.process_time``: what the process itself spent, less sensitive to other
processes on a shared machine).

The overhead is resolved from paired ratios: in every round, Trainer / bare loop with the same loader,
then the geometric mean of the per-round ratios with a 95 % Student-t confidence interval on their logs
(and a bootstrap interval as a check). A 2 % overhead is resolved when the interval's half-width is
below 2 %; the table says whether it is. A second table gives the cost of seeding one sample from its
stream position (:class:`densefuse.data.loader.SeededSamples`) in the main process, where the RNG
states are also saved and restored.

    python tools/bench_overhead.py --iters 30 --rounds 12 --out results/overhead.csv
    python tools/bench_overhead.py --iters 30 --rounds 12 --add-runs results/overhead.runs.csv --out results/overhead2.csv
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import densefuse
from densefuse.calibration import calibrate
from densefuse.data.loader import InfiniteSampler, Loader, SeededSamples, build_loader
from densefuse.engine import Trainer, build_optimizer
from densefuse.engine.logger import RunLogger
from densefuse.engine.runtime import to_device
from densefuse.engine.trainer import calibration_batches
from densefuse.tasks import get_task

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, paired_ci  # noqa: E402

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "seg" / "synthetic_upernet_r18.yaml"

Stamp = tuple[float, float]  # (perf_counter, process_time) after an iteration


def _stamp() -> Stamp:
    return time.perf_counter(), time.process_time()


def _median_gap(stamps: list[Stamp], skip: int) -> tuple[float, float]:
    """Median wall and CPU seconds between consecutive iterations, the first ``skip`` gaps left out."""
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][skip:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][skip:]
    return statistics.median(wall), statistics.median(cpu)


def bare(cfg: densefuse.Config, iters: int, skip: int, source: str) -> tuple[float, float]:
    """A plain loop: model(x) -> loss -> backward -> AdamW step, timed per iteration (the model is
    calibrated first, as the Trainer does, so the equalizers run in the forward). ``source``: ``tensors``
    (one fixed batch), ``loader`` (:func:`build_loader` + the batch transform) or ``unseeded`` (the same
    without per-sample seeding)."""
    torch.manual_seed(0)
    task = get_task("seg", cfg)
    model = task.build_model(cfg)
    cpu = torch.device("cpu")
    calibrate(model, calibration_batches(task, cfg, task.build_dataset(cfg, cfg["data"]["train_split"]), cpu),
              num_images=cfg["calibration"]["num_images"], forward=task.forward)
    model.train()
    opt = build_optimizer(model, cfg["optim"])
    bs, (h, w) = cfg["train"]["batch_size"], cfg["data"]["crop_size"]
    if source != "tensors":
        data = task.build_dataset(cfg, cfg["data"]["train_split"])
        tf = task.build_transform(cfg, train=True)
        it = iter(build_loader(data, bs, train=True, seed=0) if source == "loader" else
                  Loader(data, batch_size=bs, sampler=InfiniteSampler(data, seed=0), drop_last=True))
        batches = (tf(to_device(next(it), torch.device("cpu"))) for _ in range(iters))
    else:
        fixed = {"image": torch.randn(bs, 3, h, w), "label": torch.randint(0, cfg["model"]["num_classes"], (bs, h, w))}
        batches = (fixed for _ in range(iters))
    stamps = []
    for batch in batches:
        loss, _ = task.loss(model(batch["image"]), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stamps.append(_stamp())
    return _median_gap(stamps, skip)


def seeding_cost(samples: int = 5000) -> pd.DataFrame:
    """Microseconds per sample that :class:`SeededSamples` adds in the main process (seeding torch,
    numpy and python from the stream position, saving and restoring their states) and in a worker
    (seeding only), over a dataset whose samples cost nothing."""
    seeded = SeededSamples(list(range(8)), seed=0)
    rows = []
    for where, read in (("main process", seeded.__getitem__), ("worker", lambda key: seeded._read(*key))):
        t0 = time.perf_counter()
        for k in range(samples):
            read((k, k % 8))
        rows.append({"where": where, "us_per_sample": (time.perf_counter() - t0) / samples * 1e6})
    return pd.DataFrame(rows)


def toolkit(cfg: densefuse.Config, iters: int, skip: int) -> tuple[float, float]:
    stamps: list[Stamp] = []
    original = RunLogger.iteration

    def timed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        stamps.append(_stamp())
        return original(self, *args, **kwargs)

    RunLogger.iteration = timed
    try:
        with tempfile.TemporaryDirectory() as d:
            Trainer(cfg, Path(d) / "run", progress=False, log=lambda _m: None).run()
    finally:
        RunLogger.iteration = original
    return _median_gap(stamps, skip)


VARIANTS = ("bare (fixed tensors)", "bare (same loader + transform)", "bare (loader without per-sample seeding)",
            "densefuse train")


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=12, help="paired rounds (the interval narrows as 1/sqrt(rounds))")
    ap.add_argument("--skip", type=int, default=3, help="warm-up iterations left out of each median")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--out", default="results/overhead.csv")
    ap.add_argument("--add-runs", type=Path, action="append", default=[],
                    help="the .runs.csv of an earlier run with the same settings: its rounds join this run's")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    s = args.size
    cfg = densefuse.load_config(CONFIG, overrides=[
        f"train.iters={args.iters}", f"train.batch_size={args.batch_size}", f"train.val_interval={args.iters}",
        f"train.ckpt_interval={args.iters}", f"train.log_interval={args.iters}", "train.keep_last=0",
        f"data.crop_size=[{s},{s}]", f"data.kwargs.size=[{s},{s}]", "data.kwargs.num_val=2", "eval.batch_size=2",
        "calibration.num_images=8", *args.overrides])
    run = {VARIANTS[0]: lambda: bare(cfg, args.iters, args.skip, "tensors"),
           VARIANTS[1]: lambda: bare(cfg, args.iters, args.skip, "loader"),
           VARIANTS[2]: lambda: bare(cfg, args.iters, args.skip, "unseeded"),
           VARIANTS[3]: lambda: toolkit(cfg, args.iters, args.skip)}
    load_before = load_average()
    rows = []
    for r in range(args.rounds):
        order = VARIANTS[r % 4:] + VARIANTS[:r % 4]  # rotated: no variant always runs first or last
        for variant in order:
            wall, cpu = run[variant]()
            rows.append({"round": r, "variant": variant, "s_per_iter": wall, "cpu_s_per_iter": cpu})
        print(f"round {r}: " + ", ".join(f"{x['variant']} {x['s_per_iter'] * 1e3:.1f} ms" for x in rows[-4:]),
              flush=True)
    load_after = load_average()
    runs = pd.DataFrame(rows)
    for earlier in args.add_runs:  # more paired rounds from the same command run before (another idle window)
        prev = pd.read_csv(earlier)
        runs = pd.concat([runs, prev.assign(round=prev["round"] + runs["round"].max() + 1)], ignore_index=True)
    table = runs.groupby("variant", sort=False)[["s_per_iter", "cpu_s_per_iter"]].median()
    table = table.loc[list(VARIANTS)]
    table["ms_per_iter"] = table["s_per_iter"] * 1000
    table["cpu_ms_per_iter"] = table["cpu_s_per_iter"] * 1000
    table = table.drop(columns=["s_per_iter", "cpu_s_per_iter"]).reset_index()
    table.insert(1, "batch", args.batch_size)
    table.insert(2, "size", s)
    wide = {k: runs.pivot(index="round", columns="variant", values=k) for k in ("s_per_iter", "cpu_s_per_iter")}
    paired = []
    for variant in (VARIANTS[3], VARIANTS[2], VARIANTS[0]):
        for clock, key in (("wall", "s_per_iter"), ("cpu", "cpu_s_per_iter")):
            ratios = (wide[key][variant] / wide[key][VARIANTS[1]]).to_numpy()
            ci = paired_ci(ratios)
            paired.append({"variant / bare (same loader)": variant, "clock": clock, **ci,
                           "resolves_2pct": bool(ci["half_width_pct"] < 2.0)})
    paired = pd.DataFrame(paired)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.iters} "
          f"iterations, load before {load_before}, after {load_after}"
          + (f"; with {runs['round'].nunique() - args.rounds} rounds from {', '.join(map(str, args.add_runs))}"
             if args.add_runs else ""))
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print()
    print("Paired per-round ratios (geometric mean, 95 % t and bootstrap intervals):")
    print(paired.to_markdown(index=False, floatfmt=".4f"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    runs.to_csv(out.with_suffix(".runs.csv"), index=False)
    paired.to_csv(out.with_suffix(".paired.csv"), index=False)
    seeding = seeding_cost()
    print(seeding.to_markdown(index=False, floatfmt=".1f"))
    seeding.to_csv(out.with_suffix(".seeding.csv"), index=False)
    print(f"wrote {out}")
    return paired


if __name__ == "__main__":
    main()
