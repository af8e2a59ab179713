"""How many images does calibration need? Per-site, per-branch std estimates vs number of images.

Algorithm 1 of the paper measures the global mean/std of every upsampled branch over the whole
training set. densefuse defaults to ``calibration.num_images`` images instead; this tool shows how
far the estimate from the first N images is from the estimate from the largest N (default 256):

    rel_std_err  = |std_N / std_ref - 1|
    mean_err     = |mean_N - mean_ref| / std_ref    (in units of the branch std)

for every fusion site and branch of the default model (UPerNet on ResNet-18; random init unless
``--checkpoint`` gives trained weights; train-mode BN as in calibration). ``--trials`` repeats the measurement over different random orders of the same
image pool (so different first-N subsets); the table reports the worst trial.

Images: the built-in synthetic segmentation scenes (``densefuse_tasks.seg.datasets.SyntheticSeg``, normalized
with ``data.mean``/``data.std``) when the ``tasks`` package is importable, else structured random
images (``--source random``).

    python tools/calib_convergence.py                          # a few minutes on 2 cores
    python tools/calib_convergence.py --counts 8 16 32 64 128 256 512 --trials 5

Prints Markdown tables and writes ``calib_convergence.csv`` (long form, every trial) and
``calib_convergence_summary.csv`` to ``--out``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Optional

import pandas as pd
import torch
from torch import Tensor

import densefuse
from densefuse.config import DEFAULTS, merge
from densefuse.errors import DensefuseError


def build_cfg(config: Optional[str]) -> tuple[dict, str]:
    """The default seg config when it loads, else the same model described inline."""
    if config:
        try:
            return densefuse.load_config(config), config
        except (DensefuseError, OSError) as e:
            print(f"note: cannot load {config} ({e}); using the inline UPerNet-R18 config")
    cfg = merge(DEFAULTS, {"model": {"num_classes": 6, "decode_head": {"type": "uper", "channels": 64}}})
    return cfg, "inline: resnet18 + uper(channels=64), num_classes=6"


def synthetic_images(cfg: dict, n: int, seed: int) -> Optional[Tensor]:
    """``n`` normalized synthetic scenes (N,3,H,W), or None when the seg task is not importable."""
    try:
        from densefuse_tasks.seg.datasets import SyntheticSeg
    except ImportError:
        return None
    size = cfg["data"]["crop_size"]
    ds = SyntheticSeg(num_images=n, size=size, num_classes=int(cfg["model"]["num_classes"]), seed=seed, split="train")
    imgs = torch.stack([ds[i]["image"] for i in range(n)]).float()
    mean = torch.tensor(cfg["data"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["data"]["std"]).view(1, 3, 1, 1)
    return (imgs - mean) / std


def random_images(cfg: dict, n: int, seed: int) -> Tensor:
    """Structured random images: smooth colour fields at a random scale, random brightness and contrast,
    pixel noise -- so per-image statistics differ, as they do for real images. Already normalized."""
    g = torch.Generator().manual_seed(seed)
    h, w = cfg["data"]["crop_size"]
    out = torch.empty(n, 3, h, w)
    for i in range(n):
        cells = int(torch.randint(2, 17, (), generator=g))
        field = torch.randn(1, 3, cells, cells, generator=g)
        img = torch.nn.functional.interpolate(field, size=(h, w), mode="bicubic", align_corners=False)[0]
        contrast = float(torch.rand((), generator=g)) * 1.5 + 0.25
        shift = float(torch.randn((), generator=g)) * 0.5
        out[i] = img * contrast + shift + 0.2 * torch.randn(3, h, w, generator=g)
    return out


def batches(images: Tensor, order: Tensor, batch_size: int) -> list[Tensor]:
    return [images[order[i:i + batch_size]] for i in range(0, len(order), batch_size)]


def measure_counts(model: torch.nn.Module, images: Tensor, counts: list[int], batch_size: int,
                   seed: int) -> pd.DataFrame:
    """Per (site, branch) mean/std from the first N images of a random order, for every N in ``counts``.

    One pass: ``densefuse.measure`` runs on the disjoint chunks between consecutive counts and the
    chunks' first and second moments are accumulated (every image has the same size, so the counts
    weight them). Identical to calibrating on each prefix, whose batches are the same ones.
    """
    if any(n % batch_size for n in counts):
        raise SystemExit(f"error: every count must be a multiple of the batch size {batch_size}")
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    frames, m1, m2, start = [], None, None, 0
    for n in counts:
        chunk = measure_chunk(model, images, order[start:n], batch_size)
        w = n - start
        c1 = chunk["mean"].to_numpy() * w
        c2 = (chunk["var_before"].to_numpy() + chunk["mean"].to_numpy() ** 2) * w
        m1 = c1 if m1 is None else m1 + c1
        m2 = c2 if m2 is None else m2 + c2
        mean = m1 / n
        std = (m2 / n - mean**2).clip(min=0) ** 0.5
        frames.append(chunk[["site", "branch", "channels", "ratio_h"]].assign(mean=mean, std=std, num_images=n))
        start = n
    return pd.concat(frames, ignore_index=True)


def measure_chunk(model: torch.nn.Module, images: Tensor, idx: Tensor, batch_size: int) -> pd.DataFrame:
    return densefuse.measure(model, batches(images, idx, batch_size))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/seg/synthetic_upernet_r18.yaml",
                    help="model config (falls back to an inline UPerNet-R18 when it does not load)")
    ap.add_argument("--counts", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256])
    ap.add_argument("--trials", type=int, default=3, help="random orders of the image pool")
    ap.add_argument("--batch-size", type=int, default=None, help="default: calibration.batch_size")
    ap.add_argument("--checkpoint", type=Path, default=None,
                    help="model weights (a densefuse checkpoint or a bare state_dict); default: random init")
    ap.add_argument("--source", choices=["auto", "synthetic", "random"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/calib_convergence"))
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    cfg, cfg_name = build_cfg(args.config)
    counts = sorted(set(args.counts))
    pool = counts[-1]
    bsz = args.batch_size or int(cfg["calibration"]["batch_size"])
    images = None if args.source == "random" else synthetic_images(cfg, pool, args.seed)
    if images is None and args.source == "synthetic":
        raise SystemExit("error: densefuse_tasks.seg.datasets.SyntheticSeg is not importable")
    source = "synthetic scenes (tasks.seg SyntheticSeg)" if images is not None else "structured random images"
    if images is None:
        images = random_images(cfg, pool, args.seed)
    model = densefuse.build_model(cfg)
    weights = "random init"
    if args.checkpoint is not None:
        state = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state))
        weights = str(args.checkpoint)
    model.train()

    t0 = time.perf_counter()
    long = pd.concat(
        [measure_counts(model, images, counts, bsz, args.seed + t).assign(trial=t) for t in range(args.trials)],
        ignore_index=True,
    )
    elapsed = time.perf_counter() - t0
    key = ["trial", "site", "branch"]
    ref = long[long["num_images"] == pool].set_index(key)[["mean", "std"]].rename(
        columns={"mean": "mean_ref", "std": "std_ref"})
    long = long.join(ref, on=key)
    long["rel_std_err"] = (long["std"] / long["std_ref"] - 1).abs()
    long["mean_err"] = (long["mean"] - long["mean_ref"]).abs() / long["std_ref"]

    args.out.mkdir(parents=True, exist_ok=True)
    long.to_csv(args.out / "calib_convergence.csv", index=False)

    # Per site/branch: worst trial's relative std error for every N (in %).
    worst = long.groupby(["site", "branch", "num_images"], sort=False)["rel_std_err"].max().mul(100).unstack("num_images")
    worst.columns = [f"N={n}" for n in worst.columns]
    info = long[(long["trial"] == 0) & (long["num_images"] == pool)].set_index(["site", "branch"])
    worst.insert(0, "std_ref", info["std_ref"])
    worst.insert(0, "ratio", info["ratio_h"])
    worst = worst.drop(columns=[f"N={pool}"]).reset_index()

    summary = long[long["num_images"] < pool].groupby("num_images").agg(
        rel_std_err_median=("rel_std_err", "median"),
        rel_std_err_p90=("rel_std_err", lambda s: s.quantile(0.9)),
        rel_std_err_max=("rel_std_err", "max"),
        mean_err_median=("mean_err", "median"),
        mean_err_max=("mean_err", "max"),
    ).mul(100).reset_index()
    summary.columns = ["num_images"] + [f"{c} %" for c in summary.columns[1:]]
    summary.to_csv(args.out / "calib_convergence_summary.csv", index=False)

    sites = long["site"].nunique()
    branches = len(info)
    print(f"model: {cfg_name} ({weights}); {sites} fusion sites, {branches} branches; images: {source}, "
          f"{tuple(images.shape[-2:])}; calibration batch size {bsz}; reference N={pool}; "
          f"{args.trials} trials (random orders); {elapsed:.0f} s")
    print()
    print("Worst-trial |std_N / std_ref - 1| in % per site and branch:")
    print()
    print(worst.to_markdown(index=False, floatfmt=".2f"))
    print()
    print("Over all sites, branches and trials (errors in %; mean error in units of the branch std):")
    print()
    print(summary.astype({"num_images": str}).to_markdown(index=False, floatfmt=".2f"))
    print()
    print(f"wrote {args.out / 'calib_convergence.csv'} and {args.out / 'calib_convergence_summary.csv'}")
    return long


if __name__ == "__main__":
    main()
