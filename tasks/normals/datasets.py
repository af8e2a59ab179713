"""Surface-normal datasets: a built-in room of planes and spheres, ray-cast analytically so that the normals
(and the depth and the object classes, which the multi-task scene reuses) are exact.

Normals are unit vectors in the camera frame: x right, y down, z forward (away from the camera); a visible
surface faces the camera (``n . ray < 0``, so mostly ``n_z < 0``); mirroring an image left-right negates ``n_x``. A pixel without ground truth
has the zero vector.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

Transform = Optional[Callable[[dict], dict]]

#: classes of the rendered scene
SCENE_CLASSES = ("floor", "wall", "sphere")
#: unit vector towards the one light of every scene (upper left, in front): shading tells the normal
LIGHT = torch.nn.functional.normalize(torch.tensor([-0.45, -0.6, -0.66], dtype=torch.float64), dim=0)


def _seed(*parts: int) -> int:
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFF)) * 1099511628211) % 2**63
    return h


def scene_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The random stream of scene ``index`` of ``split`` (deterministic, independent of worker order)."""
    split_id = sum(ord(c) * (i + 1) for i, c in enumerate(split))
    return torch.Generator().manual_seed(_seed(seed, split_id, index))


def render_scene(g: torch.Generator, size: Sequence[int], focal: float = 0.9) -> dict[str, Tensor]:
    """Ray-cast one room: a floor 1-1.6 below the camera, a back wall 4-8 ahead turned by up to 35 degrees
    left/right and 15 up/down, a side wall half of the time, 1-4 spheres in front of the wall.

    Returns ``image`` uint8 (3,H,W) (per-object albedo and texture, Lambertian shading under :data:`LIGHT`
    plus ambient light, a little noise), ``normal`` float32 (3,H,W) exact unit normals, ``depth`` float32
    (1,H,W) z-depth, ``label`` int64 (H,W) index into :data:`SCENE_CLASSES`.
    """
    H, W = int(size[0]), int(size[1])

    def rand(*shape: int) -> Tensor:
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    f = float(focal) * W
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    d = torch.stack([(u - (W - 1) / 2) / f, (v - (H - 1) / 2) / f, torch.ones_like(u)], -1)  # rays, z = 1: t = depth
    inf = torch.full((H, W), float("inf"), dtype=torch.float64)
    t_best, n_best = inf.clone(), torch.zeros(H, W, 3, dtype=torch.float64)
    label = torch.zeros(H, W, dtype=torch.long)
    albedo = torch.zeros(H, W, 3, dtype=torch.float64)

    def plane(n: Tensor, point: Tensor, cls: int, colour: Tensor, pattern: Callable[[Tensor], Tensor]) -> None:
        """Plane through ``point`` with unit normal ``n`` facing the camera."""
        nonlocal t_best, n_best, label, albedo
        denom = d @ n
        t = torch.where(denom.abs() > 1e-9, (point @ n) / denom, inf)
        hit = (t > 0) & (t < t_best)
        pts = t[..., None] * d
        col = colour * pattern(pts)[..., None]
        t_best = torch.where(hit, t, t_best)
        n_best = torch.where(hit[..., None], n.expand(H, W, 3), n_best)
        label = torch.where(hit, torch.full_like(label, cls), label)
        albedo = torch.where(hit[..., None], col, albedo)

    floor_h = 1.0 + 0.6 * float(rand(()))
    plane(torch.tensor([0.0, -1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, floor_h, 0.0], dtype=torch.float64),
          0, 120 + 80 * rand(3), lambda p: 0.75 + 0.25 * ((torch.floor(p[..., 0]) + torch.floor(p[..., 2])) % 2))
    yaw, pitch = (rand(()) - 0.5) * 1.2, (rand(()) - 0.5) * 0.5
    wall_n = torch.stack([torch.sin(yaw) * torch.cos(pitch), torch.sin(pitch), -torch.cos(yaw) * torch.cos(pitch)])
    wall_z = 4 + 4 * float(rand(()))
    stripes = 1.5 + 2 * float(rand(()))
    plane(wall_n, torch.tensor([0.0, 0.0, wall_z], dtype=torch.float64), 1, 100 + 120 * rand(3),
          lambda p: 0.8 + 0.2 * torch.sin(stripes * (p[..., 0] + p[..., 1])))
    if float(rand(())) < 0.5:
        side = 1.0 if float(rand(())) < 0.5 else -1.0
        plane(torch.tensor([-side, 0.0, 0.0], dtype=torch.float64),
              torch.tensor([side * (2 + 1.5 * float(rand(()))), 0.0, 0.0], dtype=torch.float64), 1,
              100 + 120 * rand(3), lambda p: 0.85 + 0.15 * torch.sin(3 * p[..., 2]))
    dd = (d * d).sum(-1)
    for _ in range(1 + int(rand(()) * 4)):
        r = 0.3 + 0.5 * float(rand(()))
        cz = 2.0 + (wall_z - 2.5) * float(rand(()))
        centre = torch.stack([(rand(()) - 0.5) * cz * W / f * 0.8, (rand(()) - 0.5) * cz * H / f * 0.6,
                              torch.tensor(cz, dtype=torch.float64)])
        b = d @ centre
        disc = b * b - dd * (centre @ centre - r * r)
        t = torch.where(disc > 0, (b - disc.clamp_min(0).sqrt()) / dd, inf)
        hit = (t > 0) & (t < t_best)
        n = (t[..., None] * d - centre) / r
        t_best = torch.where(hit, t, t_best)
        n_best = torch.where(hit[..., None], n, n_best)
        label = torch.where(hit, torch.full_like(label, 2), label)
        albedo = torch.where(hit[..., None], (60 + 190 * rand(3)).expand(H, W, 3), albedo)
    n_best = torch.nn.functional.normalize(n_best, dim=-1)
    shade = 0.25 + 0.75 * (n_best @ LIGHT).clamp_min(0)
    img = albedo * shade[..., None] + (rand(H, W, 3) - 0.5) * 8
    return {
        "image": img.clamp(0, 255).round().to(torch.uint8).permute(2, 0, 1).contiguous(),
        "normal": n_best.float().permute(2, 0, 1).contiguous(),
        "depth": t_best.float()[None],
        "label": label,
    }


class SyntheticNormals(Dataset):
    """``num`` rendered rooms (see :func:`render_scene`), deterministic per (seed, split, index); samples
    hold ``image`` uint8 (3,H,W) and ``normal`` float32 (3,H,W)."""

    def __init__(self, num: int, size: Sequence[int] = (96, 128), seed: int = 0, split: str = "train",
                 focal: float = 0.9, transform: Transform = None) -> None:
        self.num, self.size, self.seed, self.split = int(num), (int(size[0]), int(size[1])), int(seed), split
        self.focal, self.transform = float(focal), transform

    def __len__(self) -> int:
        return self.num

    def render(self, index: int) -> dict[str, Tensor]:
        """Every map of scene ``index`` (image, normal, depth, label), without augmentation."""
        return render_scene(scene_generator(self.seed, self.split, index), self.size, self.focal)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        s = self.render(index)
        sample = {"image": s["image"], "normal": s["normal"]}
        return self.transform(sample) if self.transform is not None else sample
