"""Monocular depth task (``densefuse --task depth``): GEDepth-style ground embedding, DenseDepth decoder
with scale-equalized up-fusions, SILog loss and the nine KITTI metrics."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from densefuse.config import check_kwargs
from densefuse.data import Normalize
from densefuse.errors import ConfigError, did_you_mean
from densefuse.tasks import DenseKey, Task, unwrap_outputs

from .config import DepthConfig, DepthSection
from .datasets import KittiEigen, SyntheticRoad, read_depth_png, read_split
from .geometry import (
    Camera,
    adapt_ground,
    ground_depth,
    inverse_ground,
    pitched_normal,
    read_kitti_calib,
    slope_targets,
)
from .heads import DenseDepthHead, LevelSumHead, conv_lrelu_block
from .loss import DepthLoss, silog_loss
from .metrics import METRIC_NAMES, DepthMetrics, crop_mask
from .model import MODEL_TYPE, GEDepth, build_depth_model, check_head_config, check_neck_config, expand_input_conv
from .transforms import Compose, KBCrop, TrainPipeline

#: ``data.type`` -> accepted ``data.kwargs``
DATASET_KWARGS: dict[str, tuple[str, ...]] = {
    "synthetic": ("num_train", "num_val", "size", "seed", "max_pitch", "focal"),
    "kitti": ("raw_dir", "gt_dir", "lidar_plane", "kb_crop"),
}
EVAL_CROPS = ("garg", "eigen", "none", None)


def depth_colormap(depth: Tensor, max_depth: float = 80.0, min_depth: float = 1.0) -> Tensor:
    """uint8 (B,3,H,W) picture of depth maps (B,1,H,W) or (B,H,W): log-scaled, near bright (magma);
    pixels without depth (<= 0) black."""
    from matplotlib import colormaps

    d = depth[:, 0] if depth.ndim == 4 else depth
    d = d.detach().float().cpu()
    x = (torch.log(d.clamp(min_depth, max_depth) / min_depth) / np.log(max_depth / min_depth)).clamp(0, 1)
    rgb = torch.from_numpy(colormaps["magma"](1.0 - x.numpy())[..., :3]).float()
    rgb = torch.where((d > 0)[..., None], rgb, torch.zeros_like(rgb))
    return (rgb * 255).round().to(torch.uint8).permute(0, 3, 1, 2).contiguous()


def kitti_date_dir(image: Path) -> Optional[Path]:
    """The date folder of an image in a KITTI raw tree (``<date>/<drive>/image_0X/data/<frame>.png``) when it
    holds ``calib_cam_to_cam.txt``; None otherwise."""
    parents = image.resolve().parents
    if len(parents) > 3 and (parents[3] / "calib_cam_to_cam.txt").is_file():
        return parents[3]
    return None


class DepthTask(Task):
    """Monocular depth (``depth`` (B,1,H,W) metres, 0 = no ground truth; metric abs_rel, lower is better)."""

    name = "depth"
    default_config = "depth/gedepth-vanilla_r18_1xb4-300_synthetic-64x192"
    primary_metric = "abs_rel"
    metric_direction = "min"
    #: the columns of `densefuse compare` (the paper's Table 5: all nine KITTI metrics)
    table_metrics = METRIC_NAMES
    predict_calib = True
    dense_keys = {
        "depth": DenseKey("nearest", 0.0),
        "ground": DenseKey("bilinear", 0.0),
        "ground_inv": DenseKey("bilinear", 0.0),  # 1/G of the unclipped plane (affine: bilinear is exact)
        "slope": DenseKey("nearest", 255),
    }
    config_class = DepthConfig

    # ------------------------------------------------------------------ config
    def _section(self, cfg: Optional[Mapping[str, Any]] = None) -> DepthSection:
        """The ``depth:`` section (its defaults for a task made without a config)."""
        cfg = self.cfg if cfg is None else cfg
        return cfg["depth"] if "depth" in cfg else DepthSection()

    def validate_config(self, cfg: Any) -> None:
        """The model type, the depth head and neck, the dataset's keys: once, when the config is loaded."""
        model = cfg["model"]
        if model["type"] != MODEL_TYPE:
            raise ConfigError(f"model.type must be '{MODEL_TYPE}' for the depth task, got '{model.get('type')}'")
        check_head_config(dict(model.get("decode_head") or {}))
        check_neck_config(model.get("neck"))
        data = cfg["data"]
        if data["type"] not in DATASET_KWARGS:
            raise ConfigError(f"unknown data.type '{data['type']}' for the depth task"
                              f"{did_you_mean(str(data['type']), DATASET_KWARGS)}; available: {', '.join(DATASET_KWARGS)}")
        check_kwargs("data.kwargs", dict(data.get("kwargs") or {}), DATASET_KWARGS[data["type"]],
                     owner=f"data.type '{data['type']}'")
        if data["type"] == "kitti" and not data.get("root"):
            raise ConfigError("data.root must be set for data.type 'kitti' (the folder holding the raw and "
                              "ground-truth folders and the split files)")

    # ------------------------------------------------------------------ data
    def build_dataset(self, cfg: Mapping[str, Any], split: str) -> Dataset:
        """The synthetic road scenes or KITTI Eigen; the training split gets :class:`TrainPipeline`."""
        data, d = cfg["data"], self._section(cfg)
        kwargs = dict(data["kwargs"] or {})
        train = split == data["train_split"]
        aug = data["augment"]
        pipeline = TrainPipeline(data["crop_size"], self.dense_keys, aug["scale_range"], d["rotate_deg"], aug["flip"],
                                 aug["photometric"]) if train else None
        if data["type"] == "synthetic":
            n = kwargs.get("num_train", 512) if train else kwargs.get("num_val", 64)
            return SyntheticRoad(n, kwargs.get("size", [96, 320]), kwargs.get("seed", 0), split, d["camera_height"],
                                 kwargs.get("max_pitch", 3.0), kwargs.get("focal", 0.6), d["max_depth"], pipeline)
        root = Path(data["root"])
        split_file = Path(split) if Path(split).is_absolute() else root / split
        return KittiEigen(split_file, root / kwargs.get("raw_dir", "input"), root / kwargs.get("gt_dir", "gt_depth"),
                          kwargs.get("lidar_plane", 1.65), d["camera_height"], kwargs.get("kb_crop", [352, 1216]),
                          pipeline, self.dense_keys)

    def build_transform(self, cfg: Mapping[str, Any], train: bool) -> Callable[[dict], dict]:
        """Normalization only: the geometric pipeline already ran per sample on the data workers."""
        return Normalize(cfg["data"]["mean"], cfg["data"]["std"])

    # ------------------------------------------------------------------ model
    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        return build_depth_model(cfg)

    def _ground_for(self, batch: Mapping[str, Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The clipped ground depth (input channel) and the unclipped ``1/G`` (what the adaptive ground
        bends) of a batch: its own, or those of ``depth.predict_camera``."""
        d = self._section()
        if d["ground_embedding"] == "none":
            return None, None
        if "ground" in batch:
            return batch["ground"], batch.get("ground_inv")
        cam = d["predict_camera"]
        img = batch["image"]
        if cam is None:
            raise ConfigError("this depth model needs a ground embedding: the input has none, so set "
                              "depth.predict_camera {fx, fy, cx, cy, pitch} (pixels, degrees) for these images")
        K = torch.tensor([[cam["fx"], 0.0, cam["cx"]], [0.0, cam["fy"], cam["cy"]], [0.0, 0.0, 1.0]])
        n = pitched_normal(float(cam.get("pitch", 0.0)))
        g = ground_depth(K, n, d["camera_height"], img.shape[-2:])
        inv = inverse_ground(K, n, d["camera_height"], img.shape[-2:])
        return tuple(m.to(img.device)[None, None].expand(img.shape[0], 1, -1, -1) for m in (g, inv))  # type: ignore

    def forward(self, model: nn.Module, batch: Mapping[str, Tensor]) -> Any:
        """``model(image, ground, ground_inv)``. Flip TTA (GEDepth's) is the core's ``eval.tta.flip``: it
        flips the image and every per-pixel key with it, ``ground`` included, and merges with :meth:`merge_tta`
        (the base class's mean of the views, as GEDepth averages the un-flipped prediction with the plain one)."""
        ground, inv = self._ground_for(batch)
        if inv is None:
            return model(batch["image"], ground)
        return model(batch["image"], ground, inv)

    def predict_sample(self, image: Tensor, path: Union[str, Path], calib: Optional[Union[str, Path]] = None) -> dict:
        """What ``densefuse predict`` feeds the model for one image (unbatched tensors).

        With ``calib`` (``--calib``, a KITTI raw date folder holding ``calib_cam_to_cam.txt`` and
        ``calib_velo_to_cam.txt``), or for a KITTI-trained model (``data.type: kitti``) whose image sits in a
        raw tree (``<date>/<drive>_sync/image_02/data/<frame>.png``, the calibration two folders above the
        drive), the ground embedding comes from that camera on the full image (``data.kwargs.lidar_plane``),
        then the KB crop (``data.kwargs.kb_crop``, KITTI-trained models) cuts image and embedding alike, as
        for evaluation. Otherwise only the image: the ground comes from ``depth.predict_camera``."""
        from .transforms import kb_crop

        data, d = self.cfg["data"], self._section()
        kwargs = dict(data.get("kwargs") or {})
        date_dir = Path(calib) if calib is not None else kitti_date_dir(Path(path)) if data["type"] == "kitti" else None
        if date_dir is None or d["ground_embedding"] == "none":
            return {"image": image}
        cam = read_kitti_calib(date_dir, kwargs.get("lidar_plane", 1.65))
        size = tuple(image.shape[-2:])
        sample = {"image": image, "ground": cam.ground(size)[None], "ground_inv": cam.inverse_ground(size)[None]}
        crop = kwargs.get("kb_crop", [352, 1216]) if data["type"] == "kitti" else None
        if crop and size[0] >= crop[0] and size[1] >= crop[1]:
            sample = kb_crop(sample, self.dense_keys, crop)
        return sample

    # ------------------------------------------------------------------ loss, metric, outputs
    def loss(self, outputs: Any, batch: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """SILog (GEDepth's SigLoss) plus, in adaptive mode, 0.08 x slope cross-entropy."""
        d = self._section()
        if not hasattr(self, "_loss_fn"):
            self._loss_fn = DepthLoss(d["slope_loss_weight"], d["silog_lambda"])
        return self._loss_fn(outputs, batch)

    def metric(self, cfg: Mapping[str, Any]) -> DepthMetrics:
        d = self._section(cfg)
        crop = None if d["eval_crop"] in (None, "none") else d["eval_crop"]
        return DepthMetrics(d["min_depth"], d["max_depth"], crop)

    def predict(self, outputs: Any) -> Tensor:
        """Depth (B,1,H,W) in metres."""
        return unwrap_outputs(outputs)["out"]

    def visualize(self, batch: Mapping[str, Tensor], prediction: Tensor) -> Tensor:
        """uint8 pictures (B,3,H,W): the colour-mapped prediction, with the ground truth below it when the
        batch has one (so the work dir's picture reads image / prediction / ground truth)."""
        max_depth = float(self._section()["max_depth"])
        pic = depth_colormap(prediction, max_depth)
        gt = batch.get("depth")
        if gt is not None:
            gt = gt.detach().cpu()
            if gt.shape[-2:] != prediction.shape[-2:]:
                gt = F.interpolate(gt, size=prediction.shape[-2:], mode="nearest")
            pic = torch.cat([pic, depth_colormap(gt, max_depth)], dim=-2)
        return pic

    def save_prediction(self, prediction: Tensor, stem: Union[str, Path], image: Optional[Tensor] = None) -> list[Path]:
        """``<stem>.png``: KITTI-style 16-bit depth (metres x 256, 0 = none); ``<stem>_vis.png``: colour map.
        ``image`` (the input picture, passed by ``densefuse predict``) is not needed: the colour map stands alone."""
        from PIL import Image

        stem = Path(stem)
        d = prediction.detach().float().cpu()
        while d.ndim > 2:
            d = d[0]
        raw, vis = stem.with_name(stem.name + ".png"), stem.with_name(stem.name + "_vis.png")
        raw.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((d * 256).round().clamp(0, 65535).numpy().astype(np.uint16)).save(raw)
        colour = depth_colormap(d[None], float(self._section()["max_depth"]))[0]
        Image.fromarray(colour.permute(1, 2, 0).numpy()).save(vis)
        return [raw, vis]


__all__ = [
    "METRIC_NAMES",
    "Camera",
    "Compose",
    "DenseDepthHead",
    "DepthLoss",
    "DepthMetrics",
    "DepthTask",
    "GEDepth",
    "KBCrop",
    "KittiEigen",
    "LevelSumHead",
    "SyntheticRoad",
    "TrainPipeline",
    "adapt_ground",
    "build_depth_model",
    "conv_lrelu_block",
    "crop_mask",
    "depth_colormap",
    "expand_input_conv",
    "ground_depth",
    "inverse_ground",
    "pitched_normal",
    "read_depth_png",
    "read_kitti_calib",
    "read_split",
    "silog_loss",
    "slope_targets",
]
