"""Depth datasets: a procedural road scene (the default, no download) and KITTI Eigen in the official layout.

Samples are dicts: ``image`` uint8 (3,H,W), ``depth`` float32 (1,H,W) metres (0 = no ground truth),
``ground`` float32 (1,H,W) flat-ground depth (0 = no ground), ``ground_inv`` float32 (1,H,W) ``1/G`` of the
unclipped plane (negative above the horizon; what the adaptive ground bends), ``slope`` int64 (1,H,W) slope class
(255 = ignore), computed from depth and ground before any augmentation (as GEDepth precomputes it).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from densefuse.data.check import missing_file
from densefuse.data.io import read_image
from densefuse.errors import DataError

from .geometry import Camera, ground_depth, inverse_ground, pitched_normal, read_kitti_calib, slope_targets

PathLike = Union[str, Path]
Transform = Optional[Callable[[dict], dict]]


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % 2**63
    return h


class SyntheticRoad(Dataset):
    """A procedural road scene, deterministic per (seed, split, index).

    A pinhole camera ``camera_height`` metres above a flat ground plane, pitched by ``U(-max_pitch,
    max_pitch)`` degrees per image (so the horizon moves and the ground depth is not guessable from
    the row alone), looks at a textured road with lane marks, grass verges, cars standing on the road and
    buildings along it, and sky (no depth). The ground truth is sparse and LiDAR-like (about a third of
    the pixels, on alternate rows, up to ``max_range`` metres). The ground embedding is exact here: on
    road pixels it equals the true depth.
    """

    def __init__(self, num: int, size: Sequence[int] = (96, 320), seed: int = 0, split: str = "train",
                 camera_height: float = 1.65, max_pitch: float = 3.0, focal: float = 0.6, max_range: float = 80.0,
                 transform: Transform = None) -> None:
        self.num, self.size, self.seed, self.split = int(num), (int(size[0]), int(size[1])), int(seed), split
        self.camera_height, self.max_pitch, self.max_range = float(camera_height), float(max_pitch), float(max_range)
        H, W = self.size
        f = float(focal) * W
        self.K = torch.tensor([[f, 0.0, (W - 1) / 2], [0.0, f, 0.42 * H], [0.0, 0.0, 1.0]], dtype=torch.float64)
        self.transform = transform

    def __len__(self) -> int:
        return self.num

    def camera(self, index: int) -> Camera:
        """The camera of image ``index`` (its pitch is drawn from the same seed as the scene)."""
        g = self._generator(index)
        pitch = (float(torch.rand((), generator=g, dtype=torch.float64)) * 2 - 1) * self.max_pitch
        return Camera(self.K, pitched_normal(pitch), self.camera_height)

    def _generator(self, index: int) -> torch.Generator:
        split_id = sum(ord(c) * (i + 1) for i, c in enumerate(self.split))
        return torch.Generator().manual_seed(_seed(self.seed, split_id, index))

    def render(self, index: int) -> dict[str, Tensor]:
        """Image and dense ground truth of scene ``index`` (no augmentation)."""
        g = self._generator(index)
        pitch = (float(torch.rand((), generator=g, dtype=torch.float64)) * 2 - 1) * self.max_pitch

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=g, dtype=torch.float64)

        H, W = self.size
        h = self.camera_height
        p = math.radians(pitch)
        # camera -> world rotation (x right, y down, z forward); the camera looks down by `pitch`
        rot = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(p), math.sin(p)], [0.0, -math.sin(p), math.cos(p)]],
                           dtype=torch.float64)
        v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
        rays = torch.stack([u, v, torch.ones_like(u)], -1) @ torch.linalg.inv(self.K).T  # camera rays, z = 1
        d = rays @ rot.T  # world directions; hit point = t * d, camera depth = t
        inf = torch.full((H, W), float("inf"), dtype=torch.float64)
        t_ground = torch.where(d[..., 1] > 1e-9, h / d[..., 1].clamp_min(1e-9), inf)
        # boxes standing on the ground: cars on the road, buildings along it
        n_cars, n_bld = 2 + int(rand(()) * 5), 4 + int(rand(()) * 6)
        lane = torch.tensor([-3.5, 0.0, 3.5], dtype=torch.float64)[(rand(n_cars) * 3).long().clamp_max(2)]
        cx = torch.cat([lane + (rand(n_cars) - 0.5) * 0.8, torch.sign(rand(n_bld) - 0.5) * (9 + rand(n_bld) * 8)])
        cz = torch.cat([6 + rand(n_cars) * 50, 8 + rand(n_bld) * 60])
        half_w = torch.cat([0.85 + rand(n_cars) * 0.15, 2 + rand(n_bld) * 3])
        half_l = torch.cat([2 + rand(n_cars) * 0.4, 2 + rand(n_bld) * 6])
        height = torch.cat([1.4 + rand(n_cars) * 0.4, 3 + rand(n_bld) * 9])
        colours = torch.cat([rand(n_cars, 3) * 200 + 30, 90 + rand(n_bld, 3) * 120])
        lo = torch.stack([cx - half_w, h - height, cz - half_l], -1)  # (N, 3)
        hi = torch.stack([cx + half_w, torch.full_like(cx, h), cz + half_l], -1)
        dd = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)[None]  # (1,H,W,3)
        t1, t2 = lo[:, None, None] / dd, hi[:, None, None] / dd
        tmin_axis, tmax = torch.minimum(t1, t2), torch.maximum(t1, t2).amin(-1)
        tmin, face = tmin_axis.max(-1)
        hit = (tmax >= tmin) & (tmin > 0)
        t_box = torch.where(hit, tmin, torch.full_like(tmin, float("inf")))
        box_t, box_id = t_box.min(0) if len(lo) else (inf, torch.zeros(H, W, dtype=torch.long))
        t = torch.minimum(t_ground, box_t)
        on_box = box_t < t_ground
        on_ground = ~on_box & torch.isfinite(t_ground)
        pts = t[..., None] * d
        # colours: sky gradient, textured road / verge, shaded boxes
        sky = torch.stack([110 + 60 * v / H, 150 + 50 * v / H, 230 - 10 * v / H], -1)
        x, z = pts[..., 0], pts[..., 2]
        road = (x.abs() < 5.25)
        asphalt = 95 + 15 * torch.sin(2.1 * x) * torch.sin(1.7 * z) + 20 * (rand(()) - 0.5)
        ground = torch.stack([asphalt, asphalt, asphalt + 5], -1)
        verge = torch.stack([70 + 20 * torch.sin(3 * z), 120 + 25 * torch.sin(2.3 * x + z), 60 + 0 * x], -1)
        ground = torch.where(road[..., None], ground, verge)
        marks = ((x.abs() - 1.75).abs() < 0.1) & (torch.remainder(z, 6.0) < 3.0)
        ground = torch.where(marks[..., None], torch.full_like(ground, 235.0), ground)
        shade = torch.tensor([0.7, 1.15, 1.0], dtype=torch.float64)
        face_id = face.gather(0, box_id[None])[0]
        box_col = colours[box_id] * shade[face_id][..., None]
        stripes = 1 + 0.15 * torch.sin(4 * pts[..., 1])
        box_col = box_col * stripes[..., None]
        img = torch.where(on_box[..., None], box_col, torch.where(on_ground[..., None], ground, sky))
        img = img + (rand(H, W, 3) - 0.5) * 12
        image = img.clamp(0, 255).round().to(torch.uint8).permute(2, 0, 1).contiguous()
        depth = torch.where(on_box | on_ground, t, torch.zeros_like(t))
        depth = torch.where(depth <= self.max_range, depth, torch.zeros_like(depth))
        lidar = (torch.remainder(v, 2) == 0) & (rand(H, W) < 0.6)
        depth = torch.where(lidar, depth, torch.zeros_like(depth)).float()[None]
        n = pitched_normal(pitch)
        gmap = ground_depth(self.K, n, h, (H, W))[None]
        inv = inverse_ground(self.K, n, h, (H, W))[None]
        return {"image": image, "depth": depth, "ground": gmap, "ground_inv": inv,
                "slope": slope_targets(depth, inv, self.camera_height)}

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.render(index)
        return self.transform(sample) if self.transform is not None else sample


# --------------------------------------------------------------------------------------------------
# KITTI Eigen

def read_depth_png(path: PathLike) -> Tensor:
    """A KITTI depth PNG (uint16, metres x 256, 0 = invalid) as float32 metres (1,H,W)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"depth file not found: {p}")
    try:
        img = Image.open(p)
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode depth file {p}: {e}") from None
    if img.mode not in ("I;16", "I;16B", "I;16L", "I"):
        raise DataError(f"depth file {p} has mode {img.mode} (8-bit?); expected a 16-bit PNG holding metres x 256")
    arr = np.asarray(img).astype(np.float32) / 256.0
    return torch.from_numpy(arr)[None]


def read_split(path: PathLike) -> list[tuple[str, str]]:
    """``(image, depth)`` relative paths of a BTS/GEDepth split file (``image gt focal`` per line); lines
    whose ground truth is ``None`` are skipped (697 Eigen test lines give 652 images)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"split file not found: {p}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{p}:{n}: expected 'image depth [focal]', got '{line.strip()}'")
        if parts[1] == "None":
            continue
        out.append((parts[0], parts[1]))
    return out


class KittiEigen(Dataset):
    """KITTI Eigen split in the official layout.

    ``raw_root/<date>/<drive>_sync/image_02/data/*.png`` with ``calib_cam_to_cam.txt`` and
    ``calib_velo_to_cam.txt`` in every ``raw_root/<date>/``; ``gt_root/<drive>_sync/proj_depth/groundtruth/
    image_02/*.png`` (``data_depth_annotated``); a split file of ``image depth focal`` lines relative to the
    two roots. Every file of the split and every calib file is checked when the dataset is built. The
    ground embedding is computed from each date's calib on the full raw image, then KB-cropped together
    with the image (``kb_crop``, None to skip).
    """

    def __init__(self, split_file: PathLike, raw_root: PathLike, gt_root: PathLike, lidar_plane: float = 1.65,
                 camera_height: float = 1.65, kb_crop: Optional[Sequence[int]] = (352, 1216),
                 transform: Transform = None, keys: Optional[Mapping] = None) -> None:
        from .transforms import KBCrop

        self.raw_root, self.gt_root = Path(raw_root), Path(gt_root)
        self.camera_height = float(camera_height)
        entries = sorted(read_split(split_file), key=lambda e: Path(e[0]).name)
        if not entries:
            raise DataError(f"split file {split_file} lists no image with ground truth")
        self.items: list[tuple[Path, Path, str]] = []
        for img_rel, gt_rel in entries:
            img, gt = self.raw_root / img_rel, self.gt_root / gt_rel
            absent = [(f, kind) for f, kind in ((img, "image"), (gt, "depth")) if not f.is_file()]
            for f, kind in absent:
                missing_file(f"{kind} file not found: {f} (listed in {split_file})")
            if not absent:
                self.items.append((img, gt, Path(img_rel).parts[0]))
        self.cameras = {date: read_kitti_calib(self.raw_root / date, lidar_plane) for date in {d for *_, d in self.items}}
        self._ground: dict[tuple[str, int, int], tuple[Tensor, Tensor]] = {}
        self.crop = KBCrop(keys or {}, kb_crop) if kb_crop else None
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def ground(self, date: str, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """The clipped ground depth and the unclipped ``1/G`` of ``date``'s camera, (1,H,W) each (cached)."""
        key = (date, *size)
        if key not in self._ground:
            cam = self.cameras[date]
            self._ground[key] = (cam.ground(size)[None], cam.inverse_ground(size)[None])
        return self._ground[key]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        sample = self.load(index)
        return self.transform(sample) if self.transform is not None else sample

    def load(self, index: int) -> dict[str, Tensor]:
        """The decoded, checked and KB-cropped sample before the per-sample ``transform``."""
        img_path, gt_path, date = self.items[index]
        image = read_image(img_path)
        depth = read_depth_png(gt_path)
        if image.shape[-2:] != depth.shape[-2:]:
            raise DataError(f"image {img_path} is {tuple(image.shape[-2:])} but its depth {gt_path} is "
                            f"{tuple(depth.shape[-2:])} (H, W)")
        ground, inv = self.ground(date, tuple(image.shape[-2:]))
        sample = {"image": image, "depth": depth, "ground": ground, "ground_inv": inv,
                  "slope": slope_targets(depth, inv, self.camera_height)}
        if self.crop is not None:
            sample = self.crop(sample)
        return sample
