"""Ground embedding: the depth of a flat ground plane at every pixel, from the camera alone.

GEDepth (ICCV 2023) feeds the network the depth ``G`` at which each pixel's viewing ray meets the road
plane. For a camera with intrinsics ``K``, unit ground normal ``n`` (camera coordinates, pointing
down) and the plane ``height`` metres below the camera centre,
``G(u, v) = height / (n . K^-1 [u, v, 1]^T)`` (the ray ``K^-1 [u, v, 1]`` has z = 1, so G is the
z-depth). Pixels whose ray never meets the plane (G <= 0, above the horizon) or meets it beyond
``max_depth`` (200 m) get 0 in that input channel; the adaptive ground bends the unclipped plane,
kept as its finite inverse ``1/G`` (:func:`inverse_ground`). Everything here is computed on the fly: no precomputed files.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

from densefuse.errors import DataError

PathLike = Union[str, Path]

#: Pixels whose ground depth exceeds this are treated as having no ground (GEDepth's cut-off).
GROUND_MAX_DEPTH = 200.0


def inverse_ground(K: Tensor, normal: Union[Tensor, Sequence[float]], height: float, size: Sequence[int]) -> Tensor:
    """``1/G`` of the unclipped ground plane ``(H, W)`` float32, 1/metres: ``n . K^-1 [u, v, 1] / height``.

    Finite everywhere and affine in ``(u, v)``, so resizing, rotating or flipping it with bilinear
    sampling stays exact. Negative above the horizon (the ray meets the plane behind the camera): this
    is GEDepth's unclipped ``pe_165`` map in the finite ``1/G`` form, which the adaptive ground bends
    (:func:`adapt_ground`); the clipped :func:`ground_depth` is only the network's input channel.
    """
    K = torch.as_tensor(K, dtype=torch.float64).reshape(3, 3)
    n = torch.as_tensor(normal, dtype=torch.float64).reshape(3)
    H, W = int(size[0]), int(size[1])
    # n . K^-1 [u, v, 1] is affine in (u, v): precompute its three coefficients
    a = n @ torch.linalg.inv(K)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    return ((a[0] * u + a[1] * v + a[2]) / float(height)).float()


def ground_depth(K: Tensor, normal: Union[Tensor, Sequence[float]], height: float, size: Sequence[int],
                 max_depth: float = GROUND_MAX_DEPTH) -> Tensor:
    """Ground-plane depth ``(H, W)`` float32 in metres; 0 where the ray misses the plane or G > max_depth.

    Args:
        K: 3x3 intrinsic matrix.
        normal: unit ground normal in camera coordinates pointing down (a level camera: (0, 1, 0)).
        height: distance of the plane below the camera centre along ``normal``, metres.
        size: ``(H, W)``; pixel ``(u, v)`` is (column, row), 0-based integer indices.
    """
    K = torch.as_tensor(K, dtype=torch.float64).reshape(3, 3)
    n = torch.as_tensor(normal, dtype=torch.float64).reshape(3)
    H, W = int(size[0]), int(size[1])
    a = n @ torch.linalg.inv(K)
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    denom = a[0] * u + a[1] * v + a[2]
    g = torch.where(denom > 0, float(height) / denom.where(denom > 0, torch.ones_like(denom)), torch.zeros_like(denom))
    g = torch.where((g > 0) & (g <= max_depth), g, torch.zeros_like(g))
    return g.float()


def pitched_normal(pitch_deg: float) -> Tensor:
    """Ground normal (pointing down) in camera coordinates (x right, y down, z forward) of a camera
    pitched down by ``pitch_deg`` (positive = looking down at the road): ``(0, cos p, sin p)``."""
    p = math.radians(pitch_deg)
    return torch.tensor([0.0, math.cos(p), math.sin(p)], dtype=torch.float64)


class Camera(NamedTuple):
    """What :func:`ground_depth` needs: intrinsics, ground normal (camera coords, down) and plane height."""

    K: Tensor
    normal: Tensor
    height: float

    def ground(self, size: Sequence[int], max_depth: float = GROUND_MAX_DEPTH) -> Tensor:
        return ground_depth(self.K, self.normal, self.height, size, max_depth)

    def inverse_ground(self, size: Sequence[int]) -> Tensor:
        """``1/G`` of the unclipped plane (:func:`inverse_ground`)."""
        return inverse_ground(self.K, self.normal, self.height, size)


def _read_calib_lines(path: Path) -> dict[str, list[float]]:
    if not path.is_file():
        raise DataError(f"KITTI calib file not found: {path}")
    out: dict[str, list[float]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read KITTI calib file {path}: {e}") from None
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, rest = line.partition(":")
        try:
            out[key.strip()] = [float(x) for x in rest.split()]
        except ValueError:
            continue  # e.g. calib_time: 15-Mar-2012 11:37:16
    return out


def _need(values: dict[str, list[float]], key: str, count: int, path: Path) -> Tensor:
    if key not in values:
        raise DataError(f"KITTI calib file {path} has no '{key}:' line")
    if len(values[key]) != count:
        raise DataError(f"KITTI calib file {path}: '{key}:' has {len(values[key])} numbers, expected {count}")
    return torch.tensor(values[key], dtype=torch.float64)


def read_kitti_calib(date_dir: PathLike, lidar_plane: float = 1.65) -> Camera:
    """The camera of KITTI's left colour camera (image_02) of a raw date folder, with the ground plane
    ``lidar_plane`` metres below the Velodyne (GEDepth's 1.65 m).

    Reads ``calib_cam_to_cam.txt`` (``P_rect_02``, ``R_rect_00``) and ``calib_velo_to_cam.txt`` (``R``,
    ``T``). With ``A = P_rect_02 . R_rect_00 . [R|T]`` (LiDAR -> image), a pixel's LiDAR point is
    ``X = d * M^-1 [u,v,1] - M^-1 t`` (``M = A[:, :3]``, ``t = A[:, 3]``), so the plane ``X_z = -h`` is at
    ``d = h' / (n . K^-1 [u, v, 1])`` with ``K = P_rect_02[:, :3]``, ``n`` the LiDAR's down axis in the
    rectified camera frame and ``h' = h - (M^-1 t)_z``: exactly GEDepth's ground depth.
    """
    root = Path(date_dir)
    cam_path, velo_path = root / "calib_cam_to_cam.txt", root / "calib_velo_to_cam.txt"
    cam, velo = _read_calib_lines(cam_path), _read_calib_lines(velo_path)
    P2 = _need(cam, "P_rect_02", 12, cam_path).reshape(3, 4)
    R0 = _need(cam, "R_rect_00", 9, cam_path).reshape(3, 3)
    R = _need(velo, "R", 9, velo_path).reshape(3, 3)
    T = _need(velo, "T", 3, velo_path)
    Rr, Tr = torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    Rr[:3, :3] = R0
    Tr[:3, :3], Tr[:3, 3] = R, T
    A = P2 @ Rr @ Tr
    M, t = A[:, :3], A[:, 3]
    K = P2[:, :3]
    c = torch.linalg.solve(M, t)
    rot = R0 @ R  # LiDAR axes in the rectified camera frame
    normal = -rot[:, 2]  # LiDAR z points up; the ground normal points down
    normal = normal / normal.norm()
    return Camera(K, normal, float(lidar_plane - c[2]))


# --------------------------------------------------------------------------------------------------
# adaptive ground embedding (GEDepth-Adaptive): a per-pixel slope bends the flat-ground depth

def slope_bins(num_bins: int = 11, max_deg: float = 5.0) -> Tensor:
    """Centres of the slope classes in degrees (GEDepth: 11 bins over -5..5)."""
    return torch.linspace(-max_deg, max_deg, num_bins)


def adapt_ground(inv_ground: Tensor, slope_deg: Tensor, height: float, max_depth: float = GROUND_MAX_DEPTH) -> Tensor:
    """Ground depth bent by a slope: ``1/G_a = 1/G + tan(theta)/h``, kept where ``0 < G_a <= max_depth``.

    ``inv_ground`` is ``1/G`` of the *unclipped* plane (:func:`inverse_ground`; negative above the
    horizon), as GEDepth bends its unclipped ``pe_165`` map (``-h / (-h/G - tan(theta))``): above the
    horizon only the thin band where an uphill slope brings the plane back in front of the camera gets
    ground depth, never the whole sky.
    """
    inv_a = inv_ground + torch.tan(torch.deg2rad(slope_deg)) / height
    g = 1.0 / inv_a.where(inv_a > 0, torch.ones_like(inv_a))
    return torch.where((inv_a > 0) & (g <= max_depth), g, torch.zeros_like(g))


def slope_targets(depth: Tensor, inv_ground: Tensor, height: float, num_bins: int = 11, max_deg: float = 5.0,
                  ignore_index: int = 255) -> Tensor:
    """Slope class per pixel from ground-truth depth (GEDepth):
    ``round(deg(arctan(h (1/gt - 1/G))))`` clipped to ``[-max_deg, max_deg]``, as a class index
    ``0..num_bins-1``; ``ignore_index`` where there is no ground truth (depth 0). ``inv_ground`` is
    ``1/G`` of the unclipped plane (:func:`inverse_ground`), the inverse of :func:`adapt_ground`.
    Same shape, int64."""
    step = 2 * max_deg / (num_bins - 1)
    inv_d = 1.0 / depth.clamp_min(1e-6)
    theta = torch.rad2deg(torch.atan(height * (inv_d - inv_ground)))
    cls = torch.round(theta.clamp(-max_deg, max_deg) / step).long() + (num_bins - 1) // 2
    return torch.where(depth > 0, cls, torch.full_like(cls, ignore_index))
