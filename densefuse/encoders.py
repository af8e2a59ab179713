"""timm ``features_only`` encoders returning NCHW feature lists with their channels and strides."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from torch import Tensor, nn

from .errors import ConfigError

#: timm families whose features come out NHWC or need a fixed image size unless told otherwise.
_ANY_SIZE_KWARGS = {"swin": {"dynamic_img_size": True}}


class TimmEncoder(nn.Module):
    """A timm backbone as a list of NCHW features.

    Args:
        name: timm model name (``resnet50``, ``convnext_tiny``, ``swin_tiny_patch4_window7_224``, ...).
        out_indices: which feature levels to return (timm's indices; resnet 1..4 = layer1..4).
        output_stride: 8 or 16 dilates the last stages (resnet, convnext); ``None`` keeps 32.
        pretrained: path to a local ``.pth``/``.safetensors`` classification checkpoint; ``None`` = random
            init. Nothing is ever downloaded.
        **kwargs: passed to ``timm.create_model`` (``drop_path_rate``, ``img_size``, ...).
    """

    def __init__(
        self,
        name: str,
        out_indices: Sequence[int] = (1, 2, 3, 4),
        output_stride: Optional[int] = None,
        pretrained: Optional[str] = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        import timm  # deferred: importing timm costs ~1.5 s, which CLI error paths should not pay

        if not timm.is_model(name):
            raise ConfigError(f"unknown timm encoder 'model.encoder.name: {name}'")
        extra: dict[str, Any] = {}
        for prefix, kw in _ANY_SIZE_KWARGS.items():
            if name.startswith(prefix):
                extra.update(kw)
        extra.update(kwargs)
        if output_stride not in (None, 32):
            if output_stride not in (8, 16):
                raise ConfigError(f"model.encoder.output_stride must be 8, 16 or 32, got {output_stride}")
            extra["output_stride"] = output_stride
        if pretrained is not None:
            path = Path(pretrained).expanduser()
            if not path.is_file():
                raise ConfigError(f"pretrained weights not found: {pretrained} (model.encoder.pretrained)")
            extra.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        try:
            self.model = timm.create_model(name, features_only=True, out_indices=tuple(out_indices), **extra)
        except TypeError as e:
            if "output_stride" in str(e):
                raise ConfigError(f"encoder '{name}' does not support output_stride={output_stride}") from None
            raise ConfigError(f"encoder '{name}': {e}") from None
        info = self.model.feature_info
        self.channels: list[int] = list(info.channels())
        self.strides: list[int] = list(info.reduction())
        self._nhwc = getattr(self.model, "output_fmt", "NCHW") == "NHWC"
        self.name = name

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = self.model(x)
        if self._nhwc:
            feats = [f.permute(0, 3, 1, 2).contiguous() for f in feats]
        return list(feats)
