"""CPU data pipeline throughput per process: densefuse's mmseg-faithful pipeline vs MMSegmentation 1.2.2.

Both sides decode the same ADE20K-layout files (``images/training/*.jpg``, ``annotations/training/*.png``)
and run the ADE20K training pipeline per sample in one process and one thread:

* mmseg: LoadImageFromFile, LoadAnnotations(reduce_zero_label), RandomResize((2048, 512), 0.5-2.0, keep
  ratio), RandomCrop(512, cat_max_ratio 0.75), RandomFlip(0.5), PhotoMetricDistortion, PackSegInputs;
* densefuse: the ADE20K reader + ``SegTrainPipeline`` (tasks/seg/pipeline.py) with the photometric distortion
  on the worker, and without it (the configuration where it runs batched on the training device).

Normalization and padding to the batch run after collation on both sides (mmseg's SegDataPreProcessor) and
are left out. The mmseg side runs in its own virtual environment (``--mmseg-python``, e.g.
/path/to/venv/bin/python with mmsegmentation==1.2.2, mmcv-lite, mmengine, opencv); mmseg is never a
densefuse dependency. Without it only densefuse is measured. Rounds alternate between the sides.

    python tools/bench_pipeline.py --mmseg-python /work/venvs/mmseg/bin/python --images 40 --rounds 3

Prints a Markdown table and writes ``results/bench_pipeline.csv``. The files are synthetic (random sizes
around ADE20K's, 150 classes in blocks); ``--root`` measures a real ADE20K tree instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MMSEG_SIDE = r'''
import json, sys, time, types
class _Stub(types.ModuleType):  # mmseg.utils imports mmcv.ops (compiled); the transforms never use it
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None
sys.modules["mmcv.ops"] = _Stub("mmcv.ops")
import cv2
cv2.setNumThreads(0)
import torch
torch.set_num_threads(1)
from mmcv.transforms import Compose, LoadImageFromFile, RandomFlip, RandomResize
from mmseg.datasets.transforms import LoadAnnotations, PackSegInputs, PhotoMetricDistortion, RandomCrop
args = json.loads(sys.argv[1])
pipe = Compose([LoadImageFromFile(), LoadAnnotations(reduce_zero_label=True),
                RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True),
                RandomCrop(crop_size=(512, 512), cat_max_ratio=0.75), RandomFlip(prob=0.5),
                PhotoMetricDistortion(), PackSegInputs()])
pairs = args["pairs"]
for img, lab in pairs[:2]:  # warm-up
    pipe(dict(img_path=img, seg_map_path=lab, reduce_zero_label=True, seg_fields=[]))
t = time.perf_counter()
for img, lab in pairs:
    out = pipe(dict(img_path=img, seg_map_path=lab, reduce_zero_label=True, seg_fields=[]))
print(json.dumps({"seconds": time.perf_counter() - t, "n": len(pairs), "shape": list(out["inputs"].shape)}))
'''


def make_tree(root: Path, n: int, seed: int = 0) -> None:
    """An ADE20K-layout tree of ``n`` jpg images and png labels (sizes and block labels like ADE20K's)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images" / "training").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "training").mkdir(parents=True, exist_ok=True)
    sizes = [(512, 683), (683, 512), (512, 512), (384, 512), (512, 768), (600, 800)]
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        img = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:h, :w]
        img = (img.astype(np.int16) + rng.integers(-20, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
        lab = rng.integers(0, 151, (h // 64 + 1, w // 64 + 1), dtype=np.uint8).repeat(64, 0).repeat(64, 1)[:h, :w]
        name = f"ADE_train_{i:08d}"
        Image.fromarray(img).save(root / "images" / "training" / f"{name}.jpg", quality=90)
        Image.fromarray(lab).save(root / "annotations" / "training" / f"{name}.png")


def run_densefuse(root: Path, photometric: bool) -> dict:
    import torch
    from densefuse_tasks.seg.datasets import ADE20K
    from densefuse_tasks.seg.pipeline import SegTrainPipeline

    torch.set_num_threads(1)
    ds = ADE20K(root, "train", True, SegTrainPipeline((512, 512), (2048, 512), (0.5, 2.0), 0.75, 0.5, photometric))
    for i in range(min(2, len(ds))):
        ds[i]
    t = time.perf_counter()
    for i in range(len(ds)):
        out = ds[i]
    return {"seconds": time.perf_counter() - t, "n": len(ds), "shape": list(out["image"].shape)}


def run_mmseg(python: str, root: Path) -> dict:
    imgs = sorted((root / "images" / "training").glob("*.jpg"))
    pairs = [[str(p), str(root / "annotations" / "training" / (p.stem + ".png"))] for p in imgs]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run([python, "-c", MMSEG_SIDE, json.dumps({"pairs": pairs})], capture_output=True, text=True,
                         env=env, cwd=tempfile.gettempdir())
    if res.returncode != 0:
        raise SystemExit(f"error: the mmseg side failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mmseg-python", help="python of a venv with mmsegmentation 1.2.2 (omit: densefuse only)")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", type=Path, help="an existing ADE20K root instead of synthetic files")
    p.add_argument("--out", type=Path, default=Path("results/bench_pipeline.csv"))
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import pandas as pd

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import load_average, paired_ci

    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "ADEChallengeData2016"
        if args.root is None:
            make_tree(root, args.images)
        sides = {"densefuse (geometry + photometric on the worker)": lambda: run_densefuse(root, True),
                 "densefuse (geometry; photometric batched on device)": lambda: run_densefuse(root, False)}
        if args.mmseg_python:
            sides["mmseg 1.2.2 (same transforms)"] = lambda: run_mmseg(args.mmseg_python, root)
        rows = []
        for r in range(args.rounds):
            for name, fn in sides.items():
                res = fn()
                rows.append({"pipeline": name, "round": r, "images": res["n"], "seconds": res["seconds"],
                             "crop": "x".join(map(str, res["shape"]))})
    df = pd.DataFrame(rows)
    df["img_per_s"] = df["images"] / df["seconds"]
    summary = df.groupby("pipeline", sort=False).agg(img_per_s=("img_per_s", "median"),
                                                      ms_per_img=("seconds", "median"), images=("images", "first"))
    summary["ms_per_img"] = summary["ms_per_img"] / summary["images"] * 1000
    paired = None
    if args.mmseg_python:
        base = summary.loc["mmseg 1.2.2 (same transforms)", "img_per_s"]
        summary["vs_mmseg"] = summary["img_per_s"] / base
        # per round: densefuse img/s / mmseg img/s of the same round (seconds apart), geometric mean + 95 % t
        wide = df.pivot(index="round", columns="pipeline", values="img_per_s")
        paired = pd.DataFrame([{"pipeline": name, **paired_ci((wide[name] / wide["mmseg 1.2.2 (same transforms)"]).to_numpy())}
                               for name in sides if not name.startswith("mmseg")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    print(f"# CPU pipeline, 1 process, 1 thread, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, load average before {load_before}, after {load_average()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(summary.round(3).to_markdown())
    if paired is not None:
        print("\nPer-round ratios to mmseg (geometric mean, 95 % t and bootstrap intervals):")
        print(paired.to_markdown(index=False, floatfmt=".3f"))
        paired.to_csv(args.out.with_suffix(".paired.csv"), index=False)
    print(f"\nper-round CSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
