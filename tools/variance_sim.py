"""Reproduce Fig. 5 of Kim & Kim (TMLR 2024): bilinear upsampling lowers feature variance.

Features ``P ~ N(1/sqrt(2 pi), sigma^2)`` of shape (N, C, H, W) -- a Conv-BN-ReLU output before
upsampling -- are upsampled bilinearly by r = 2, 4, 8 and the variance of each result is measured,
for sigma on a grid in (0, 1). The paper used 16 x 256 x 128 x 128; the defaults here are smaller so
the run takes seconds on a 2-core CPU (the variance ratio does not depend on N or C, and only
through an O(1/size) border term on the size).

For i.i.d. inputs the ratio is known exactly: per axis, the mean over output pixels of the sum of
squared interpolation weights; away from the border (align_corners=False) it is ``2/3 - 1/(6 r^2)``,
so Var[UP_r(P)] / Var[P] -> 0.391, 0.431, 0.441 for r = 2, 4, 8. The table reports both (the closed
form only for align_corners=False). With --size 128 the border term is the paper's; N and C only set
the sampling noise.

Usage::

    python tools/variance_sim.py                       # 4 x 16 x 128 x 128, 12 sigmas + sqrt((pi-1)/2pi)
    python tools/variance_sim.py --batch 16 --channels 256 --size 128   # the paper's size (~17 GB at r=8)

Writes ``variance_sim.csv`` and ``variance_sim.png`` to ``--out`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)  # Eq. 5
RELU_VAR = (math.pi - 1.0) / (2.0 * math.pi)  # Eq. 6


def iid_ratio(size: int, r: int, align_corners: bool = False) -> float:
    """Exact Var[UP_r(X)] / Var[X] for i.i.d. X of spatial size ``size`` x ``size`` (bilinear is separable)."""
    basis = torch.eye(size, dtype=torch.float64).view(size, 1, size)
    w = F.interpolate(basis, scale_factor=r, mode="linear", align_corners=align_corners)[:, 0, :]
    return float(w.square().sum(0).mean()) ** 2


def closed_form_ratio(r: int) -> float:
    """Interior (border-free) ratio for align_corners=False: (2/3 - 1/(6 r^2))^2."""
    return (2.0 / 3.0 - 1.0 / (6.0 * r * r)) ** 2


def _moments(x: torch.Tensor) -> tuple[float, float]:
    """Mean and population variance over every element, accumulated in float64 without a float64 copy."""
    n = x.numel()
    mean = float(x.sum(dtype=torch.float64)) / n
    var = float((x - mean).square().sum(dtype=torch.float64)) / n
    return mean, var


def sigma_grid(n: int) -> list[float]:
    """``n`` sigmas evenly spread in (0, 1), plus sqrt((pi-1)/(2 pi)) -- a real Conv-BN-ReLU branch."""
    grid = [(i + 0.5) / n for i in range(n)]
    return sorted(set(round(s, 6) for s in grid) | {round(math.sqrt(RELU_VAR), 6)})


def simulate(
    batch: int, channels: int, size: int, ratios: list[int], sigmas: list[float], align_corners: bool, seed: int
) -> pd.DataFrame:
    """One row per (sigma, r): variance and mean before and after r x bilinear upsampling."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for sigma in sigmas:
        p = torch.randn(batch, channels, size, size, generator=gen) * sigma + RELU_MEAN
        mean_before, var_before = _moments(p)
        for r in ratios:
            with torch.no_grad():
                up = F.interpolate(p, scale_factor=r, mode="bilinear", align_corners=align_corners)
            mean_after, var_after = _moments(up)
            rows.append(
                {
                    "sigma": sigma,
                    "sigma2": sigma**2,
                    "r": r,
                    "mean_before": mean_before,
                    "mean_after": mean_after,
                    "mean_shift": abs(mean_after - mean_before),
                    "var_before": var_before,
                    "var_after": var_after,
                    "ratio": var_after / var_before,
                    "ratio_iid_exact": iid_ratio(size, r, align_corners),
                    "ratio_closed_form": float("nan") if align_corners else closed_form_ratio(r),
                }
            )
            del up
    return pd.DataFrame(rows)


def plot(df: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    hi = float(df["sigma2"].max()) * 1.05
    ax.plot([0, hi], [0, hi], color="gray", lw=1, ls="-", label="identity (no change)")
    markers = {2: "o", 4: "s", 8: "^"}
    for r, g in df.groupby("r"):
        ax.plot(g["sigma2"], g["var_after"], marker=markers.get(int(r), "x"), ms=4, lw=1.2, label=f"bilinear x{r}")
    ax.axvline(RELU_VAR, color="black", ls=":", lw=1.2, label=r"$(\pi-1)/2\pi$ (Conv-BN-ReLU output)")
    ax.axhline(RELU_VAR, color="black", ls=":", lw=0.6)
    ax.set_xlabel(r"variance before upsampling $\sigma^2$")
    ax.set_ylabel("variance after upsampling")
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="N (paper: 16)")
    ap.add_argument("--channels", type=int, default=16, help="C (paper: 256)")
    ap.add_argument("--size", type=int, default=128, help="H = W before upsampling (paper: 128)")
    ap.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--num-sigmas", type=int, default=12, help="sigma grid size in (0, 1)")
    ap.add_argument("--align-corners", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/variance_sim"))
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    sigmas = sigma_grid(args.num_sigmas)
    df = simulate(args.batch, args.channels, args.size, args.ratios, sigmas, args.align_corners, args.seed)
    elapsed = time.perf_counter() - t0

    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "variance_sim.csv", index=False)
    shape = f"{args.batch}x{args.channels}x{args.size}x{args.size}"
    title = (f"Bilinear upsampling lowers the variance (paper Fig. 5)\n"
             f"P ~ N(1/sqrt(2pi), sigma^2), {shape}, align_corners={args.align_corners}")
    plot(df, args.out / "variance_sim.png", title)

    wide = df.pivot(index="sigma", columns="r", values="var_after")
    wide.columns = [f"var x{r}" for r in wide.columns]
    wide.insert(0, "var before", df.groupby("sigma")["var_before"].first())
    wide.insert(0, "sigma^2", df.groupby("sigma")["sigma2"].first())
    wide = wide.reset_index()
    summary = df.groupby("r").agg(
        ratio_median=("ratio", "median"),
        ratio_min=("ratio", "min"),
        ratio_max=("ratio", "max"),
        ratio_iid_exact=("ratio_iid_exact", "first"),
        ratio_closed_form=("ratio_closed_form", "first"),
        max_mean_shift=("mean_shift", "max"),
    ).reset_index()
    summary["r"] = [f"x{r}" for r in summary["r"]]

    print(f"P ~ N(1/sqrt(2pi), sigma^2), shape {shape}, bilinear align_corners={args.align_corners}, "
          f"{len(sigmas)} sigmas, {elapsed:.1f} s")
    print()
    print(wide.to_markdown(index=False, floatfmt=".4f"))
    print()
    print("Var after / Var before per ratio (the same for every sigma: upsampling is linear):")
    print()
    print(summary.to_markdown(index=False, floatfmt=("", ".4f", ".4f", ".4f", ".4f", ".4f", ".1e")))
    print()
    print(f"wrote {args.out / 'variance_sim.csv'} and {args.out / 'variance_sim.png'}")
    return df


if __name__ == "__main__":
    main()
