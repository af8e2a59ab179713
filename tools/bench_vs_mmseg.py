"""densefuse vs MMSegmentation 1.2.2 on the same paper rows: training step, training with data, inference.

For each row (PSPNet R50-D8, UPerNet Swin-T, UPerNet ConvNeXt-T), the mmseg side (``--mmseg-python``, a
venv with mmsegmentation 1.2.2, mmengine, mmcv-lite and mmpretrain; mmseg is never a densefuse dependency)
builds the segmentor from mmseg's own config with random initialisation (SyncBN -> BN, no pretrained
weights, 150 classes) and saves it; densefuse loads that checkpoint with
:func:`densefuse.convert.load_mmseg_segmentor` (equalizer off: mmseg has none), so both run identical
weights. Every measurement then runs in a fresh process per side, and the sides alternate within each
round (the order flips every round), so a machine whose load changes slows both alike:

* ``step``: one optimizer step of the row's recipe (SGD for ResNet rows, AdamW with the row's param-wise
  rules otherwise) on one fixed batch, data excluded: densefuse's :class:`~densefuse.engine.step.TrainStep`
  on a normalized batch, mmseg's ``model.train_step`` (its data preprocessor included) with the row's
  ``optim_wrapper`` (``AmpOptimWrapper`` -> ``OptimWrapper``: float32 on the CPU on both sides);
* ``step+data``: the same with each library's own training data path in the loop, in the main process
  (``num_workers`` 0) on the same ADE20K-layout files: densefuse's ADE20K reader, per-sample mmseg
  geometry and the batched photometric distortion and normalization of ``data.pipeline: mmseg``; mmseg's
  dataloader with the row's ``train_pipeline``;
* ``whole`` / ``slide`` / ``flip``: images per second of each library's test path (file decode, test
  Resize keeping the ratio, the model, logits resized to the label's size; slide windows of the crop size
  with stride 2/3 of it; flip TTA merged by softmax averaging, mmseg's ``SegTTAModel``), batch 1, and the
  fraction of pixels on which the two predicted label maps agree;
* peak RSS of the process after inference and after training.

The crop is ``--size`` (default 256), the training RandomResize scale and the test Resize scale are
(4 x size, size) (the rows' (2048, 512) scaled with the crop). Times are per iteration / per image after
``--warmup`` iterations; the tables give the median and IQR over all rounds' iterations, wall and process
CPU time, and the ratio densefuse / mmseg of the medians (< 1: densefuse is faster).

    python tools/bench_vs_mmseg.py --mmseg-python /path/to/mmseg-venv/bin/python --rounds 3
    python tools/bench_vs_mmseg.py --densefuse-only --size 64 --iters 2 --images 1   # no mmseg, tiny

Prints a Markdown table and writes ``results/bench_vs_mmseg.csv`` (summary) and ``.runs.csv`` (per round).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_average  # noqa: E402
from check_mmseg_parity import ROWS as PARITY_ROWS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROWS = ("PSPNet R50-D8", "UPerNet Swin-T", "UPerNet ConvNeXt-T")
MODES = ("whole", "slide", "flip")
NUM_CLASSES = 150

MMSEG_SIDE = r'''
import json, os, resource, sys, time, types
class _Stub(types.ModuleType):  # mmseg.utils imports mmcv.ops (compiled, absent in mmcv-lite); unused here
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None
sys.modules["mmcv.ops"] = _Stub("mmcv.ops")
spec = json.loads(sys.argv[1])
import cv2
cv2.setNumThreads(0)
import numpy as np
import torch
torch.set_num_threads(spec["threads"])
import mmseg
from mmengine.config import Config, ConfigDict
from mmengine.dataset import pseudo_collate
from mmengine.optim import build_optim_wrapper
from mmengine.runner import Runner
from mmcv.transforms import Compose
from mmseg.models import SegTTAModel
from mmseg.registry import MODELS
from mmseg.utils import register_all_modules
register_all_modules()
cfg = Config.fromfile(os.path.join(os.path.dirname(mmseg.__file__), ".mim", "configs", spec["config"]))
s, root = spec["size"], spec["root"]

def plain(obj):
    """SyncBN -> BN, no pretrained weights anywhere."""
    if isinstance(obj, dict):
        return {k: (None if k in ("pretrained", "init_cfg") else plain("BN" if (k == "type" and v == "SyncBN") else v))
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj

m = plain(cfg.model.to_dict())
m["data_preprocessor"]["size"] = (s, s)
for head in ("decode_head", "auxiliary_head"):
    if m.get(head):
        m[head]["num_classes"] = spec["num_classes"]
torch.manual_seed(spec["seed"])
model = MODELS.build(m)
if spec["make"]:
    model.init_weights()
    torch.save({"meta": {"mmseg": mmseg.__version__, "config": spec["config"]}, "state_dict": model.state_dict()},
               spec["make"])
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))
    sys.exit(0)
model.load_state_dict(torch.load(spec["weights"], weights_only=True)["state_dict"])
scale = (4 * s, s)
out = {"infer": {}, "preds": {}}

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

# ---- inference: the test pipeline (decode, keep-ratio Resize, labels), model.test_step / SegTTAModel
test_pipe = Compose([dict(type="LoadImageFromFile"), dict(type="Resize", scale=scale, keep_ratio=True),
                     dict(type="LoadAnnotations", reduce_zero_label=True), dict(type="PackSegInputs")])
tta_pipe = Compose([dict(type="LoadImageFromFile"), dict(type="TestTimeAug", transforms=[
    [dict(type="Resize", scale=scale, keep_ratio=True)],
    [dict(type="RandomFlip", prob=0.0, direction="horizontal"), dict(type="RandomFlip", prob=1.0, direction="horizontal")],
    [dict(type="LoadAnnotations", reduce_zero_label=True)], [dict(type="PackSegInputs")]])])
model.eval()
stride = max(1, 2 * s // 3)
for mode in spec["modes"]:
    if mode == "slide":
        model.test_cfg = ConfigDict(mode="slide", crop_size=(s, s), stride=(stride, stride))
    else:
        model.test_cfg = ConfigDict(mode="whole")
    runner = SegTTAModel(module=model) if mode == "flip" else model
    pipe = tta_pipe if mode == "flip" else test_pipe
    walls, cpus, preds = [], [], []
    for k, (img, lab) in enumerate(spec["images"]):
        t, c = time.perf_counter(), time.process_time()
        with torch.no_grad():
            res = runner.test_step(pseudo_collate([pipe(dict(img_path=img, seg_map_path=lab, reduce_zero_label=True,
                                                             seg_fields=[]))]))
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
        preds.append(res[0].pred_sem_seg.data[0].to(torch.uint8).numpy())
    out["infer"][mode] = {"wall": walls, "cpu": cpus}
    if spec["preds"]:
        np.savez_compressed(f"{spec['preds']}_{mode}.npz", *preds)
out["rss_infer_mb"] = rss()

# ---- training: the row's optim_wrapper (AMP wrapper -> plain: float32 on the CPU), model.train_step
ow_cfg = cfg.optim_wrapper.to_dict()
if ow_cfg.get("type") == "AmpOptimWrapper":
    ow_cfg["type"] = "OptimWrapper"
    ow_cfg.pop("loss_scale", None)
model.train()
optim_wrapper = build_optim_wrapper(model, ow_cfg)
dl = cfg.train_dataloader.to_dict()
dl.update(batch_size=spec["batch"], num_workers=0, persistent_workers=False)
pipeline = []
for t in dl["dataset"]["pipeline"]:
    t = dict(t)
    if t["type"] == "RandomResize":
        t["scale"] = scale
    if t["type"] == "RandomCrop":
        t["crop_size"] = (s, s)
    pipeline.append(t)
dl["dataset"].update(data_root=root, pipeline=pipeline)
loader = Runner.build_dataloader(dl, seed=spec["seed"])
it = iter(loader)
fixed = next(it)

def timed(get, n):
    walls, cpus = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        model.train_step(get(), optim_wrapper)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"wall": walls, "cpu": cpus}

out["step"] = timed(lambda: fixed, spec["iters"] + spec["warmup"])
out["step+data"] = timed(lambda: next(it), spec["iters"] + spec["warmup"])
out["rss_peak_mb"] = rss()
print(json.dumps(out))
'''


def make_tree(root: Path, n: int, size: int, seed: int = 0) -> list[tuple[str, str]]:
    """An ADE20K-layout tree (``images/{training,validation}``, ``annotations/...``) of ``n`` jpg/png pairs
    per split, ADE20K-like aspect ratios with the short side about ``2 * size``, 150 classes in blocks (0
    = "other", ignored); returns the validation (image, label) paths."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shapes = [(4, 5.3), (5.3, 4), (4, 4), (3, 4), (4, 6)]
    val = []
    for split in ("training", "validation"):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            fh, fw = shapes[i % len(shapes)]
            h, w = int(fh * size / 2), int(fw * size / 2)
            img = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)[:h, :w]
            img = (img.astype(np.int16) + rng.integers(-20, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
            b = max(4, size // 8)
            lab = rng.integers(0, 151, (h // b + 1, w // b + 1), dtype=np.uint8).repeat(b, 0).repeat(b, 1)[:h, :w]
            name = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
            Image.fromarray(img).save(root / "images" / split / f"{name}.jpg", quality=90)
            Image.fromarray(lab).save(root / "annotations" / split / f"{name}.png")
            if split == "validation":
                val.append((str(root / "images" / split / f"{name}.jpg"),
                            str(root / "annotations" / split / f"{name}.png")))
    return val


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn: Callable[[], Any], n: int) -> dict[str, list[float]]:
    walls, cpus = [], []
    for _ in range(n):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return {"wall": walls, "cpu": cpus}


def densefuse_config(spec: dict[str, Any], mode: str = "whole") -> Any:
    """The row's paper config at the benchmark's sizes (equalizer off, no pretrained file, CPU, float32)."""
    from densefuse.config import load_config

    s = spec["size"]
    stride = max(1, 2 * s // 3)
    overrides = ["model.encoder.pretrained=null", "model.equalizer.mode=off", f"model.num_classes={NUM_CLASSES}",
                 f"data.root={spec['root']}", f"data.crop_size=[{s},{s}]", f"data.scale=[{4 * s},{s}]",
                 f"data.test_scale=[{4 * s},{s}]", "data.num_workers=0", f"train.batch_size={spec['batch']}",
                 "train.amp=off", "train.compile=false", "device=cpu", f"seed={spec['seed']}",
                 f"eval.mode={'slide' if mode == 'slide' else 'whole'}", f"eval.tta.flip={str(mode == 'flip').lower()}"]
    if mode == "slide":
        overrides += [f"eval.crop_size=[{s},{s}]", f"eval.stride=[{stride},{stride}]"]
    path = ROOT / "configs" / "seg" / "paper" / f"{spec['densefuse_config']}.yaml"
    return load_config(str(path), overrides + list(spec.get("overrides", [])))


def densefuse_side(spec: dict[str, Any]) -> dict[str, Any]:
    """The densefuse measurements of one row in this process (see the module docstring)."""
    import numpy as np
    import torch

    from densefuse.convert import load_mmseg_segmentor
    from densefuse.data.loader import build_loader
    from densefuse.engine.evaluate import infer_outputs
    from densefuse.engine.optim import build_optimizer, build_scheduler
    from densefuse.engine.runtime import seed_everything, to_device
    from densefuse.engine.step import TrainStep
    from densefuse.tasks import get_task

    torch.set_num_threads(spec["threads"])
    cfg = densefuse_config(spec)
    seed_everything(spec["seed"])
    task = get_task("seg", cfg)
    model = task.build_model(cfg)
    if spec["weights"]:
        load_mmseg_segmentor(model, spec["weights"])
    dev = torch.device("cpu")
    out: dict[str, Any] = {"infer": {}}
    model.eval()
    for mode in spec["modes"]:
        mcfg = densefuse_config(spec, mode)
        mtask = get_task("seg", mcfg)
        val = mtask.build_dataset(mcfg, mcfg["data"]["val_split"])
        tf = mtask.build_transform(mcfg, train=False)
        batches = iter(build_loader(val, 1, train=False, num_workers=0))
        preds: list[np.ndarray] = []

        def one(tf: Any = tf, batches: Any = batches, mtask: Any = mtask, preds: list = preds) -> None:
            with torch.no_grad():
                batch = tf(to_device(next(batches), dev))
                preds.append(infer_outputs(model, mtask, batch)["out"].argmax(1)[0].to(torch.uint8).numpy())

        out["infer"][mode] = _timed(one, min(len(val), len(spec["images"])))
        if spec["preds"]:
            np.savez_compressed(f"{spec['preds']}_{mode}.npz", *preds)
    out["rss_infer_mb"] = _rss_mb()

    model.train()
    n = spec["iters"] + spec["warmup"]
    optimizer = build_optimizer(model, cfg["optim"])
    scheduler = build_scheduler(optimizer, cfg["schedule"], 2 * n + 1)
    tc = cfg["train"]
    step = TrainStep(model, task, optimizer, scheduler, dev, tc["amp"], tc["grad_clip"], tc["channels_last"])
    train_set = task.build_dataset(cfg, cfg["data"]["train_split"])
    train_tf = task.build_transform(cfg, train=True)
    batches = iter(build_loader(train_set, tc["batch_size"], train=True, num_workers=0, seed=cfg["seed"]))
    fixed = train_tf(to_device(next(batches), dev))
    counter = iter(range(10**9))
    out["step"] = _timed(lambda: step([fixed], next(counter)), n)
    out["step+data"] = _timed(lambda: step([train_tf(to_device(next(batches), dev))], next(counter)), n)
    out["rss_peak_mb"] = _rss_mb()
    return out


def run_side(side: str, spec: dict[str, Any], mmseg_python: Optional[str]) -> dict[str, Any]:
    """One side's measurements in a fresh process (so its peak RSS is its own)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
    if side == "mmseg":
        cmd = [str(mmseg_python), "-c", MMSEG_SIDE, json.dumps(spec)]
        cwd = tempfile.gettempdir()
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        cwd = str(ROOT)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    if res.returncode != 0:
        raise SystemExit(f"error: the {side} side failed on {spec['row']}:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def agreement(a_prefix: str, b_prefix: str, mode: str) -> float:
    """Fraction of pixels where the two sides' saved label maps of ``mode`` agree (all images)."""
    import numpy as np

    a, b = np.load(f"{a_prefix}_{mode}.npz"), np.load(f"{b_prefix}_{mode}.npz")
    same = total = 0
    for k in a.files:
        x, y = a[k], b[k]
        if x.shape != y.shape:
            return float("nan")
        same += int((x == y).sum())
        total += x.size
    return same / max(total, 1)


def _q(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.quantile(values, q))


def summarize(runs: list[dict[str, Any]], sides: list[str]) -> Any:
    """Per (row, measure, side): the median (s/iter, img/s or MiB) and IQR over all rounds' samples and the
    median process CPU seconds; ``ratio``: densefuse's advantage over mmseg from the wall medians (mmseg
    time / densefuse time, or mmseg RSS / densefuse RSS: >= 1 means densefuse is faster or smaller),
    ``cpu_ratio`` the same from CPU time, and the label agreement of the two sides' predictions."""
    import pandas as pd

    df = pd.DataFrame(runs)
    rows = []
    for (row, measure), g in df.groupby(["row", "measure"], sort=False):
        unit = g["unit"].iloc[0]
        rec: dict[str, Any] = {"row": row, "measure": measure, "unit": unit}
        med: dict[str, float] = {}
        cpu: dict[str, float] = {}
        for side in sides:
            walls = [v for lst in g[g.side == side]["wall"] for v in lst]
            if not walls:
                continue
            med[side] = statistics.median(walls)
            cpu[side] = statistics.median([v for lst in g[g.side == side]["cpu"] for v in lst])
            lo, hi = _q(walls, 0.25), _q(walls, 0.75)
            if unit == "img/s":
                rec[side], rec[f"{side}_iqr"] = 1.0 / med[side], f"{1 / hi:.3g}-{1 / lo:.3g}"
            else:
                rec[side], rec[f"{side}_iqr"] = med[side], f"{lo:.3g}-{hi:.3g}"
            rec[f"{side}_cpu_s"] = cpu[side] if unit != "MiB" else float("nan")
            rec[f"{side}_n"] = len(walls)
        if len(med) == 2:
            rec["ratio"] = med["mmseg"] / med["densefuse"]
            rec["cpu_ratio"] = cpu["mmseg"] / cpu["densefuse"] if unit != "MiB" and cpu["densefuse"] else float("nan")
        if "agreement" in g:
            vals = g["agreement"].dropna()
            rec["label_agreement"] = float(vals.iloc[0]) if len(vals) else float("nan")
        rows.append(rec)
    return pd.DataFrame(rows)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mmseg-python", help="python of a venv with mmsegmentation 1.2.2 (and mmpretrain for ConvNeXt)")
    p.add_argument("--densefuse-only", action="store_true", help="measure densefuse alone (random init, no mmseg)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated subset of: {', '.join(DEFAULT_ROWS)}")
    p.add_argument("--size", type=int, default=256, help="training crop and slide window (square)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--iters", type=int, default=4, help="timed iterations per round and side")
    p.add_argument("--warmup", type=int, default=1, help="iterations per round left out of the statistics")
    p.add_argument("--images", type=int, default=3, help="validation (and training) images")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of both sides")
    p.add_argument("--modes", default=",".join(MODES), help="inference modes: whole, slide, flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="extra densefuse config override (densefuse-only runs, e.g. to shrink a model)")
    p.add_argument("--out", type=Path, default=Path("results/bench_vs_mmseg.csv"))
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(densefuse_side(json.loads(args.worker))))
        return 0
    if not args.densefuse_only and not args.mmseg_python:
        p.error("give --mmseg-python (a venv with mmsegmentation 1.2.2) or --densefuse-only")
    if args.overrides and not args.densefuse_only:
        p.error("--set changes only the densefuse model; use it with --densefuse-only")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in PARITY_ROWS]
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {', '.join(PARITY_ROWS)}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    sides = ["densefuse"] if args.densefuse_only else ["densefuse", "mmseg"]
    import pandas as pd

    load_before = load_average()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ADEChallengeData2016"
        images = make_tree(root, args.images, args.size, args.seed)
        for ri, row in enumerate(rows):
            mm_cfg, df_cfg = PARITY_ROWS[row]
            base = {"row": row, "config": mm_cfg, "densefuse_config": df_cfg, "root": str(root), "size": args.size,
                    "batch": args.batch, "iters": args.iters, "warmup": args.warmup, "images": images,
                    "threads": args.threads, "modes": modes, "seed": args.seed, "num_classes": NUM_CLASSES,
                    "weights": None, "make": None, "overrides": args.overrides}
            if not args.densefuse_only:
                base["weights"] = str(Path(tmp) / f"row{ri}.pth")
                run_side("mmseg", {**base, "make": base["weights"], "preds": None}, args.mmseg_python)
            for r in range(args.rounds):
                order = sides if r % 2 == 0 else sides[::-1]
                for side in order:
                    preds = str(Path(tmp) / f"row{ri}_{side}") if r == 0 else None
                    res = run_side(side, {**base, "preds": preds}, args.mmseg_python)
                    w = args.warmup
                    for measure in ("step", "step+data"):
                        runs.append({"row": row, "measure": measure, "unit": "s/iter", "side": side, "round": r,
                                     "wall": res[measure]["wall"][w:], "cpu": res[measure]["cpu"][w:]})
                    for mode in modes:
                        # the first image of each mode warms up (allocations, the slide window shapes)
                        wall, cpu = res["infer"][mode]["wall"], res["infer"][mode]["cpu"]
                        keep = slice(1, None) if len(wall) > 1 else slice(None)
                        runs.append({"row": row, "measure": f"infer {mode}", "unit": "img/s", "side": side,
                                     "round": r, "wall": wall[keep], "cpu": cpu[keep]})
                    for key, name in (("rss_infer_mb", "peak RSS after inference"), ("rss_peak_mb", "peak RSS")):
                        runs.append({"row": row, "measure": name, "unit": "MiB", "side": side, "round": r,
                                     "wall": [res[key]], "cpu": [0.0]})
            if not args.densefuse_only:
                for rec in runs:
                    if rec["row"] == row and rec["measure"].startswith("infer ") and rec["round"] == 0:
                        rec["agreement"] = agreement(str(Path(tmp) / f"row{ri}_densefuse"),
                                                     str(Path(tmp) / f"row{ri}_mmseg"), rec["measure"][6:])
    load_after = load_average()
    table = summarize(runs, sides)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False)
    pd.DataFrame(runs).to_csv(args.out.with_suffix(".runs.csv"), index=False)
    print(f"# densefuse{'' if args.densefuse_only else ' vs mmseg 1.2.2'}, CPU, {args.threads} thread(s) per side, "
          f"crop {args.size}x{args.size}, batch {args.batch}, {args.rounds} rounds x {args.iters} iters, "
          f"{args.images} images; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; load "
          f"before {load_before}, after {load_after}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(table.to_markdown(index=False, floatfmt=".3g"))
    print(f"\nCSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
