"""The seg task's settings: its own ``seg:`` section and the keys it reads in the core's ``data`` and ``model``."""
from __future__ import annotations

from typing import Any, Optional

from densefuse.config import Rule, Section, configclass, setting, subsection
from densefuse.config.schema import Origin
from densefuse.config.sections import POS_INT, CoreConfig, DataSection, ModelSection
from densefuse.errors import ConfigError


@configclass
class SegSection(Section):
    avg_non_ignore: bool = setting(False, Rule("bool"),
                                   "cross-entropy averaged over non-ignored pixels instead of all pixels (mmseg's option)")
    overlay_alpha: float = setting(0.5, Rule("number", min=0, max=1), "opacity of the class colours in pictures")


@configclass
class SegData(DataSection):
    pipeline: str = setting("batch", Rule("str", choices=("batch", "mmseg")),
                            "`batch`: crop, then rescale and crop on the training device; `mmseg`: mmseg's per-sample "
                            "RandomResize, RandomCrop(cat_max_ratio), flip, pad and test-time keep-ratio resize")
    scale: Optional[list] = setting(None, Rule("list", nullable=True, length=2, item=POS_INT),
                                    "`mmseg` pipeline: RandomResize reference scale `[long, short]`; null = the dataset's")
    ratio_range: list = setting([0.5, 2.0], Rule("list", length=2, item=Rule("number", gt=0)),
                                "`mmseg` pipeline: RandomResize ratio range")
    cat_max_ratio: float = setting(0.75, Rule("number", gt=0, max=1),
                                   "`mmseg` pipeline: re-draw a crop one class dominates (1.0 disables)")
    test_scale: Optional[list] = setting(None, Rule("list", nullable=True, item=POS_INT),
                                         "`mmseg` pipeline: test Resize `[long, short]`; null = the dataset's, [] = none")

    def check(self, origin: Origin) -> None:
        low, high = self.ratio_range
        if not 0 < float(low) <= float(high):
            raise ConfigError(f"data.ratio_range must be [low, high] with 0 < low <= high, got {list(self.ratio_range)!r}")
        if self.test_scale is not None and len(self.test_scale) not in (0, 2):
            raise ConfigError(f"data.test_scale must be [long, short] positive ints, null (the dataset's) or [], "
                              f"got {list(self.test_scale)!r}")


@configclass
class SegModel(ModelSection):
    # the depth model's keys, declared so that a segmentation config naming them is told why they do not apply
    neck: Any = setting(None, Rule("any", nullable=True), "the depth model's (GEDepth); refused by segmentation")
    init: Any = setting(None, Rule("any", nullable=True), "the depth model's (GEDepth); refused by segmentation")

    def check(self, origin: Origin) -> None:
        if self.num_classes < 2:
            raise ConfigError(f"model.num_classes must be at least 2 for segmentation, got {self.num_classes}")
        for key in ("neck", "init"):
            if self[key] is not None:
                raise ConfigError(f"model.{key} is for the depth model (GEDepth) and segmentation would ignore it: "
                                  f"remove it or set model.{key}=null, got {self[key]!r}")


@configclass
class SegConfig(CoreConfig):
    model: SegModel = subsection(SegModel, "what is built")
    data: SegData = subsection(SegData, "what it trains and evaluates on")
    seg: SegSection = subsection(SegSection, "segmentation's own settings")
