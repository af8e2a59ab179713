"""SBD (``benchmark_RELEASE``) ``.mat`` class masks -> ``SegmentationClassAug/*.png`` plus the aug splits, in parallel.

Does what mmseg's ``tools/dataset_converters/voc_aug.py`` does: every ``<aug>/dataset/cls/*.mat``
(``GTcls.Segmentation``) becomes an index PNG, and two lists are written to
``<devkit>/VOC2012/ImageSets/Segmentation``:

* ``aug.txt`` = (SBD train + SBD val) - (VOC train + VOC val): 9118 names on the official data; densefuse's
  ``train_aug`` split reads ``train.txt`` (SegmentationClass) followed by ``aug.txt`` (SegmentationClassAug);
* ``trainaug.txt`` = (VOC train + SBD train + SBD val) - VOC val: 10582 names (checked on the official data).

mmseg writes both lists in set order; here they are sorted, so runs are reproducible.

    python tools/convert_voc_aug.py data/VOCdevkit data/VOCdevkit/benchmark_RELEASE --nproc 8
"""
from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
from _common import parallel_errors
from PIL import Image

AUG_LEN = 10582  # trainaug on the official VOC 2012 + SBD data
VOC_TRAIN_LEN, VOC_VAL_LEN = 1464, 1449


class TreeError(Exception):
    """The directory tree is not a VOC devkit / SBD tree."""


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise TreeError(f"split list not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def check_trees(devkit: Path, aug: Path) -> tuple[Path, list[Path]]:
    """The VOC split folder and the SBD ``.mat`` files; a clear :class:`TreeError` when a tree is wrong."""
    seg = devkit / "VOC2012" / "ImageSets" / "Segmentation"
    if not (devkit / "VOC2012").is_dir():
        raise TreeError(f"{devkit} is not a VOC devkit: VOC2012/ not found")
    if not seg.is_dir():
        raise TreeError(f"VOC split folder not found: {seg}")
    cls = aug / "dataset" / "cls"
    if not cls.is_dir():
        raise TreeError(f"{aug} is not SBD's benchmark_RELEASE: dataset/cls/ not found")
    mats = sorted(cls.glob("*.mat"))
    if not mats:
        raise TreeError(f"no .mat files in {cls}")
    return seg, mats


def convert_mat(path: Path, out_dir: Path) -> str:
    """``GTcls.Segmentation`` of one SBD file -> ``out_dir/<name>.png``; returns '' or an error line."""
    from scipy.io import loadmat

    try:
        mask = loadmat(str(path))["GTcls"][0]["Segmentation"][0]
    except Exception as e:  # noqa: BLE001 - scipy raises several types for a bad file: report it, go on
        return f"{path}: not an SBD class mask (GTcls.Segmentation): {type(e).__name__} {e}"
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.max(initial=0) > 255:
        return f"{path}: GTcls.Segmentation is not a 2-D class map"
    Image.fromarray(mask.astype(np.uint8)).save(out_dir / (path.stem + ".png"))
    return ""


def aug_lists(voc_train: list[str], voc_val: list[str], sbd: list[str]) -> tuple[list[str], list[str]]:
    """(aug, trainaug) as mmseg computes them, sorted."""
    aug = sorted(set(sbd) - set(voc_train) - set(voc_val))
    trainaug = sorted(set(voc_train + sbd) - set(voc_val))
    return aug, trainaug


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("devkit", type=Path, help="VOCdevkit folder (with VOC2012/)")
    p.add_argument("aug", type=Path, help="SBD benchmark_RELEASE folder (with dataset/cls/*.mat)")
    p.add_argument("-o", "--out-dir", type=Path, help="PNG folder (default <devkit>/VOC2012/SegmentationClassAug)")
    p.add_argument("--nproc", type=int, default=4, help="worker processes")
    args = p.parse_args(argv)
    try:
        seg, mats = check_trees(args.devkit, args.aug)
        voc_train, voc_val = _read_list(seg / "train.txt"), _read_list(seg / "val.txt")
        sbd = _read_list(args.aug / "dataset" / "train.txt") + _read_list(args.aug / "dataset" / "val.txt")
    except TreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = args.out_dir or args.devkit / "VOC2012" / "SegmentationClassAug"
    out_dir.mkdir(parents=True, exist_ok=True)
    work = partial(convert_mat, out_dir=out_dir)
    errors = parallel_errors(work, mats, args.nproc, chunksize=32)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        return 2
    aug, trainaug = aug_lists(voc_train, voc_val, sbd)
    if (len(voc_train), len(voc_val)) == (VOC_TRAIN_LEN, VOC_VAL_LEN) and len(trainaug) != AUG_LEN:
        print(f"error: trainaug has {len(trainaug)} names, expected {AUG_LEN} on the official data", file=sys.stderr)
        return 2
    (seg / "aug.txt").write_text("".join(n + "\n" for n in aug))
    (seg / "trainaug.txt").write_text("".join(n + "\n" for n in trainaug))
    print(f"converted {len(mats)} masks to {out_dir}; aug.txt: {len(aug)} names, trainaug.txt: {len(trainaug)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
