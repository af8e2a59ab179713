"""Data utilities shared by tasks: decoding with clear errors, batch augmentation, samplers."""
from .augment import (
    Normalize,
    PhotoMetricDistortion,
    RandomHorizontalFlip,
    RandomScaleCrop,
    build_augmentation,
    hflip,
    normalize,
    scale_crop,
)
from .io import IGNORE_INDEX, check_label, check_same_size, read_image, read_label
from .loader import InfiniteSampler, RandomCropPad, ShardSampler, build_loader, pad_to

__all__ = [
    "IGNORE_INDEX",
    "InfiniteSampler",
    "Normalize",
    "PhotoMetricDistortion",
    "RandomCropPad",
    "RandomHorizontalFlip",
    "RandomScaleCrop",
    "ShardSampler",
    "build_augmentation",
    "build_loader",
    "check_label",
    "check_same_size",
    "hflip",
    "normalize",
    "pad_to",
    "read_image",
    "read_label",
    "scale_crop",
]
