"""Data utilities shared by tasks: decoding with clear errors, per-sample ops (``ops``) and batched augmentation
over dense keys, the random-draw helper, loaders."""
from .augment import (
    SEG_KEYS,
    Augment,
    GeometricOp,
    Normalize,
    Op,
    PhotoMetricDistortion,
    RandomHorizontalFlip,
    RandomScaleCrop,
    build_augmentation,
    dense_items,
    hflip,
    normalize,
    scale_crop,
)
from .io import IGNORE_INDEX, check_label, check_same_size, label_counts, read_image, read_label
from .loader import InfiniteSampler, Loader, RandomCropPad, ShardSampler, build_loader
from .ops import Draw

__all__ = [
    "IGNORE_INDEX",
    "SEG_KEYS",
    "Augment",
    "Draw",
    "GeometricOp",
    "InfiniteSampler",
    "Loader",
    "Normalize",
    "Op",
    "PhotoMetricDistortion",
    "RandomCropPad",
    "RandomHorizontalFlip",
    "RandomScaleCrop",
    "ShardSampler",
    "build_augmentation",
    "build_loader",
    "check_label",
    "label_counts",
    "check_same_size",
    "dense_items",
    "hflip",
    "normalize",
    "read_image",
    "read_label",
    "scale_crop",
]
