"""Toolkit overhead: ``densefuse train`` iteration time vs a bare forward/backward/step loop.

Same model, batch and input size, measured interleaved in one run (rounds of: bare loop on fixed
tensors, bare loop fed by the same DataLoader and batch transform, the same loop fed by a DataLoader
without per-sample seeding, the densefuse Trainer), so a busy machine slows all of them alike. The
Trainer's iteration time is the median gap between consecutive iterations of its loop (data,
augmentation, step, logging; calibration and model building excluded). A second table gives the cost
of seeding one sample from its stream position (:class:`densefuse.data.loader.SeededSamples`) in the
main process, where the RNG states are also saved and restored.

    python tools/bench_overhead.py --iters 30 --rounds 3 --out overhead.csv
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

import densefuse
from densefuse.data.loader import InfiniteSampler, Loader, SeededSamples, build_loader
from densefuse.engine import Trainer, build_optimizer
from densefuse.engine.logger import RunLogger
from densefuse.engine.runtime import to_device
from densefuse.engine.trainer import calibration_batches
from densefuse.equalizer import calibrate
from densefuse.tasks import get_task

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "seg" / "synthetic_upernet_r18.yaml"


def _median_gap(stamps: list[float], skip: int) -> float:
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][skip:]
    return statistics.median(gaps)


def bare(cfg: densefuse.Config, iters: int, skip: int, source: str) -> float:
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
        stamps.append(time.perf_counter())
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


def toolkit(cfg: densefuse.Config, iters: int, skip: int) -> float:
    stamps: list[float] = []
    original = RunLogger.iteration

    def timed(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        stamps.append(time.perf_counter())
        return original(self, *args, **kwargs)

    RunLogger.iteration = timed
    try:
        with tempfile.TemporaryDirectory() as d:
            Trainer(cfg, Path(d) / "run", progress=False, log=lambda _m: None).run()
    finally:
        RunLogger.iteration = original
    return _median_gap(stamps, skip)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip", type=int, default=3, help="warm-up iterations left out of each median")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override")
    ap.add_argument("--out", default="overhead.csv")
    args = ap.parse_args()
    s = args.size
    cfg = densefuse.load_config(CONFIG, overrides=[
        f"train.iters={args.iters}", f"train.batch_size={args.batch_size}", f"train.val_interval={args.iters}",
        f"train.ckpt_interval={args.iters}", f"train.log_interval={args.iters}", "train.keep_last=0",
        f"data.crop_size=[{s},{s}]", f"data.kwargs.size=[{s},{s}]", "data.kwargs.num_val=2", "eval.batch_size=2",
        "calibration.num_images=8", *args.overrides])
    rows = []
    for r in range(args.rounds):
        rows.append({"round": r, "variant": "bare (fixed tensors)", "s_per_iter": bare(cfg, args.iters, args.skip, "tensors")})
        rows.append({"round": r, "variant": "bare (same loader + transform)", "s_per_iter": bare(cfg, args.iters, args.skip, "loader")})
        rows.append({"round": r, "variant": "bare (loader without per-sample seeding)",
                     "s_per_iter": bare(cfg, args.iters, args.skip, "unseeded")})
        rows.append({"round": r, "variant": "densefuse train", "s_per_iter": toolkit(cfg, args.iters, args.skip)})
    runs = pd.DataFrame(rows)
    table = runs.groupby("variant", sort=False)["s_per_iter"].median().to_frame()
    table["ms_per_iter"] = table["s_per_iter"] * 1000
    base_loader = table.loc["bare (same loader + transform)", "s_per_iter"]
    table["ratio_vs_bare_loader"] = table["s_per_iter"] / base_loader
    table["ratio_vs_bare_tensors"] = table["s_per_iter"] / table.loc["bare (fixed tensors)", "s_per_iter"]
    table = table.drop(columns="s_per_iter").reset_index()
    table.insert(1, "batch", args.batch_size)
    table.insert(2, "size", s)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds x {args.iters} iterations")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    table.to_csv(args.out, index=False)
    runs.to_csv(Path(args.out).with_suffix(".runs.csv"), index=False)
    seeding = seeding_cost()
    print(seeding.to_markdown(index=False, floatfmt=".1f"))
    seeding.to_csv(Path(args.out).with_suffix(".seeding.csv"), index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
