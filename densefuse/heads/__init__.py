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
from .hrnet import HRNetHead
from .predictors import ClsSeg
from .psp import PSPHead
from .uper import UPerHead

#: class decorator adding a decoder under a ``model.decode_head.type`` name (``HEADS.register``)
register_head = HEADS.register
#: class decorator adding a predictor under a ``model.decode_head.predictor`` name
register_predictor = PREDICTORS.register

__all__ = [
    "ASPPHead",
    "BRANCHES",
    "ClsSeg",
    "DecodeHead",
    "DepthwiseSeparableASPPHead",
    "FCNHead",
    "HRNetHead",
    "HEADS",
    "PPM",
    "PREDICTORS",
    "PSPHead",
    "UPerHead",
    "register_head",
    "register_predictor",
]
