"""Fig. 7 of Kim & Kim (TMLR 2024) on this machine: cost of the branch pipelines of a fusion site.

Each pipeline maps one decoder branch ``x`` (N, C, h, w) to its concatenation subject at r x the size
(N, C, r h, r w), forward + backward (``x`` requires grad, as an encoder feature would):

=====================  ==========================================================================
``conv-bn-relu-up``    ConvBNReLU 3x3 -> ``Fusion(mode="off").concat``  (the baseline)
``+scaleeq-explicit``  ConvBNReLU 3x3 -> ``Fusion(mode="explicit").concat``: the frozen affine runs
                       on the pre-upsample tensor (``ScaleEqualizer.branch``), as densefuse does
``+scaleeq-fold``      ConvBNReLU 3x3 -> ``Fusion`` calibrated and ``densefuse.fold``-ed: the same
                       code path, whose forward is then the identity (the paper's Algorithm 1)
``+scaleeq-post``      for comparison, the paper's simple form (Fig. 6 left): the explicit affine on
                       the upsampled concat (``ScaleEqualizer.forward``), r^2 times more elements
``conv-relu-up-bn``    Conv 3x3 -> ReLU -> bilinear -> BatchNorm2d -> cat
``conv-relu-up-gn``    Conv 3x3 -> ReLU -> bilinear -> GroupNorm(32) -> cat
``conv-relu-up-ln``    Conv 3x3 -> ReLU -> bilinear -> GroupNorm(1) (LayerNorm over C, H, W) -> cat
=====================  ==========================================================================

Every pipeline ends in the same single-tensor ``torch.cat`` that ``Fusion.concat`` runs, so the
comparison is of the normalization/equalization alone. The fuse conv after the concat is the same
for all pipelines and is left out, as in the paper's figure.

Timing: ``--warmup`` rounds, then ``--repeats`` rounds; in each round every pipeline runs once, in
an order rotated every round (round-robin), so slow drifts of the machine load hit all of them
alike. Reported: median and IQR of forward, backward and total time, the ratio of medians to the
baseline, and the median (and IQR) of the per-round paired ratio total / baseline total.

The paper used N=16, C=128, 8x upsampling (GPU). Defaults here: N=4, C=128, 16x16 -> 128x128 on the CPU.

    python tools/bench_fusion.py                              # defaults, ~1-2 min on 2 cores
    python tools/bench_fusion.py --batch 16 --size 32 --ratio 8 --repeats 30
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from _common import load_average, machine_line
from torch import Tensor, nn

import densefuse
from densefuse.equalizer import ScaleEqualizer
from densefuse.fusion import Fusion, resize
from densefuse.layers import ConvBNReLU, make_norm

BASELINE = "conv-bn-relu-up"


class SEPipeline(nn.Module):
    """Conv-BN-ReLU branch followed by densefuse's Fusion concat path (resize -> equalize -> cat).

    ``post=True`` is the paper's simple form (Fig. 6, left) for comparison: Fusion in mode ``off`` and a
    separate explicit :class:`ScaleEqualizer` applied to the upsampled concat (``ScaleEqualizer.forward``).
    """

    def __init__(self, channels: int, size: tuple[int, int], mode: str, align_corners: bool = False,
                 post: bool = False) -> None:
        super().__init__()
        self.size = size
        self.branch = ConvBNReLU(channels, channels, 3)
        # fuse is never run here (it is the same for every pipeline); it is what fold() rescales.
        self.fusion = Fusion([channels], fuse=ConvBNReLU(channels, channels, 1), mode="off" if post else mode,
                             align_corners=align_corners)
        self.post = ScaleEqualizer([channels], mode=mode) if post else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.fusion.concat([self.branch(x)], self.size)
        return self.post(y) if self.post is not None else y


class NormAfterUpPipeline(nn.Module):
    """Conv-ReLU-UP-Norm: the naive fix the paper compares against (norm on the upsampled tensor)."""

    def __init__(self, channels: int, size: tuple[int, int], norm: str, align_corners: bool = False) -> None:
        super().__init__()
        self.size = size
        self.align_corners = align_corners
        self.branch = ConvBNReLU(channels, channels, 3, norm=None)  # conv (with bias) -> ReLU
        self.norm = make_norm(norm, channels)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.norm(resize(self.branch(x), self.size, self.align_corners))], dim=1)


def build_pipelines(channels: int, size: tuple[int, int], calib_input: Tensor) -> dict[str, nn.Module]:
    pipes: dict[str, nn.Module] = {
        BASELINE: SEPipeline(channels, size, "off"),
        "+scaleeq-explicit": SEPipeline(channels, size, "explicit"),
        "+scaleeq-fold": SEPipeline(channels, size, "fold"),
        "+scaleeq-post": SEPipeline(channels, size, "explicit", post=True),
        "conv-relu-up-bn": NormAfterUpPipeline(channels, size, "bn"),
        "conv-relu-up-gn": NormAfterUpPipeline(channels, size, "gn"),
        "conv-relu-up-ln": NormAfterUpPipeline(channels, size, "ln"),
    }
    se = ("+scaleeq-explicit", "+scaleeq-fold", "+scaleeq-post")
    for name in se:  # the same branch weights, so the outputs can be checked against each other
        pipes[name].branch.load_state_dict(pipes[BASELINE].branch.state_dict())
        densefuse.calibrate(pipes[name], [calib_input])
    densefuse.fold(pipes["+scaleeq-fold"])
    for p in pipes.values():
        p.train()
    check_pipelines(pipes, calib_input)
    return pipes


@torch.no_grad()
def check_pipelines(pipes: dict[str, nn.Module], x: Tensor) -> None:
    """The SE pipelines compute what they claim: fold's concat == baseline's, pre- == post-upsample affine,
    and the explicit output is standardized (mean 0, std 1 over the calibration input)."""
    out = {k: pipes[k](x) for k in (BASELINE, "+scaleeq-explicit", "+scaleeq-fold", "+scaleeq-post")}
    assert torch.equal(out["+scaleeq-fold"], out[BASELINE]), "folded concat differs from the baseline"
    torch.testing.assert_close(out["+scaleeq-explicit"], out["+scaleeq-post"], rtol=1e-5, atol=1e-5)
    e = out["+scaleeq-explicit"].double()
    assert abs(float(e.mean())) < 1e-3 and abs(float(e.std()) - 1) < 1e-3, (float(e.mean()), float(e.std()))


def time_round(pipe: nn.Module, x: Tensor, grad_out: Tensor) -> tuple[float, float]:
    """One forward + backward; returns (forward seconds, backward seconds)."""
    x.grad = None
    for p in pipe.parameters():
        p.grad = None
    t0 = time.perf_counter()
    out = pipe(x)
    t1 = time.perf_counter()
    out.backward(grad_out)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run(pipes: dict[str, nn.Module], x: Tensor, grad_out: Tensor, warmup: int, repeats: int,
        progress: Callable[[str], None] = lambda s: None) -> pd.DataFrame:
    names = list(pipes)
    rows = []
    for rnd in range(warmup + repeats):
        k = rnd % len(names)
        order = names[k:] + names[:k]
        gc.collect()
        gc.disable()
        try:
            for name in order:
                fwd, bwd = time_round(pipes[name], x, grad_out)
                if rnd >= warmup:
                    rows.append({"round": rnd - warmup, "pipeline": name, "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3,
                                 "total_ms": (fwd + bwd) * 1e3})
        finally:
            gc.enable()
        if (rnd + 1) % 10 == 0:
            progress(f"round {rnd + 1}/{warmup + repeats}")
    return pd.DataFrame(rows)


def summarize(raw: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    wide = raw.pivot(index="round", columns="pipeline", values="total_ms")
    base = wide[BASELINE]
    base_med = float(base.median())
    rows = []
    for name in names:
        g = raw[raw["pipeline"] == name]
        q = {c: np.percentile(g[c], [25, 50, 75]) for c in ("fwd_ms", "bwd_ms", "total_ms")}
        paired = (wide[name] / base).to_numpy()
        pq = np.percentile(paired, [25, 50, 75])
        rows.append(
            {
                "pipeline": name,
                "fwd_ms": q["fwd_ms"][1],
                "bwd_ms": q["bwd_ms"][1],
                "total_ms": q["total_ms"][1],
                "total_iqr_ms": q["total_ms"][2] - q["total_ms"][0],
                "ratio": q["total_ms"][1] / base_med,
                "paired_ratio": pq[1],
                "paired_ratio_iqr": pq[2] - pq[0],
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4, help="N (paper: 16)")
    ap.add_argument("--channels", type=int, default=128, help="C (paper: 128)")
    ap.add_argument("--size", type=int, default=16, help="H = W before upsampling")
    ap.add_argument("--ratio", type=int, default=8, help="upsampling ratio (paper: 8)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed rounds first")
    ap.add_argument("--repeats", type=int, default=60, help="timed rounds (every pipeline once per round)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/bench_fusion"))
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    n, c, h = args.batch, args.channels, args.size
    size = (h * args.ratio, h * args.ratio)
    x = torch.randn(n, c, h, h, requires_grad=True)
    grad_out = torch.randn(n, c, *size)
    with torch.no_grad():
        pipes = build_pipelines(c, size, x.detach())

    print(f"N={n} C={c} {h}x{h} -> {size[0]}x{size[1]} (x{args.ratio}), float32, forward+backward, "
          f"{args.warmup} warmup + {args.repeats} timed rounds, round-robin")
    print(f"machine: {machine_line()}")
    t0 = time.perf_counter()
    raw = run(pipes, x, grad_out, args.warmup, args.repeats, progress=lambda s: print(s, flush=True))
    elapsed = time.perf_counter() - t0
    table = summarize(raw, list(pipes))

    args.out.mkdir(parents=True, exist_ok=True)
    raw.to_csv(args.out / "bench_fusion_raw.csv", index=False)
    table.to_csv(args.out / "bench_fusion.csv", index=False)
    print()
    print(table.to_markdown(index=False, floatfmt=("", ".2f", ".2f", ".2f", ".2f", ".3f", ".3f", ".3f")))
    print()
    print(f"load average after: {load_average()}; {elapsed:.0f} s; "
          f"wrote {args.out / 'bench_fusion.csv'} (+ _raw.csv)")
    return table


if __name__ == "__main__":
    main()
