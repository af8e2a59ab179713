"""Decoders (return fused features) and predictors (make the task output).

Every decoder that concatenates branches does it through :class:`densefuse.Fusion`. Importing this
package registers the built-in decoders in :data:`densefuse.registry.HEADS` and the predictors in
:data:`densefuse.registry.PREDICTORS`; the head modules import the registry, never this package.
"""
from ..layers import PPM
from ..registry import HEADS, PREDICTORS
from .aspp import ASPPHead, DepthwiseSeparableASPPHead
from .base import BRANCHES, DecodeHead
from .fcn import FCNHead
from .predictors import ClsSeg
from .psp import PSPHead
from .uper import UPerHead

__all__ = [
    "ASPPHead",
    "BRANCHES",
    "ClsSeg",
    "DecodeHead",
    "DepthwiseSeparableASPPHead",
    "FCNHead",
    "HEADS",
    "PPM",
    "PREDICTORS",
    "PSPHead",
    "UPerHead",
]
