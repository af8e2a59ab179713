"""Decode heads. Every head that concatenates branches does it through :class:`densefuse.Fusion`."""
from __future__ import annotations

from typing import Callable

from torch import nn

HEADS: dict[str, type[nn.Module]] = {}


def register_head(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator adding a head to :data:`HEADS` under ``name`` (the config's ``type``)."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        HEADS[name] = cls
        return cls

    return deco


from .aspp import ASPPHead, DepthwiseSeparableASPPHead  # noqa: E402
from .fcn import FCNHead  # noqa: E402
from .psp import PSPHead  # noqa: E402
from .uper import PPM, UPerHead  # noqa: E402

__all__ = ["ASPPHead", "DepthwiseSeparableASPPHead", "FCNHead", "HEADS", "PPM", "PSPHead", "UPerHead", "register_head"]
