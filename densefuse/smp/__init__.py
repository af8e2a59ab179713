"""Scale equalizers for segmentation_models_pytorch (smp) models, without editing smp.

smp decoders fuse multi-level features as ``consumer(torch.cat([UP(P_1), ..., P_n], dim=1))``. A
*fusion site* is such a channel concat where at least one branch went through a smoothing
(bilinear / bicubic) resize that changed its size, named by the module that first receives the
concat (the *consumer*). :func:`equalize` attaches one :class:`SmpEqualizer` per site: a forward
pre-hook on the consumer (a function TorchScript can compile) replaces its first argument ``x`` by
``eq(x)``, so the equalizer observes while calibrating and applies its frozen affine in ``explicit`` mode. The equalizers live in
``model.scale_equalizers`` (an ``nn.ModuleDict``), so smp's own state_dict keys do not change and
smp / hub checkpoints still load (``strict=False`` then misses only ``scale_equalizers.*``).

Sites come from a table (:data:`TABLE`, one function per architecture); :func:`probe` runs one traced
forward (a ``TorchFunctionMode`` that records every channel concat, which inputs came out of an
interpolation, and which module first consumes the concat) to check the table and to handle
architectures that are not in it.

Example::

    model = smp.UPerNet(encoder_name="resnet34", encoder_weights=None, classes=150)
    densefuse.smp.equalize(model)
    densefuse.calibrate(model, train_batches)
"""
from __future__ import annotations

from .attach import SmpEqualizer, detach, equalize
from .build import ARCHS, build_smp_model
from .probe import probe, sites
from .report import report
from .sites import CONTAINER, SMOOTHING_MODES, TABLE, NotInTable, Site, table_sites

__all__ = [
    "ARCHS",
    "CONTAINER",
    "SMOOTHING_MODES",
    "NotInTable",
    "SmpEqualizer",
    "Site",
    "TABLE",
    "build_smp_model",
    "detach",
    "equalize",
    "probe",
    "report",
    "sites",
    "table_sites",
]
