"""Joint multi-task datasets: NYUv2 as the multi-task codebases preprocess it, Cityscapes segmentation + depth
from the official tree, and a built-in synthetic scene with all three labels.

A sample is a dict with ``image`` uint8 (3,H,W) and, for each of its tasks, the task's key: ``label`` int64
(H,W) class ids with 255 ignored (``seg``), ``depth`` float32 (1,H,W) metres with 0 = no ground truth
(``depth``), ``normal`` float32 (3,H,W) unit normals with the zero vector = no ground truth (``normals``).
Every sample also holds ``has_<task>`` (a bool scalar; ``(B,)`` after collation): False when the sample lacks
that task's label, whose map is then all "no ground truth" (255 / 0 / zero vectors), so a loss or metric
that masks invalid pixels skips it, and one that works per sample can skip it by the flag.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from densefuse.data.io import IGNORE_INDEX, check_label, check_same_size, read_image, read_label
from densefuse.errors import DataError, did_you_mean

PathLike = Union[str, Path]
Transform = Optional[Callable[[dict], dict]]

#: the task names of the joint datasets and the sample key holding each task's label
TASK_KEYS = {"seg": "label", "depth": "depth", "normals": "normal"}
#: NYUv2 (mtan / LibMTL preprocessing): 13 classes at 288x384
NYU_CLASSES = 13
NYU_SIZE = (288, 384)
#: NYUv2's folder for each task
NYU_DIRS = {"seg": "label", "depth": "depth", "normals": "normal"}


def check_tasks(tasks: Sequence[str], available: Sequence[str], dataset: str) -> list[str]:
    """``tasks`` as a list, each a task this dataset has labels for; else a DataError naming it."""
    tasks = list(tasks)
    if not tasks:
        raise DataError(f"{dataset}: no task asked for")
    for t in tasks:
        if t not in available:
            raise DataError(f"{dataset} has no labels for task '{t}'{did_you_mean(str(t), available)}; "
                            f"it has: {', '.join(available)}")
    return tasks


def empty_label(task: str, size: Sequence[int]) -> Tensor:
    """The "no ground truth" map of ``task`` at ``size`` (H, W)."""
    H, W = int(size[0]), int(size[1])
    if task == "seg":
        return torch.full((H, W), IGNORE_INDEX, dtype=torch.int64)
    if task == "depth":
        return torch.zeros(1, H, W, dtype=torch.float32)
    if task == "normals":
        return torch.zeros(3, H, W, dtype=torch.float32)
    raise KeyError(task)


def _missing_error(dataset: str, task: str, missing: list[Path], total: int) -> DataError:
    more = f" (and {len(missing) - 1} more of {total})" if len(missing) > 1 else ""
    return DataError(f"{dataset}: {task} label file not found: {missing[0]}{more}; restore the files, or allow "
                     "samples without this label (partial_labels=True) so that its loss and metric skip them")


# --------------------------------------------------------------------------------------------------
# NYUv2 (mtan / LibMTL layout)

def npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header (the array is not read); DataError if unreadable."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # maps the file: only the header is read
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read {path} as a .npy array: {e}") from None
    return tuple(int(s) for s in arr.shape), arr.dtype


class NYUv2(Dataset):
    """NYUv2 as mtan / LibMTL preprocess it: ``<root>/<split>/{image,label,depth,normal}/<i>.npy``
    (795 train / 654 val images at 288x384; ``image`` HxWx3 float in [0, 1], ``label`` HxW with the 13
    classes 0..12 and -1 for unlabelled pixels, ``depth`` HxW or HxWx1 metres with 0 = none, ``normal``
    HxWx3 unit normals with the zero vector = none).

    ``split`` is ``train`` or ``val`` (mtan's names; the val images are NYUv2's 654 test images). Every
    array's header is read when the dataset is built: a missing file, an array of the wrong shape or a
    non-numeric one is a DataError naming the file. Labels -1 become 255; any other value outside 0..12 is
    a DataError naming the file and the values. An image stored on the 0-255 scale is taken as it is.
    ``size`` (None: any size, the same for every array of a sample).
    """

    classes = ("bed", "books", "ceiling", "chair", "floor", "furniture", "objects", "picture", "sofa", "table",
               "tv", "wall", "window")

    def __init__(self, root: PathLike, split: str = "train", tasks: Sequence[str] = ("seg", "depth", "normals"),
                 size: Optional[Sequence[int]] = NYU_SIZE, partial_labels: bool = False,
                 transform: Transform = None) -> None:
        self.tasks = check_tasks(tasks, tuple(NYU_DIRS), "NYUv2")
        base = Path(root) / split
        if not base.is_dir():
            raise DataError(f"NYUv2 split folder not found: {base} (expected <root>/{{train,val}}/image/<i>.npy)")
        img_dir = base / "image"
        if not img_dir.is_dir():
            raise DataError(f"NYUv2 image folder not found: {img_dir}")
        for t in self.tasks:
            if not (base / NYU_DIRS[t]).is_dir():
                raise DataError(f"NYUv2 folder {base / NYU_DIRS[t]} not found: task '{t}' needs its labels there")
        stems = sorted((p.stem for p in img_dir.glob("*.npy")), key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))
        if not stems:
            raise DataError(f"no .npy images in {img_dir}")
        self.root, self.split, self.size = base, split, None if size is None else (int(size[0]), int(size[1]))
        self.partial_labels, self.transform = bool(partial_labels), transform
        self.items: list[dict[str, Optional[Path]]] = []
        missing: dict[str, list[Path]] = {t: [] for t in self.tasks}
        for stem in stems:
            item: dict[str, Optional[Path]] = {"image": img_dir / f"{stem}.npy"}
            self._check_shape(item["image"], "image")
            hw = npy_shape(item["image"])[0][:2]
            for t in self.tasks:
                p = base / NYU_DIRS[t] / f"{stem}.npy"
                if not p.is_file():
                    missing[t].append(p)
                    item[t] = None
                    continue
                self._check_shape(p, t, hw)
                item[t] = p
            self.items.append(item)
        for t, files in missing.items():
            if files and not self.partial_labels:
                raise _missing_error("NYUv2", t, files, len(stems))

    def _check_shape(self, path: Path, kind: str, hw: Optional[tuple[int, int]] = None) -> None:
        shape, dtype = npy_shape(path)
        H, W = hw if hw is not None else (self.size if self.size is not None else shape[:2])
        want = {"image": [(H, W, 3)], "seg": [(H, W)], "depth": [(H, W), (H, W, 1)], "normals": [(H, W, 3)]}[kind]
        if shape not in want or dtype.kind not in "fiub":
            what = {"image": "H x W x 3 RGB", "seg": "H x W class ids", "depth": "H x W (x 1) metres",
                    "normals": "H x W x 3 normals"}[kind]
            raise DataError(f"NYUv2 array {path} has shape {shape} and dtype {dtype}; expected "
                            f"{' or '.join(str(w) for w in want)} numbers ({what})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.items[index]
        img = np.load(item["image"]).astype(np.float32)
        if float(img.max(initial=0.0)) <= 1.0 + 1e-6:
            img = img * 255.0
        image = torch.from_numpy(np.clip(np.rint(img), 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()
        hw = tuple(image.shape[-2:])
        sample: dict[str, Tensor] = {"image": image}
        for t in self.tasks:
            path = item[t]
            if path is None:
                sample[TASK_KEYS[t]], sample[f"has_{t}"] = empty_label(t, hw), torch.tensor(False)
                continue
            arr = np.load(path)
            if t == "seg":
                lab = np.rint(arr).astype(np.int64) if arr.dtype.kind == "f" else arr.astype(np.int64)
                if arr.dtype.kind == "f" and not np.allclose(arr, lab, equal_nan=False):
                    raise DataError(f"NYUv2 label {path} holds non-integer values")
                lab = torch.from_numpy(lab)
                lab = torch.where(lab == -1, torch.full_like(lab, IGNORE_INDEX), lab)
                sample["label"] = check_label(lab, NYU_CLASSES, path, note="-1 read as the ignore index")
            elif t == "depth":
                d = torch.from_numpy(arr.astype(np.float32)).reshape(1, *hw)
                sample["depth"] = torch.where(torch.isfinite(d) & (d > 0), d, torch.zeros_like(d))
            else:
                n = torch.from_numpy(arr.astype(np.float32)).permute(2, 0, 1).contiguous()
                sample["normal"] = torch.nan_to_num(n, nan=0.0)
            sample[f"has_{t}"] = torch.tensor(True)
        return self.transform(sample) if self.transform is not None else sample


# --------------------------------------------------------------------------------------------------
# Cityscapes segmentation + depth

def read_camera(path: PathLike) -> tuple[float, float]:
    """``(baseline, fx)`` from a Cityscapes ``camera/*.json`` (``extrinsic.baseline`` metres,
    ``intrinsic.fx`` pixels); DataError naming the file when it is missing or lacks them."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"camera file not found: {p}")
    try:
        cam = json.loads(p.read_text(encoding="utf-8"))
        baseline, fx = float(cam["extrinsic"]["baseline"]), float(cam["intrinsic"]["fx"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"camera file {p} lacks extrinsic.baseline or intrinsic.fx ({type(e).__name__}: {e})") from None
    if not (baseline > 0 and fx > 0 and math.isfinite(baseline) and math.isfinite(fx)):
        raise DataError(f"camera file {p} has baseline {baseline} and fx {fx}; both must be positive")
    return baseline, fx


def disparity_to_depth(raw: Tensor, baseline: float, fx: float) -> Tensor:
    """Cityscapes disparity PNG values ``p`` (uint16) to depth in metres: ``d = (p - 1) / 256`` for ``p > 0``,
    ``depth = baseline * fx / d``; ``p = 0`` (no disparity) and ``d <= 0`` give 0 (no ground truth)."""
    p = raw.double()
    d = (p - 1.0) / 256.0
    ok = (p > 0) & (d > 0)
    depth = torch.where(ok, baseline * fx / torch.where(ok, d, torch.ones_like(d)), torch.zeros_like(d))
    return depth.float()


def read_disparity(path: PathLike) -> Tensor:
    """A Cityscapes disparity PNG (16-bit) as int64 (H, W); DataError for a missing or 8-bit file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"disparity file not found: {p}")
    try:
        img = Image.open(p)
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode disparity file {p}: {e}") from None
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DataError(f"disparity file {p} has mode {img.mode}; expected a 16-bit PNG (Cityscapes' disparity)")
    return torch.from_numpy(np.asarray(img).astype(np.int64))


class CityscapesMTL(Dataset):
    """Cityscapes with segmentation and depth from the official tree:
    ``leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png``, ``gtFine/<split>/<city>/<stem>_gtFine_labelTrainIds.png``
    (trainIds 0..18, 255 void), ``disparity/<split>/<city>/<stem>_disparity.png`` and
    ``camera/<split>/<city>/<stem>_camera.json``; depth = baseline * fx / ((p - 1) / 256) (see
    :func:`disparity_to_depth`), 0 where there is no disparity.

    Every file a sample needs is looked up when the dataset is built. A missing label file is a DataError
    naming it, unless ``partial_labels``: then the sample gets the empty map and ``has_<task>`` False.
    """

    num_classes = 19

    def __init__(self, root: PathLike, split: str = "train", tasks: Sequence[str] = ("seg", "depth"),
                 partial_labels: bool = False, transform: Transform = None) -> None:
        self.tasks = check_tasks(tasks, ("seg", "depth"), "Cityscapes")
        root = Path(root)
        img_dir = root / "leftImg8bit" / split
        if not img_dir.is_dir():
            raise DataError(f"Cityscapes image folder not found: {img_dir}")
        folders = {"seg": [root / "gtFine" / split], "depth": [root / "disparity" / split, root / "camera" / split]}
        for t in self.tasks:
            for folder in folders[t]:
                if not folder.is_dir():
                    raise DataError(f"Cityscapes folder {folder} not found: task '{t}' needs it")
        images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise DataError(f"no *_leftImg8bit.png images in {img_dir}/<city>/")
        self.split, self.partial_labels, self.transform = split, bool(partial_labels), transform
        self.items: list[dict[str, Optional[Path]]] = []
        missing: dict[str, list[Path]] = {t: [] for t in self.tasks}
        for img in images:
            city, stem = img.parent.name, img.name[: -len("_leftImg8bit.png")]
            item: dict[str, Optional[Path]] = {"image": img}
            files = {"seg": [root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png"],
                     "depth": [root / "disparity" / split / city / f"{stem}_disparity.png",
                               root / "camera" / split / city / f"{stem}_camera.json"]}
            for t in self.tasks:
                absent = [f for f in files[t] if not f.is_file()]
                missing[t] += absent
                item[t] = None if absent else files[t][0]
                if t == "depth":
                    item["camera"] = None if absent else files[t][1]
            self.items.append(item)
        for t, found in missing.items():
            if found and not self.partial_labels:
                raise _missing_error("Cityscapes", t, found, len(images))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.items[index]
        image = read_image(item["image"])
        sample: dict[str, Tensor] = {"image": image}
        hw = tuple(image.shape[-2:])
        for t in self.tasks:
            path = item[t]
            if path is None:
                sample[TASK_KEYS[t]], sample[f"has_{t}"] = empty_label(t, hw), torch.tensor(False)
                continue
            if t == "seg":
                label = check_label(read_label(path), self.num_classes, path)
                check_same_size(image, label, item["image"], path)
                sample["label"] = label
            else:
                raw = read_disparity(path)
                check_same_size(image, raw, item["image"], path)
                baseline, fx = read_camera(item["camera"])
                sample["depth"] = disparity_to_depth(raw, baseline, fx)[None]
            sample[f"has_{t}"] = torch.tensor(True)
        return self.transform(sample) if self.transform is not None else sample


# --------------------------------------------------------------------------------------------------
# synthetic

class SyntheticScene(Dataset):
    """The rendered rooms of the normals task (:func:`densefuse_tasks.normals.render_scene`) with all three
    labels from the same ray cast, so they agree: ``label`` (floor 0, wall 1, sphere 2), ``depth`` (z-depth)
    and ``normal``. Deterministic per (seed, split, index).

    ``drop`` (task -> probability) leaves that task's label out of a sample (drawn per sample from its own
    seed), to exercise losses and metrics that must skip samples without a label.
    """

    classes = ("floor", "wall", "sphere")

    def __init__(self, num: int, size: Sequence[int] = (96, 128), seed: int = 0, split: str = "train",
                 tasks: Sequence[str] = ("seg", "depth", "normals"), focal: float = 0.9,
                 drop: Optional[Mapping[str, float]] = None, transform: Transform = None) -> None:
        self.tasks = check_tasks(tasks, tuple(TASK_KEYS), "the synthetic scene")
        self.num, self.size, self.seed, self.split = int(num), (int(size[0]), int(size[1])), int(seed), split
        self.focal, self.transform = float(focal), transform
        self.drop = {t: float(p) for t, p in (drop or {}).items()}
        if self.drop:
            check_tasks(list(self.drop), self.tasks, "the synthetic scene's drop")

    def __len__(self) -> int:
        return self.num

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        from densefuse_tasks.normals import render_scene, scene_generator

        g = scene_generator(self.seed, self.split, index)
        coins = torch.rand(len(TASK_KEYS), generator=torch.Generator().manual_seed(g.initial_seed() ^ 0x5EED))
        scene = render_scene(g, self.size, self.focal)
        sample: dict[str, Tensor] = {"image": scene["image"]}
        for i, t in enumerate(TASK_KEYS):
            if t not in self.tasks:
                continue
            has = not float(coins[i]) < self.drop.get(t, 0.0)
            sample[TASK_KEYS[t]] = scene[TASK_KEYS[t]] if has else empty_label(t, self.size)
            sample[f"has_{t}"] = torch.tensor(has)
        return self.transform(sample) if self.transform is not None else sample
