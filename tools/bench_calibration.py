"""Calibration passes and time per decode head, and what folding changes end to end.

Table 1 (``calibration.csv``): densefuse UPerNet, PSPNet and DeepLabV3+ heads on a timm ResNet-18
(random init), ``--images`` synthetic training images of ``--size`` x ``--size`` in batches of
``--batch``: the number of calibration passes (one per level of the fusion-site graph), the time of
``densefuse.calibrate`` and of one plain forward pass over the same images (equalizers off, train-mode BN, no grad),
and their ratio.

Table 2 (``fold.csv``): each model calibrated, then compared in eval mode with a folded copy (the
paper's Algorithm 1) on ``--eval-images`` fresh images at several input sizes: the largest difference
of any fusion conv's output relative to its largest value (only at the zero-padded border; interior
exact), argmax agreement of the whole model, the largest relative difference of its logits, and the
border width beyond which the logits agree to 1e-4 (relative).

    python tools/bench_calibration.py                  # 32 images of 128x128, batch 4
    python tools/bench_calibration.py --channels 512 --images 64
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from _common import machine_line

import densefuse
from densefuse.data.loader import build_loader
from densefuse.equalizer import border_offset
from densefuse.fusion import Fusion

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "seg" / "synthetic_upernet_r18.yaml"


def head_spec(head: str, channels: int) -> dict[str, Any]:
    """The decode head of each architecture (resnet18 levels: 64, 128, 256, 512 channels)."""
    if head == "UPerNet":
        return {"type": "uper", "in_index": [0, 1, 2, 3], "channels": channels, "pool_scales": [1, 2, 3, 6]}
    if head == "PSPNet":
        return {"type": "psp", "in_index": 3, "channels": channels, "pool_scales": [1, 2, 3, 6]}
    if head == "DeepLabV3+":
        return {"type": "sep_aspp", "in_index": 3, "channels": channels, "dilations": [1, 12, 24, 36],
                "c1_in_channels": 64, "c1_channels": 48}
    raise SystemExit(f"error: unknown head {head}")


def build(head: str, channels: int, size: int, seed: int) -> tuple[Any, torch.nn.Module]:
    cfg = densefuse.load_config(CONFIG, overrides=[f"data.crop_size=[{size},{size}]", f"data.kwargs.size=[{size},{size}]"])
    cfg["model"]["decode_head"] = head_spec(head, channels)
    torch.manual_seed(seed)
    return cfg, densefuse.build_model(cfg)


def images(cfg: Any, n: int, batch: int, seed: int, split: str = "train") -> list[torch.Tensor]:
    """``n`` normalized synthetic images (the seg task's SyntheticSeg) in batches of ``batch``."""
    task = densefuse.get_task("seg", cfg)
    tf = task.build_transform(cfg, train=False)
    loader = build_loader(task.build_dataset(cfg, split), batch, train=True, num_workers=0, seed=seed)
    out = []
    for b in loader:
        out.append(tf(b)["image"])
        if len(out) * batch >= n:
            return out
    return out


@torch.no_grad()
def plain_pass(model: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    m = copy.deepcopy(model).train()
    densefuse.set_mode(m, "off")  # the baseline forward: nothing to calibrate
    t0 = time.perf_counter()
    for x in batches:
        m(x)
    return time.perf_counter() - t0


@torch.no_grad()
def fold_difference(explicit: torch.nn.Module, folded: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Whole-model and per-site differences between the explicit and the folded model (eval mode)."""
    a, b = explicit(x)["out"], folded(x)["out"]
    rel = (a - b).abs() / a.abs().max()
    h, w = a.shape[-2:]
    margin = next((m for m in range(0, min(h, w) // 2)
                   if rel[..., m:h - m, m:w - m].max() < 1e-4), min(h, w) // 2)
    sites = [f for f in explicit.modules() if isinstance(f, Fusion)]
    convs = [f.fold_target().conv for f in sites]
    outs: dict[int, torch.Tensor] = {}
    hooks = [c.register_forward_hook(lambda _m, _a, y, k=k: outs.__setitem__(k, y)) for k, c in enumerate(convs)]
    explicit(x)
    for h in hooks:
        h.remove()
    site_rel = 0.0
    for k, (f, conv) in enumerate(zip(sites, convs)):
        off = border_offset(f.equalizer, conv, outs[k].shape[-2:])
        site_rel = max(site_rel, float(off.abs().max() / outs[k].abs().max()))
    return {
        "site_border_rel_max": site_rel,
        "argmax_agree_%": float((a.argmax(1) == b.argmax(1)).float().mean() * 100),
        "logits_rel_max": float(rel.max()),
        "exact_beyond_px": margin,
    }


def main(argv: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", nargs="+", default=["UPerNet", "PSPNet", "DeepLabV3+"])
    ap.add_argument("--channels", type=int, default=64, help="decode head channels (the default config: 64)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--eval-sizes", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--eval-images", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/bench_calibration"))
    args = ap.parse_args(argv)

    calib_rows, fold_rows = [], []
    for head in args.heads:
        cfg, model = build(head, args.channels, args.size, args.seed)
        batches = images(cfg, args.images, args.batch, args.seed)
        t_plain = plain_pass(model, batches)
        t0 = time.perf_counter()
        table = densefuse.calibrate(model, batches)
        t_cal = time.perf_counter() - t0
        calib_rows.append({
            "head": head, "sites": table["site"].nunique(), "passes": table.attrs["passes"],
            "images": table.attrs["images"], "calibrate_s": t_cal, "one_pass_s": t_plain,
            "calibrate/one_pass": t_cal / t_plain,
        })
        explicit = copy.deepcopy(model).eval()
        folded = densefuse.fold(copy.deepcopy(model)).eval()
        for size in args.eval_sizes:
            ecfg, _ = build(head, args.channels, size, args.seed)
            x = torch.cat(images(ecfg, args.eval_images, args.eval_images, args.seed + 1, split="val"))
            fold_rows.append({"head": head, "size": size, **fold_difference(explicit, folded, x)})
    calib, fold = pd.DataFrame(calib_rows), pd.DataFrame(fold_rows)

    args.out.mkdir(parents=True, exist_ok=True)
    calib.to_csv(args.out / "calibration.csv", index=False)
    fold.to_csv(args.out / "fold.csv", index=False)
    print(f"ResNet-18 + densefuse heads ({args.channels} channels), random init; calibration on {args.images} "
          f"synthetic {args.size}x{args.size} images, batch {args.batch}; {machine_line()}")
    print()
    print(calib.to_markdown(index=False, floatfmt=".2f"))
    print()
    print(f"fold vs explicit, eval mode, {args.eval_images} fresh images per size:")
    print()
    print(fold.to_markdown(index=False, floatfmt=".3g"))
    print()
    print(f"wrote {args.out / 'calibration.csv'} and {args.out / 'fold.csv'}")
    return calib, fold


if __name__ == "__main__":
    main()
