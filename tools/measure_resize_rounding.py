"""How far densefuse's test-time Resize is from mmseg's: PyTorch's uint8 bilinear kernel against cv2's
INTER_LINEAR (what mmcv.imresize runs), at the keep-ratio sizes of the paper's test pipeline.

The cv2 side runs in another Python (``--cv2-python``, e.g. the venv of ``tools/check_mmseg_parity.py``;
cv2 is not a densefuse dependency). Images: uniform noise (the worst case for rounding), a smooth
gradient and a blocky picture with sharp edges, each at VOC/ADE20K-like sizes, resized with the test scale
(2048, 512) keeping the ratio. Prints a table and writes CSV::

    python tools/measure_resize_rounding.py --cv2-python /path/to/mmseg-venv/bin/python --out resize.csv
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

CV2_SIDE = r'''
import sys
import cv2
import numpy as np
data = np.load(sys.argv[1])
out = {}
for key in data.files:
    if key.startswith("img_"):
        h, w = data["size_" + key[4:]]
        out[key] = cv2.resize(data[key], (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
np.savez(sys.argv[2], **out)
print(cv2.__version__)
'''

SIZES = [(375, 500), (500, 375), (333, 500), (512, 683), (480, 640), (281, 500)]


def _images(h: int, w: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)), (xx + yy) % 256], -1)
    blocks = np.kron(g.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
    return {"noise": g.integers(0, 256, (h, w, 3)).astype(np.uint8), "gradient": smooth.astype(np.uint8),
            "blocks": blocks.astype(np.uint8)}


def main() -> None:
    from densefuse_tasks.seg.pipeline import keep_ratio_size

    from densefuse.data.ops import resize_tensor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cv2-python", required=True, help="a python with opencv (cv2)")
    p.add_argument("--scale", type=int, nargs=2, default=[2048, 512], help="test Resize scale (long, short)")
    p.add_argument("--out", type=Path, default=Path("resize_rounding.csv"))
    args = p.parse_args()
    arrays: dict[str, np.ndarray] = {}
    rows = []
    for i, (h, w) in enumerate(SIZES):
        size = keep_ratio_size(h, w, args.scale)
        for kind, img in _images(h, w, i).items():
            key = f"{h}x{w}_{kind}"
            arrays[f"img_{key}"], arrays[f"size_{key}"] = img, np.array(size)
            rows.append((key, (h, w), size, kind, img))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, **arrays)
        res = subprocess.run([args.cv2_python, "-c", CV2_SIDE, str(src), str(dst)], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"error: the cv2 side failed: {res.stderr.strip().splitlines()[-1]}")
        theirs = dict(np.load(dst))
    table = []
    for key, (h, w), size, kind, img in rows:
        ours = resize_tensor(torch.from_numpy(img).permute(2, 0, 1), size, "bilinear", "cv2").permute(1, 2, 0).numpy()
        diff = np.abs(ours.astype(np.int16) - theirs[f"img_{key}"].astype(np.int16))
        table.append({"image": f"{h}x{w}", "resized": f"{size[0]}x{size[1]}", "content": kind,
                      "max_abs_diff": int(diff.max()), "mean_abs_diff": round(float(diff.mean()), 4),
                      "values_differing_pct": round(100.0 * float((diff > 0).mean()), 2)})
    frame = pd.DataFrame(table)
    print(f"cv2 {res.stdout.strip()}, torch {torch.__version__}")
    print(frame.to_markdown(index=False))
    frame.to_csv(args.out, index=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
