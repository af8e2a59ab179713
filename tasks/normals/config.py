"""The normals task's settings: its own ``normals:`` section."""
from __future__ import annotations

from densefuse.config import Rule, Section, configclass, setting, subsection
from densefuse.config.sections import CoreConfig

from .loss import LOSSES


@configclass
class NormalsSection(Section):
    loss: str = setting("l1", Rule("str", choices=LOSSES), "`l1` or `cosine` (1 - cos of the angle)")


@configclass
class NormalsConfig(CoreConfig):
    normals: NormalsSection = subsection(NormalsSection, "surface normals' own settings")
