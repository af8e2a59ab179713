"""Surface-normal task (``densefuse --task normals``): unit normals from a decoder's features, L1 or cosine
loss over valid pixels, angular-error metrics, flip TTA that mirrors the x component."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from densefuse.config import check_kwargs
from densefuse.data import Augment, Normalize, RandomHorizontalFlip, RandomScaleCrop, hflip
from densefuse.errors import ConfigError, did_you_mean
from densefuse.registry import PREDICTORS
from densefuse.tasks import DenseKey, Task, unwrap_outputs

from .config import NormalsConfig, NormalsSection
from .datasets import LIGHT, SCENE_CLASSES, SyntheticNormals, render_scene, scene_generator
from .loss import LOSSES, NormalLoss, normal_loss
from .metrics import METRIC_NAMES, THRESHOLDS, NormalMetrics, angular_errors, valid_normals

#: ``data.type`` -> accepted ``data.kwargs``
DATASET_KWARGS: dict[str, tuple[str, ...]] = {"synthetic": ("num_train", "num_val", "size", "seed", "focal")}

#: the batch keys of the task: the normal map (nearest: blending unit vectors shortens them; the fill, the
#: zero vector, marks padding as "no ground truth") and an optional explicit validity mask
NORMAL_KEYS = {"normal": DenseKey("nearest", 0.0), "normal_mask": DenseKey("nearest", 0.0)}


@PREDICTORS.register("normals")
class NormalsPredictor(nn.Module):
    """1x1 conv to 3 channels, then L2 normalization per pixel: unit normals."""

    def __init__(self, in_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.conv_normal = nn.Conv2d(in_channels, 3, 1)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.conv_normal(x), dim=1, eps=self.eps)


def flip_normals(batch: Mapping[str, Tensor], mask: Optional[Tensor] = None,
                 keys: Optional[Mapping[str, DenseKey]] = None) -> dict:
    """Mirror the samples where ``mask`` (B,) is true (all when None): the image and every dense key move
    as :func:`densefuse.data.hflip` moves them, and the mirrored normals' x component changes sign."""
    out = hflip(batch, mask, NORMAL_KEYS if keys is None else keys)
    if "normal" in out:
        n = out["normal"]
        m = torch.ones(n.shape[0], dtype=torch.bool, device=n.device) if mask is None else mask.to(n.device)
        sign = torch.ones(n.shape[0], 3, 1, 1, dtype=n.dtype, device=n.device)
        sign[m, 0] = -1.0
        out["normal"] = n * sign
    return out


class RandomNormalFlip(RandomHorizontalFlip):
    """:class:`~densefuse.data.RandomHorizontalFlip` for normal maps: a mirrored sample's ``n_x`` is negated
    (a flip is still its own inverse)."""

    def apply(self, batch: Mapping[str, Tensor], params: dict) -> dict:
        return flip_normals(batch, params["flip"], self.keys)

    def invert(self, batch: Mapping[str, Tensor], params: dict) -> dict:
        return flip_normals(batch, params["flip"], self.keys)


class NormalsTask(Task):
    """Surface normals (``normal`` (B,3,H,W) unit vectors in the camera frame, zero = no ground truth;
    metric mean angular error in degrees, lower is better).

    Settings: :class:`~densefuse_tasks.normals.config.NormalsConfig` (the ``normals:`` section: ``loss``).
    """

    name = "normals"
    default_config = "normals/synthetic_hrnet_r18"
    primary_metric = "mean"
    metric_direction = "min"
    table_metrics = METRIC_NAMES
    dense_keys = NORMAL_KEYS
    config_class = NormalsConfig

    # ------------------------------------------------------------------ config
    def _section(self) -> NormalsSection:
        """The ``normals:`` section (its defaults for a task made without a config)."""
        return self.cfg["normals"] if "normals" in self.cfg else NormalsSection()

    def validate_config(self, cfg: Mapping[str, Any]) -> None:
        """The dataset type and its kwargs (the ``normals`` keys are checked by their rules at load time)."""
        data = cfg["data"]
        if data["type"] not in DATASET_KWARGS:
            raise ConfigError(f"unknown data.type '{data['type']}' for the normals task"
                              f"{did_you_mean(str(data['type']), DATASET_KWARGS)}; available: "
                              f"{', '.join(DATASET_KWARGS)}")
        check_kwargs("data.kwargs", dict(data.get("kwargs") or {}), DATASET_KWARGS[data["type"]],
                     owner=f"data.type '{data['type']}'")
        predictor = ((cfg.get("model") or {}).get("decode_head") or {}).get("predictor")
        if (cfg.get("model") or {}).get("type", "encoder_decoder") == "encoder_decoder" and predictor != "normals":
            raise ConfigError(f"model.decode_head.predictor must be 'normals' for the normals task, got "
                              f"{predictor!r}")

    # ------------------------------------------------------------------ data
    def build_dataset(self, cfg: Mapping[str, Any], split: str) -> Dataset:
        """The rendered rooms of :class:`SyntheticNormals` (the only dataset of this task so far)."""
        data = cfg["data"]
        kwargs = dict(data.get("kwargs") or {})
        train = split == data["train_split"]
        n = kwargs.get("num_train", 256) if train else kwargs.get("num_val", 32)
        return SyntheticNormals(n, kwargs.get("size", [96, 128]), kwargs.get("seed", 0), split,
                                kwargs.get("focal", 0.9))

    def build_transform(self, cfg: Mapping[str, Any], train: bool) -> Callable[[dict], dict]:
        """Train: [scale-crop to ``data.crop_size``] -> [flip negating ``n_x``] -> normalize. Normals keep their
        values under scaling (a zoom changes no surface orientation in the camera frame); colour jitter is
        left out (the image's shading is what tells the normal). Eval: normalize."""
        data = cfg["data"]
        norm = Normalize(data["mean"], data["std"])
        if not train:
            return norm
        aug = data.get("augment") or {}
        ops: list = []
        scale = aug["scale_range"]
        if scale is not None and tuple(float(s) for s in scale) != (1.0, 1.0):
            ops.append(RandomScaleCrop(data["crop_size"], scale, self.dense_keys, image_fill=data["mean"]))
        if aug["flip"]:
            ops.append(RandomNormalFlip(0.5, self.dense_keys))
        return Augment(ops, norm)

    # ------------------------------------------------------------------ model
    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Any:
        """``model(image)`` with the output normalized again: the model's bilinear resize of the
        predictor's unit normals to the input size shortens them between pixels."""
        out = unwrap_outputs(model(batch["image"]))
        out["out"] = F.normalize(out["out"], dim=1, eps=1e-6)
        return out

    def merge_tta(self, outputs: Sequence[Any], flipped: Sequence[bool]) -> dict[str, Tensor]:
        """Mean of the test-time views (already mapped back to the original frame by the core, which
        un-mirrors the pixels but not the vectors), renormalized. A mirrored view's ``n_x`` is negated first."""
        outs = [unwrap_outputs(o)["out"] for o in outputs]
        if not outs:
            raise ValueError("merge_tta needs at least one view")
        if len(flipped) != len(outs):
            raise ValueError(f"{len(outs)} views but {len(flipped)} flip flags")
        sign = torch.tensor([-1.0, 1.0, 1.0])
        views = [o * sign.to(o).view(1, 3, 1, 1) if f else o for o, f in zip(outs, flipped)]
        return {"out": F.normalize(torch.stack(views).mean(0), dim=1, eps=1e-6)}

    # ------------------------------------------------------------------ loss, metric, outputs
    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """``normals.loss`` (l1 or cosine) over the valid pixels (see :func:`normal_loss`)."""
        if not hasattr(self, "_loss_fn"):
            align = bool((self.cfg.get("model") or {}).get("align_corners", False))
            self._loss_fn = NormalLoss(self._section()["loss"], align)
        return self._loss_fn(outputs, batch)

    def metric(self, cfg: Mapping[str, Any]) -> NormalMetrics:
        return NormalMetrics(bool((cfg.get("model") or {}).get("align_corners", False)))

    def predict(self, outputs: Any) -> Tensor:
        """Unit normals (B,3,H,W)."""
        return F.normalize(unwrap_outputs(outputs)["out"], dim=1, eps=1e-6)

    def visualize(self, batch: Mapping[str, Tensor], prediction: Tensor) -> Tensor:
        """uint8 (B,3,H,W) pictures: normals as colours (``(n + 1) / 2``), the ground truth below when the
        batch has one (pixels without ground truth black)."""
        pic = normals_to_rgb(prediction)
        gt = batch.get("normal")
        if gt is not None:
            gt, mask = gt.detach().cpu().float(), batch.get("normal_mask")
            mask = None if mask is None else mask.detach().cpu().float()
            if gt.shape[-2:] != prediction.shape[-2:]:
                gt = F.interpolate(gt, size=prediction.shape[-2:], mode="nearest")
                mask = None if mask is None else F.interpolate(mask, size=prediction.shape[-2:], mode="nearest")
            valid = valid_normals(gt, mask)[:, None]
            pic = torch.cat([pic, torch.where(valid, normals_to_rgb(gt), torch.zeros_like(pic))], dim=-2)
        return pic

    def save_prediction(self, prediction: Tensor, stem: Union[str, Path], image: Optional[Tensor] = None) -> list[Path]:
        """``<stem>.png``: the normals as an RGB picture, ``(n + 1) / 2 * 255`` per component (the usual
        encoding of normal maps); ``<stem>.npy``: the float32 (3,H,W) unit normals."""
        import numpy as np
        from PIL import Image

        stem = Path(stem)
        n = prediction.detach().float().cpu()
        while n.ndim > 3:
            n = n[0]
        png, npy = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".npy")
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(normals_to_rgb(n[None])[0].permute(1, 2, 0).numpy()).save(png)
        np.save(npy, n.numpy().astype(np.float32))
        return [png, npy]


def normals_to_rgb(normals: Tensor) -> Tensor:
    """uint8 (B,3,H,W) colours ``(n + 1) / 2 * 255`` of normals (B,3,H,W)."""
    n = normals.detach().float().cpu()
    return ((n.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


__all__ = [
    "LIGHT",
    "LOSSES",
    "METRIC_NAMES",
    "NORMAL_KEYS",
    "SCENE_CLASSES",
    "THRESHOLDS",
    "NormalLoss",
    "NormalMetrics",
    "NormalsPredictor",
    "NormalsTask",
    "RandomNormalFlip",
    "SyntheticNormals",
    "angular_errors",
    "flip_normals",
    "normal_loss",
    "normals_to_rgb",
    "render_scene",
    "scene_generator",
    "valid_normals",
]
