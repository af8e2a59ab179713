"""The depth task's settings: its own ``depth:`` section and the depth model's keys of ``model``."""
from __future__ import annotations

from typing import Optional

from densefuse.config import Rule, Section, check_kwargs, configclass, setting, subsection
from densefuse.config.schema import Origin
from densefuse.config.sections import CoreConfig, ModelSection
from densefuse.errors import ConfigError


@configclass
class DepthSection(Section):
    ground_embedding: str = setting("vanilla", Rule("str", choices=("vanilla", "adaptive", "none")),
                                    "GEDepth's ground embedding: `vanilla`, `adaptive` or `none`")
    camera_height: float = setting(1.65, Rule("number"), "metres; the slope formula's h (and the synthetic camera's)")
    min_depth: float = setting(1.0e-3, Rule("number"), "predictions and metrics are clipped to [min, max]")
    max_depth: float = setting(80.0, Rule("number"), "metres")
    eval_crop: str = setting("garg", Rule("str", choices=("garg", "eigen", "none")),
                             "KITTI evaluation crop: `garg`, `eigen` or `none`")
    slope_loss_weight: float = setting(0.08, Rule("number"), "adaptive embedding: weight of the slope loss")
    slope_bins: int = setting(11, Rule("int"), "adaptive embedding: slope classes (odd, >= 3)")
    slope_range: float = setting(5.0, Rule("number"), "adaptive embedding: degrees covered by the slope classes")
    silog_lambda: float = setting(0.85, Rule("number"), "SILog loss variance weight")
    rotate_deg: float = setting(2.5, Rule("number"), "training rotation range (degrees)")
    predict_camera: Optional[dict] = setting(None, Rule("mapping", nullable=True),
                                             "`{fx, fy, cx, cy, pitch}`: ground embedding for images without one",
                                             open=True)

    def check(self, origin: Origin) -> None:
        if not 0 < float(self.min_depth) < float(self.max_depth):
            raise ConfigError(f"depth.min_depth and depth.max_depth need 0 < min < max, got "
                              f"{self.min_depth} and {self.max_depth}")
        if float(self.camera_height) <= 0:
            raise ConfigError(f"depth.camera_height must be positive, got {self.camera_height}")
        if int(self.slope_bins) < 3 or int(self.slope_bins) % 2 == 0:
            raise ConfigError(f"depth.slope_bins must be an odd number >= 3, got {self.slope_bins}")
        cam = self.predict_camera
        if cam is not None:
            missing = [k for k in ("fx", "fy", "cx", "cy") if k not in cam]
            check_kwargs("depth.predict_camera", cam, ("fx", "fy", "cx", "cy", "pitch"))
            if missing:
                raise ConfigError(f"depth.predict_camera lacks {', '.join(missing)}")


@configclass
class DepthModel(ModelSection):
    neck: Optional[dict] = setting(None, Rule("mapping", nullable=True),
                                   "`{type: hahi, embedding_dim, num_heads, num_points, dropout}` (DepthFormer's HAHI, "
                                   "as GEDepth's Swin-L rows) or null", open=True)
    init: Optional[str] = setting(None, Rule("str", nullable=True, choices=("gedepth", "torch", None)),
                                  "`gedepth` (mmcv's initialisation of decoder and necks) or `torch`; null: torch")


@configclass
class DepthConfig(CoreConfig):
    model: DepthModel = subsection(DepthModel, "what is built")
    depth: DepthSection = subsection(DepthSection, "depth's own settings")
