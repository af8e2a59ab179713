"""Cityscapes ``*_gtFine_labelIds.png`` -> ``*_gtFine_labelTrainIds.png`` (19 classes, void = 255), in parallel.

mmseg's converter draws the polygons of ``*_gtFine_polygons.json`` with cityscapesscripts' ``json2labelImg``
(trainIds). The ``labelIds`` PNGs that ship with gtFine hold the same polygons drawn with label ids; mapping
them through the official label table (:data:`LABEL_TO_TRAIN`) gives the train-id image without the
cityscapesscripts dependency. Ids without a train id (void, ego vehicle, parking, ..., license plate) -> 255.

    python tools/convert_cityscapes.py data/cityscapes --nproc 8
    python tools/convert_cityscapes.py data/cityscapes --splits train val --overwrite

Expected tree: ``<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png`` (and ``leftImg8bit/`` alongside).
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
from _common import parallel_errors
from PIL import Image

#: Cityscapes label id -> train id (cityscapesscripts ``helpers/labels.py``); every other value -> 255.
LABEL_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
LUT = np.full(256, 255, dtype=np.uint8)
for _id, _train in LABEL_TO_TRAIN.items():
    LUT[_id] = _train

SUFFIX = "_gtFine_labelIds.png"
OUT_SUFFIX = "_gtFine_labelTrainIds.png"


class TreeError(Exception):
    """The directory tree is not a Cityscapes tree."""


def find_label_files(root: Path, splits: list[str]) -> list[Path]:
    """Every ``*_gtFine_labelIds.png`` of ``splits``; a clear :class:`TreeError` when the tree is wrong."""
    if not root.is_dir():
        raise TreeError(f"Cityscapes root not found: {root}")
    gt = root / "gtFine"
    if not gt.is_dir():
        raise TreeError(f"{root} has no gtFine/ folder (expected <root>/gtFine/<split>/<city>/*{SUFFIX})")
    files: list[Path] = []
    for split in splits:
        d = gt / split
        if not d.is_dir():
            raise TreeError(f"split folder not found: {d}")
        found = sorted(d.glob(f"*/*{SUFFIX}"))
        if not found:
            raise TreeError(f"no *{SUFFIX} files under {d}/<city>/ (is this the gtFine tree of Cityscapes?)")
        files += found
    return files


def convert_one(path: Path, overwrite: bool = False) -> str:
    """Write the train-id PNG next to ``path``; returns '' or an error line for that file."""
    out = path.with_name(path.name[: -len(SUFFIX)] + OUT_SUFFIX)
    if out.exists() and not overwrite:
        return ""
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "I", "I;16"):
                return f"{path}: expected a single-channel label image, got mode {im.mode}"
            ids = np.asarray(im)
    except OSError as e:
        return f"{path}: cannot read ({e})"
    if ids.max(initial=0) > 255 or ids.min(initial=0) < 0:
        return f"{path}: label ids outside 0..255"
    Image.fromarray(LUT[ids.astype(np.uint8)]).save(out)
    return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("root", type=Path, help="Cityscapes root (with gtFine/)")
    p.add_argument("--splits", nargs="+", default=["train", "val"], help="splits to convert (default: train val)")
    p.add_argument("--nproc", type=int, default=4, help="worker processes")
    p.add_argument("--overwrite", action="store_true", help="rewrite existing *_labelTrainIds.png")
    args = p.parse_args(argv)
    try:
        files = find_label_files(args.root, args.splits)
    except TreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    work = partial(convert_one, overwrite=args.overwrite)
    errors = parallel_errors(work, files, args.nproc, chunksize=16)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    print(f"converted {len(files) - len(errors)} of {len(files)} label files under {args.root / 'gtFine'}")
    return 2 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
