"""The CPU kernels behind three speed-ups, each timed against the formulation it replaced, in one run.

* ``optimizer``: one ``step()`` of AdamW and SGD (momentum, weight decay) over the parameters of a timm
  model with random gradients, in torch's three implementations: ``for-loop`` (torch's default on the
  CPU, what mmseg gets), ``foreach`` and ``fused`` (densefuse's ``optim.impl: auto`` on the CPU).
* ``photometric``: mmseg's PhotoMetricDistortion on the worker, per 512x512 crop: the hue shift as
  densefuse writes it (arithmetic only) against the same hexcone formula with a boolean ``where`` for
  the branch and ``remainder`` for the period (the formulation before), the float -> uint8 cast direct
  and through int32, and the whole distortion (every op with probability 0.5, as in training).
* ``logits``: evaluation's post-processing of 150-class logits: the model's bilinear resize to the input,
  the resize to the label size and the per-pixel argmax, in contiguous (NCHW) and channels-last memory.

Each line is the median of ``--repeats`` timed calls after one untimed call, on ``--threads`` threads;
the load average is printed before and after.

    python tools/bench_kernels.py --out results/bench_kernels.csv
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average, machine_line  # noqa: E402


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def optimizer_rows(model_name: str, repeats: int) -> list[dict]:
    import timm

    params = list(timm.create_model(model_name).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    rows = []
    for name, make in (("adamw", lambda kw: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, **kw)),
                       ("sgd", lambda kw: torch.optim.SGD(params, lr=1e-4, momentum=0.9, weight_decay=1e-4, **kw))):
        for impl, kw in (("for-loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
            opt = make(kw)
            rows.append({"bench": "optimizer", "case": f"{name} step, {model_name} "
                         f"({sum(p.numel() for p in params) / 1e6:.1f} M params)", "variant": impl,
                         "ms": timed(opt.step, repeats)})
    return rows


def _hue_where_remainder(x: torch.Tensor, sextants: float) -> torch.Tensor:
    """The hexcone hue shift with a boolean ``where`` per branch and ``remainder`` for the period."""
    r, g, b = x[0:1], x[1:2], x[2:3]
    v = torch.maximum(torch.maximum(r, g), b)
    c = v - torch.minimum(torch.minimum(r, g), b)
    inv = c.clamp(min=1e-6).reciprocal()
    h = torch.where(v == b, (r - g) * inv + 4.0, 0.0)
    h = torch.where(v == g, (b - r) * inv + 2.0, h)
    h = torch.where(v == r, (g - b) * inv, h) + sextants
    for i, n in enumerate((5.0, 3.0, 1.0)):
        k = torch.remainder(h + n, 6.0)
        x[i:i + 1] = v - c * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return x


def photometric_rows(size: int, repeats: int) -> list[dict]:
    from densefuse_tasks.seg.pipeline import _to_uint8, hue_shift, photometric_distortion

    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
    x = img.float()
    cache: dict = {}
    hue_ref = _hue_where_remainder(x.clone(), 0.3)
    assert (hue_shift(x.clone(), 0.3, cache) - hue_ref).abs().max() < 1e-3  # the same function
    case = f"{size}x{size} RGB crop"
    gen = torch.Generator()

    def distortion() -> None:
        for seed in range(16):  # 16 coin draws per call: the average over the ops' combinations
            photometric_distortion(img, gen.manual_seed(seed), cache=cache)

    return [
        {"bench": "photometric", "case": f"hue shift, {case}", "variant": "where + remainder (before)",
         "ms": timed(lambda: _hue_where_remainder(x.clone(), 0.3), repeats)},
        {"bench": "photometric", "case": f"hue shift, {case}", "variant": "arithmetic only (densefuse)",
         "ms": timed(lambda: hue_shift(x.clone(), 0.3, cache), repeats)},
        {"bench": "photometric", "case": f"float -> uint8, {case}", "variant": "direct (before)",
         "ms": timed(lambda: x.to(torch.uint8), repeats)},
        {"bench": "photometric", "case": f"float -> uint8, {case}", "variant": "through int32 (densefuse)",
         "ms": timed(lambda: _to_uint8(x, cache), repeats)},
        {"bench": "photometric", "case": f"whole distortion, {case}, mean over 16 draws", "variant": "densefuse",
         "ms": timed(distortion, max(3, repeats // 8)) / 16},
    ]


def logits_rows(classes: int, feat: tuple[int, int], image: tuple[int, int], label: tuple[int, int],
                repeats: int) -> list[dict]:
    y = torch.randn(1, classes, *feat)

    def post(fmt: torch.memory_format) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            up = F.interpolate(y.contiguous(memory_format=fmt), size=image, mode="bilinear", align_corners=False)
            return F.interpolate(up, size=label, mode="bilinear", align_corners=False).argmax(1)
        return run

    nchw, cl = post(torch.contiguous_format), post(torch.channels_last)
    agree = float((nchw() == cl()).float().mean())
    case = f"{classes} classes, {feat[0]}x{feat[1]} -> {image[0]}x{image[1]} -> {label[0]}x{label[1]} + argmax"
    return [{"bench": "logits", "case": case, "variant": "NCHW (before)", "ms": timed(nchw, repeats)},
            {"bench": "logits", "case": case, "variant": f"channels-last (densefuse; labels agree {agree:.6f})",
             "ms": timed(cl, repeats)}]


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--model", default="resnet18", help="timm model whose parameters the optimizers update")
    ap.add_argument("--crop", type=int, default=512, help="photometric crop side")
    ap.add_argument("--only", choices=("optimizer", "photometric", "logits"), action="append",
                    help="run only these benches (repeatable)")
    ap.add_argument("--out", default="results/bench_kernels.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    only = set(args.only or ("optimizer", "photometric", "logits"))
    rows = []
    if "optimizer" in only:
        rows += optimizer_rows(args.model, args.repeats)
    if "photometric" in only:
        rows += photometric_rows(args.crop, args.repeats)
    if "logits" in only:
        rows += logits_rows(150, (32, 43), (128, 170), (256, 339), args.repeats)
    table = pd.DataFrame(rows)
    first = table.groupby(["bench", "case"], sort=False)["ms"].transform("first")
    table["vs first line"] = first / table["ms"]
    print(machine_line())
    print(f"load average before {load_before}, after {load_average()}")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    print(f"wrote {out}")
    return table


if __name__ == "__main__":
    main()
