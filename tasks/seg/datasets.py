"""Segmentation datasets: a learnable synthetic set and ADE20K / Pascal VOC (+aug) / Cityscapes in
their official directory layouts (the same files mmseg reads; nothing is downloaded).

Every dataset returns ``{"image": uint8 (3,H,W) RGB, "label": int64 (H,W), "name": str}`` with labels
in ``[0, num_classes)`` or 255 (ignored), then applies its optional per-sample ``transform``
(:class:`densefuse.data.RandomCropPad` for training splits). Each pair is checked when it is read:
same height and width, label values (as stored in the file) in range.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset

from densefuse.data import IGNORE_INDEX, check_label, check_same_size, label_counts, read_image, read_label
from densefuse.data.check import missing_file
from densefuse.data.ops import Draw
from densefuse.errors import ConfigError, DataError

from .palettes import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    SYNTHETIC_CLASSES,
    VOC_CLASSES,
    VOC_PALETTE,
    voc_colormap,
)

PathLike = Union[str, Path]
Transform = Optional[Callable[[dict], dict]]


def reduce_zero_label(label: Tensor, has_ignore: Optional[bool] = None) -> Tensor:
    """mmseg's ``reduce_zero_label``: 0 ("other") -> 255, then ``v -> v - 1`` and 254 -> 255, so
    ADE20K's raw 1..150 become classes 0..149 and 255 stays ignored. ``has_ignore=False`` (the caller's
    histogram shows no 255) leaves a uint8 label at one subtraction."""
    out = label - 1
    if label.dtype == torch.uint8:  # 0 - 1 wraps to 255 by itself; only 255 - 1 needs a fix
        if has_ignore is False:
            return out
        return out.masked_fill_(out == IGNORE_INDEX - 1, IGNORE_INDEX)
    out[(label == 0) | (out == IGNORE_INDEX - 1)] = IGNORE_INDEX
    return out


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} directory not found: {path}")
    return path


class SegDataset(Dataset):
    """(image file, label file) pairs decoded with pillow, label values checked on every read."""

    classes: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()

    def __init__(self, samples: Sequence[tuple[Path, Path]], reduce_zero_label: bool = False,
                 transform: Transform = None) -> None:
        self.samples = list(samples)
        self.reduce_zero_label = reduce_zero_label
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, index: int) -> dict:
        """The decoded, checked sample before ``transform``, as the mmseg pipeline wants it: the label uint8
        when the file is 8-bit (checks and ``reduce_zero_label`` on uint8 cost a fraction of int64's), the
        image in the decoder's channels-last memory (the resize reads it without a copy)."""
        img_path, lab_path = self.samples[index]
        image = read_image(img_path, channels_last=True)
        label = read_label(lab_path, small=True)
        check_same_size(image, label, img_path, lab_path)
        if self.reduce_zero_label:  # check the file's own values: 0..num_classes (0 = other) or 255
            counts = label_counts(label)
            check_label(label, self.num_classes + 1, lab_path, counts=counts,
                        note=f"with reduce_zero_label the file holds 0 (ignored) and 1..{self.num_classes}")
            label = reduce_zero_label(label, None if counts is None else bool(counts[IGNORE_INDEX]))
        else:
            check_label(label, self.num_classes, lab_path)
        return {"image": image, "label": label, "name": Path(img_path).stem}

    def load(self, index: int) -> dict:
        """The decoded sample before ``transform``: image uint8 (3,H,W) contiguous, label int64."""
        sample = self.decode(index)
        sample["image"] = sample["image"].contiguous()
        sample["label"] = sample["label"].long()
        return sample

    def __getitem__(self, index: int) -> dict:
        if self.transform is None:
            return self.load(index)
        if not getattr(self.transform, "uint8_labels", False):  # transforms that expect int64 labels
            return self.transform(self.load(index))
        sample = self.transform(self.decode(index))  # the mmseg pipeline: crop first, then widen the crop
        if isinstance(sample.get("label"), Tensor):
            sample["label"] = sample["label"].long()
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={len(self)}, num_classes={self.num_classes})"


def _pair_by_listing(img_dir: Path, img_suffix: str, ann_dir: Path, ann_suffix: str) -> list[tuple[Path, Path]]:
    """Pair every ``*img_suffix`` under ``img_dir`` (recursive, sorted; suffixes match in any case, so
    ``.JPG`` counts) with the label at the same relative path under ``ann_dir``; a missing label is a
    DataError naming it (recorded instead inside :func:`densefuse.data.check.collect_missing`)."""
    images = sorted(p for p in img_dir.rglob("*") if p.name.lower().endswith(img_suffix.lower()) and p.is_file())
    if not images:
        raise DataError(f"no '*{img_suffix}' images found under {img_dir}")
    labels = {p.relative_to(ann_dir).as_posix().lower(): p for p in ann_dir.rglob("*")
              if p.name.lower().endswith(ann_suffix.lower())}
    pairs = []
    for img in images:
        rel = img.relative_to(img_dir).as_posix()
        lab = ann_dir / (rel[: -len(img_suffix)] + ann_suffix)
        found = labels.get((rel[: -len(img_suffix)] + ann_suffix).lower())
        if found is None:
            missing_file(f"label file not found: {lab} (for image {img})")
            continue
        pairs.append((img, found))
    return pairs


class ADE20K(SegDataset):
    """ADE20K (SceneParsing, ``ADEChallengeData2016``): ``images/{training,validation}/*.jpg`` and
    ``annotations/{training,validation}/*.png``. 150 classes; raw label 0 ("other") is ignored via
    ``reduce_zero_label`` (on by default, as in mmseg). ``split``: train/val or training/validation."""

    classes = ADE20K_CLASSES
    palette = ADE20K_PALETTE
    SPLITS = {"train": "training", "val": "validation", "training": "training", "validation": "validation"}

    def __init__(self, root: PathLike, split: str = "train", reduce_zero_label: bool = True,
                 transform: Transform = None) -> None:
        if split not in self.SPLITS:
            raise ConfigError(f"unknown ADE20K split '{split}'; use one of {', '.join(self.SPLITS)}")
        root = _need_dir(Path(root), "ADE20K root")
        sub = self.SPLITS[split]
        img_dir = _need_dir(root / "images" / sub, "ADE20K image")
        ann_dir = _need_dir(root / "annotations" / sub, "ADE20K annotation")
        super().__init__(_pair_by_listing(img_dir, ".jpg", ann_dir, ".png"), reduce_zero_label, transform)
        self.root, self.split = root, split


class PascalVOC(SegDataset):
    """Pascal VOC 2012 (+ SBD "aug") under ``VOCdevkit/VOC2012``: ``JPEGImages/<id>.jpg``,
    ``SegmentationClass/<id>.png``, ``SegmentationClassAug/<id>.png`` and id lists in
    ``ImageSets/Segmentation/<list>.txt``. 21 classes with background; 255 (boundaries) is ignored.

    Splits:
      * ``train`` / ``val`` / ``trainval`` / any ``<list>.txt``: labels from ``SegmentationClass``;
      * ``aug``: ``aug.txt`` with ``SegmentationClassAug`` (written by mmseg's ``voc_aug.py``);
      * ``trainaug``: ``trainaug.txt``, labels from ``SegmentationClassAug`` (falling back to
        ``SegmentationClass`` for ids the converter did not write);
      * ``train_aug``: mmseg's ``pascal_voc12_aug`` training set, ``train.txt`` + ``SegmentationClass``
        followed by ``aug.txt`` + ``SegmentationClassAug`` (1464 + 9118 = 10582 images).
    """

    classes = VOC_CLASSES
    palette = VOC_PALETTE

    def __init__(self, root: PathLike, split: str = "train", transform: Transform = None) -> None:
        root = _need_dir(Path(root), "Pascal VOC root")
        img_dir = _need_dir(root / "JPEGImages", "Pascal VOC image")
        if split == "train_aug":
            parts = [("train", ["SegmentationClass"]), ("aug", ["SegmentationClassAug"])]
        elif split == "trainaug":
            parts = [("trainaug", ["SegmentationClassAug", "SegmentationClass"])]
        elif split == "aug":
            parts = [("aug", ["SegmentationClassAug"])]
        else:
            parts = [(split, ["SegmentationClass"])]
        images = {p.name.lower(): p.name for p in img_dir.iterdir()}
        pairs: list[tuple[Path, Path]] = []
        for list_name, ann_names in parts:
            ids = self._read_ids(root / "ImageSets" / "Segmentation" / f"{list_name}.txt")
            ann_dirs = [root / a for a in ann_names]
            if not any(d.is_dir() for d in ann_dirs):
                raise DataError(f"Pascal VOC annotation directory not found: {ann_dirs[0]}")
            listings = [{p.name.lower(): p.name for p in d.iterdir()} if d.is_dir() else {} for d in ann_dirs]
            for i in ids:
                image = images.get(f"{i}.jpg".lower())
                if image is None:
                    missing_file(f"image file not found: {img_dir / (i + '.jpg')} (listed in {list_name}.txt)")
                    continue
                for d, names in zip(ann_dirs, listings):
                    if f"{i}.png".lower() in names:
                        pairs.append((img_dir / image, d / names[f"{i}.png".lower()]))
                        break
                else:
                    missing_file(f"label file not found: {ann_dirs[0] / (i + '.png')} (listed in {list_name}.txt)")
        super().__init__(pairs, False, transform)
        self.root, self.split = root, split

    @staticmethod
    def _read_ids(path: Path) -> list[str]:
        if not path.is_file():
            raise DataError(f"Pascal VOC split file not found: {path}")
        # one id per line; also accept "JPEGImages/<id>.jpg SegmentationClassAug/<id>.png" pair lists
        ids = [Path(line.split()[0]).stem for line in path.read_text().splitlines() if line.strip()]
        if not ids:
            raise DataError(f"Pascal VOC split file is empty: {path}")
        return ids


class Cityscapes(SegDataset):
    """Cityscapes fine annotations: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (trainIds 0..18, void 255, as written by
    cityscapesscripts' ``createTrainIdLabelImgs`` / mmseg's ``cityscapes.py`` converter)."""

    classes = CITYSCAPES_CLASSES
    palette = CITYSCAPES_PALETTE

    def __init__(self, root: PathLike, split: str = "train", transform: Transform = None) -> None:
        root = _need_dir(Path(root), "Cityscapes root")
        img_dir = _need_dir(root / "leftImg8bit" / split, "Cityscapes image")
        ann_dir = _need_dir(root / "gtFine" / split, "Cityscapes annotation")
        pairs = _pair_by_listing(img_dir, "_leftImg8bit.png", ann_dir, "_gtFine_labelTrainIds.png")
        super().__init__(pairs, False, transform)
        self.root, self.split = root, split

    def decode(self, index: int) -> dict:
        sample = super().decode(index)
        sample["name"] = sample["name"][: -len("_leftImg8bit")]
        return sample


# --------------------------------------------------------------------------------------------------
# synthetic


class SyntheticSeg(Dataset):
    """Procedural scenes that need both context and detail to segment, generated on the fly.

    Classes: 0 background (a smooth colour gradient), 1 large flat disks, 2 large flat rectangles
    (rotated; disk vs rectangle is a question of *shape*, so big interiors need global context),
    3 stripe-textured and 4 checker-textured blobs (texture at a 3-8 px period), 5 small dots
    (radius 4-6.5 px, detail). Instance colours are noisy draws around a per-class mean that
    overlap between classes, and every pixel gets noise, so colour alone does not decide the
    class. A 1-pixel band on each side of object boundaries is labelled 255 (like VOC's
    boundaries). ``num_classes`` < 6 keeps the first kinds. Sample ``i`` of ``split`` is a pure
    function of ``(seed, split, i)``.
    """

    KINDS = ("disk", "rectangle", "stripes", "checker", "dots")
    #: mean RGB of each class's instances; instances are drawn with a large spread around it
    _MEANS = ((0, 0, 0), (200, 70, 70), (70, 160, 210), (90, 200, 90), (200, 170, 60), (230, 230, 230))

    palette = voc_colormap(6)

    def __init__(self, num_images: int = 256, size: Sequence[int] = (128, 128), num_classes: int = 6,
                 seed: int = 0, split: str = "train", transform: Transform = None) -> None:
        if not 2 <= int(num_classes) <= 6:
            raise ConfigError(f"synthetic data supports 2..6 classes, got num_classes={num_classes}")
        if int(num_images) < 1:
            raise ConfigError(f"synthetic data needs at least one image, got {num_images}")
        self.num_images, self.size = int(num_images), (int(size[0]), int(size[1]))
        self.num_classes, self.seed, self.split = int(num_classes), int(seed), split
        self.classes = SYNTHETIC_CLASSES[: self.num_classes]
        self.transform = transform

    def __len__(self) -> int:
        return self.num_images

    def generator(self, index: int) -> torch.Generator:
        key = f"{self.seed}/{self.split}/{index}".encode()
        return torch.Generator().manual_seed(zlib.crc32(key) * 7919 + index)

    def load(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(index)
        image, label = render_scene(self.size, self.num_classes, self.generator(index))
        return {"image": image, "label": label, "name": f"synthetic_{self.split}_{index:05d}"}

    def __getitem__(self, index: int) -> dict:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample

    def __repr__(self) -> str:
        return f"SyntheticSeg(num_images={self.num_images}, size={self.size}, num_classes={self.num_classes}, split={self.split!r})"


def _colour(g: torch.Generator, cls: int, spread: float = 55.0) -> Tensor:
    mean = torch.tensor(SyntheticSeg._MEANS[cls], dtype=torch.float32)
    return (mean + spread * torch.randn(3, generator=g)).clamp(0, 255)


def render_scene(size: Sequence[int], num_classes: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw one synthetic scene: uint8 image (3,H,W) and int64 label (H,W) (see :class:`SyntheticSeg`)."""
    H, W = int(size[0]), int(size[1])
    m = min(H, W)
    draw = Draw(g)
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")

    # background: a gradient between two random colours along a random direction
    a = draw.uniform(0, 2 * math.pi)
    t = ((xx - W / 2) * math.cos(a) + (yy - H / 2) * math.sin(a)) / max(H, W) + 0.5
    c0, c1 = torch.rand(3, generator=g) * 255, torch.rand(3, generator=g) * 255
    image = c0.view(3, 1, 1) + (c1 - c0).view(3, 1, 1) * t.clamp(0, 1)
    label = torch.zeros(H, W, dtype=torch.int64)

    def rotated(cy: float, cx: float, angle: float) -> tuple[Tensor, Tensor]:
        ca, sa = math.cos(angle), math.sin(angle)
        return (xx - cx) * ca + (yy - cy) * sa, -(xx - cx) * sa + (yy - cy) * ca

    def paint(mask: Tensor, cls: int, colour: Tensor) -> None:
        nonlocal image
        image = torch.where(mask, colour.view(3, 1, 1) if colour.ndim == 1 else colour, image)
        label.masked_fill_(mask, cls)

    objects: list[int] = []
    kinds = list(range(1, num_classes))
    for cls in kinds:
        if cls == 5:
            continue
        objects += [cls] * draw.randint(0 if cls in (3, 4) else 1, 2)
    order = torch.randperm(len(objects), generator=g).tolist()
    # textured blobs first (large, in the back), then the flat shapes
    objects = sorted((objects[i] for i in order), key=lambda c: c not in (3, 4))
    for cls in objects:
        cy, cx = draw.uniform(0.1, 0.9) * H, draw.uniform(0.1, 0.9) * W
        angle = draw.uniform(0, math.pi)
        colour = _colour(g, cls)
        if cls == 1:  # disk
            r = draw.uniform(0.12, 0.3) * m
            paint((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r, cls, colour)
        elif cls == 2:  # rectangle
            u, v = rotated(cy, cx, angle)
            hu, hv = draw.uniform(0.1, 0.3) * m, draw.uniform(0.08, 0.25) * m
            paint((u.abs() <= hu) & (v.abs() <= hv), cls, colour)
        else:  # textured ellipse
            u, v = rotated(cy, cx, angle)
            au, av = draw.uniform(0.18, 0.4) * m, draw.uniform(0.12, 0.3) * m
            mask = (u / au) ** 2 + (v / av) ** 2 <= 1
            period = draw.uniform(3.0, 8.0)
            tu, tv = rotated(0.0, 0.0, draw.uniform(0, math.pi))
            if cls == 3:
                on = torch.sin(2 * math.pi * tu / period) > 0
            else:
                on = (torch.sin(2 * math.pi * tu / period) * torch.sin(2 * math.pi * tv / period)) > 0
            dark = colour * draw.uniform(0.2, 0.5)
            tex = torch.where(on.unsqueeze(0), colour.view(3, 1, 1), dark.view(3, 1, 1))
            paint(mask, cls, tex)

    # ignore band on both sides of every boundary between regions
    edge = torch.zeros(H, W, dtype=torch.bool)
    dy = label[1:, :] != label[:-1, :]
    dx = label[:, 1:] != label[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx

    if 5 in kinds:  # small dots on top, without a band (they are only a few pixels wide)
        for _ in range(draw.randint(6, 14)):
            cy, cx = draw.uniform(0, H), draw.uniform(0, W)
            r = draw.uniform(4.0, 6.5)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            paint(mask, 5, _colour(g, 5, spread=35.0))
            edge &= ~mask

    label[edge] = IGNORE_INDEX
    image = image + 12.0 * torch.randn(3, H, W, generator=g)
    return image.round().clamp(0, 255).to(torch.uint8), label
