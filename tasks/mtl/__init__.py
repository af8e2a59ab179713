"""Multi-task building blocks: loss weighting, Δm and the joint datasets (NYUv2, Cityscapes seg + depth,
a synthetic scene with segmentation, depth and surface normals). The composite ``mtl`` task that trains
one encoder with a decoder per task is built on these."""
from .datasets import CityscapesMTL, NYUv2, SyntheticScene, disparity_to_depth, read_camera
from .delta import delta_m, paired_delta_m, relative_gains
from .weighting import (
    WEIGHTINGS,
    DWAWeighting,
    EqualWeighting,
    FixedWeighting,
    LossWeighting,
    UncertaintyWeighting,
    build_weighting,
)

__all__ = [
    "CityscapesMTL",
    "NYUv2",
    "SyntheticScene",
    "WEIGHTINGS",
    "DWAWeighting",
    "EqualWeighting",
    "FixedWeighting",
    "LossWeighting",
    "UncertaintyWeighting",
    "build_weighting",
    "delta_m",
    "disparity_to_depth",
    "paired_delta_m",
    "read_camera",
    "relative_gains",
]
