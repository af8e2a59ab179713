"""Evaluation throughput at Cityscapes size: whole-image vs sliding-window inference (densefuse.inference).

A small model (UPerNet on timm ResNet-18, decoder 64 channels, random weights, equalizer off) runs on
``--images`` random 1024x2048 inputs through :func:`densefuse.inference.infer` with:

* ``whole``: one forward pass per image;
* ``slide``: 512x512 windows, stride 341 (mmseg's ConvNeXt setting), ``slide_batch`` 1 (mmseg runs windows
  one at a time) and 8 (densefuse batches them);
* ``whole + flip``: flip TTA (2 views).

    python tools/bench_eval.py --images 2 --threads 2

Prints a Markdown table (seconds per image, images per second, windows per image) and writes
``results/bench_eval.csv``. Rounds alternate between the strategies.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import machine_line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=int, nargs=2, default=[1024, 2048])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/bench_eval.csv"))
    args = p.parse_args(argv)
    import pandas as pd
    import torch

    from densefuse.config import from_dict
    from densefuse.inference import infer, slide_windows
    from densefuse.model import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = from_dict({"model": {"num_classes": 19, "equalizer": {"mode": "off"},
                               "encoder": {"name": "resnet18", "out_indices": [1, 2, 3, 4]},
                               "decode_head": {"type": "uper", "channels": 64, "pool_scales": [1, 2, 3, 6]}}})
    model = build_model(cfg).eval()

    def forward(m, batch):
        return m(batch["image"])

    strategies = {
        "whole": {"mode": "whole"},
        "slide 512/341, 1 window per call": {"mode": "slide", "crop_size": [512, 512], "stride": [341, 341],
                                             "slide_batch": 1},
        "slide 512/341, 8 windows per call": {"mode": "slide", "crop_size": [512, 512], "stride": [341, 341],
                                              "slide_batch": 8},
        "whole + flip TTA": {"mode": "whole", "tta": {"flip": True}},
    }
    h, w = args.size
    n_win = len(slide_windows(h, w, (512, 512), (341, 341)))
    images = [torch.randn(1, 3, h, w) for _ in range(args.images)]
    rows = []
    with torch.no_grad():
        infer(forward, model, {"image": images[0][..., :256, :256]}, {})  # warm-up
        for r in range(args.rounds):
            for name, ecfg in strategies.items():
                t = time.perf_counter()
                for x in images:
                    infer(forward, model, {"image": x}, ecfg)
                dt = time.perf_counter() - t
                rows.append({"strategy": name, "round": r, "images": len(images), "seconds": dt,
                             "windows_per_image": n_win if ecfg["mode"] == "slide" else 1})
    df = pd.DataFrame(rows)
    df["s_per_img"] = df["seconds"] / df["images"]
    summary = df.groupby("strategy", sort=False).agg(s_per_img=("s_per_img", "median"),
                                                      windows_per_image=("windows_per_image", "first"))
    summary["img_per_s"] = 1 / summary["s_per_img"]
    summary["vs_whole"] = summary["s_per_img"] / summary.loc["whole", "s_per_img"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"# eval at {h}x{w}, UPerNet-R18 (64 ch); {machine_line()}")
    print(summary.round(3).to_markdown())
    print(f"\nper-round CSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
