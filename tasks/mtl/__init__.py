"""The composite multi-task task (``densefuse train --task mtl``: one encoder, a scale-equalized decoder per
task) and its building blocks: loss weighting, Δm and the joint datasets (NYUv2, Cityscapes seg + depth, a
synthetic scene with segmentation, depth and surface normals)."""
from .datasets import CityscapesMTL, NYUv2, SyntheticScene, disparity_to_depth, read_camera
from .delta import delta_m, paired_delta_m, relative_gains
from .model import DepthPredictor, MTLModel, build_mtl_model
from .task import MTLMetric, MTLTask, RandomDepthScaleCrop
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
    "DepthPredictor",
    "MTLMetric",
    "MTLModel",
    "MTLTask",
    "RandomDepthScaleCrop",
    "build_mtl_model",
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
