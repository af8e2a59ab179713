"""What the safety checks cost: the free space a checkpoint save needs, and the rate of a full data check.

* ``save``: the default seg model (UPerNet on ResNet-18, equalizers) with an AdamW state after one step is
  saved through :class:`densefuse.engine.state.Checkpointer` (``keep_last`` 1) into a fresh folder twice;
  the peak extra space during the second save (the old files stay until the new ones are complete) is
  measured by sampling the folder's size while the save runs, and compared with the file's size.
* ``check``: an ADE20K-layout tree of ``--images`` random 512x512 JPEG/PNG pairs is read in full by
  :func:`densefuse.data.check.check_dataset` with ``--threads`` threads; the rate gives the estimate for
  ADE20K's 25,574 pairs (20,210 training + 2,000 validation + 3,352 test images are not read; 22,210).

    python tools/measure_checks.py --images 200 --threads 2

Prints a Markdown table and writes ``results/measure_checks.csv``.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import machine_line
from PIL import Image

ADE_PAIRS = 22210  # training + validation pairs a training run reads


def folder_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def measure_save() -> list[dict]:
    import densefuse
    from densefuse.engine.optim import build_optimizer
    from densefuse.engine.state import Checkpointer
    from densefuse.tasks import get_task

    cfg = densefuse.load_config(None, task_default=get_task("seg").default_config)
    model = get_task("seg", cfg).build_model(cfg)
    opt = build_optimizer(model, cfg["optim"])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "iter": 1, "config": cfg.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        ck = Checkpointer(d, keep_last=1)
        ck.save(state, 1)
        before = folder_bytes(d)
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                with contextlib.suppress(FileNotFoundError):  # a temp file renamed while listed
                    peak.append(folder_bytes(d))
                time.sleep(0.002)

        t = threading.Thread(target=sample)
        t.start()
        t0 = time.perf_counter()
        ck.save(state, 2)
        seconds = time.perf_counter() - t0
        done.set()
        t.join()
        size = (d / "latest.pth").stat().st_size
        return [{"what": "checkpoint save", "file_MB": size / 2**20, "steady_MB": folder_bytes(d) / 2**20,
                 "peak_extra_MB": (max(peak) - before) / 2**20, "seconds": seconds}]


def measure_check(images: int, threads: int) -> list[dict]:
    from densefuse_tasks.seg.datasets import ADE20K

    from densefuse.data.check import check_dataset

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images" / "training").mkdir(parents=True)
        (root / "annotations" / "training").mkdir(parents=True)
        for i in range(images):
            img = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
            Image.fromarray(img).save(root / "images" / "training" / f"ADE_train_{i:08d}.jpg", quality=90)
            lab = rng.integers(0, 151, (512, 512), dtype=np.uint8)
            Image.fromarray(lab, mode="L").save(root / "annotations" / "training" / f"ADE_train_{i:08d}.png")
        ds = ADE20K(root, "train")
        report = check_dataset(ds, "ade20k train", threads)
        rate = report.size / report.seconds
        return [{"what": f"check-data, {images} 512x512 ADE20K pairs, {threads} threads", "samples_per_s": rate,
                 "seconds": report.seconds, "ade20k_estimate_min": ADE_PAIRS / rate / 60}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("results/measure_checks.csv"))
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = measure_save() + measure_check(args.images, args.threads)
    df = pd.DataFrame(rows)
    print(machine_line())
    print(df.to_markdown(index=False, floatfmt=".2f"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out, index=False)
    return None


if __name__ == "__main__":
    sys.exit(main())
