"""Pictures and files of segmentation predictions: palette PNGs, colour overlays, legends."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor

from densefuse.data import IGNORE_INDEX

PathLike = Union[str, Path]
Palette = Sequence[Sequence[int]]

#: Colour of ignored pixels (255) in pictures and palette PNGs.
IGNORE_COLOUR = (0, 0, 0)
_ROW = 14  # legend row height in pixels (PIL's default bitmap font is about 11 px high)


def palette_png(classes: Tensor, palette: Palette) -> Image.Image:
    """A class map (H,W) as a palette ("P") PNG image: pixel values are the class ids unchanged (255
    stays 255), so any reader gets the ids, and viewers show the dataset's colours instead of black."""
    ids = classes.detach().cpu()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > 255):
        raise ValueError(f"class ids must be in 0..255 for a palette PNG, got {int(ids.min())}..{int(ids.max())}")
    img = Image.fromarray(ids.numpy().astype(np.uint8), mode="P")
    flat = [0] * 768
    for i, colour in enumerate(palette[:255]):
        flat[3 * i:3 * i + 3] = [int(c) for c in colour]
    flat[3 * IGNORE_INDEX:3 * IGNORE_INDEX + 3] = list(IGNORE_COLOUR)
    img.putpalette(flat)
    return img


def colourize(classes: Tensor, palette: Palette) -> Tensor:
    """(B,H,W) class ids -> (B,3,H,W) float colours; ignored and unknown ids are black."""
    table = torch.zeros(256, 3, dtype=torch.float32, device=classes.device)
    pal = torch.tensor([list(c) for c in palette[:255]], dtype=torch.float32, device=classes.device)
    table[: len(pal)] = pal
    return table[classes.long().clamp(0, 255)].permute(0, 3, 1, 2)


def overlay(image: Tensor, classes: Tensor, palette: Palette, alpha: float = 0.5) -> Tensor:
    """``image`` (B,3,h,w) uint8 blended with the colours of ``classes`` (B,H,W): uint8 (B,3,H,W).
    Ignored pixels (255) show the image alone."""
    colour = colourize(classes, palette)
    raw = image.to(classes.device).float()
    if raw.shape[-2:] != colour.shape[-2:]:
        raw = F.interpolate(raw, size=colour.shape[-2:], mode="bilinear", align_corners=False)
    keep = (classes == IGNORE_INDEX).unsqueeze(1)
    blended = torch.where(keep, raw, raw * (1 - alpha) + colour * alpha)
    return blended.round().clamp(0, 255).to(torch.uint8)


def legend(class_ids: Sequence[int], names: Sequence[str], palette: Palette, width: int, slots: Optional[int] = None) -> Tensor:
    """A (3,h,width) uint8 strip: one swatch and name per class id, as many per row as fit.

    ``slots`` fixes the number of entries the strip has room for (so strips of different predictions
    have one height); when more classes are given, the last slot says how many were left out."""
    items = [(int(c), names[c].strip() if c < len(names) else f"class {c}") for c in class_ids]
    slots = max(1, slots if slots is not None else len(items))
    if len(items) > slots:
        items = items[: slots - 1] + [(-1, f"+{len(items) - slots + 1} more")]
    cell = 110
    per_row = max(1, width // cell)
    rows = -(-slots // per_row)
    img = Image.new("RGB", (width, rows * _ROW + 2), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for k, (cid, name) in enumerate(items):
        x, y = (k % per_row) * cell + 2, (k // per_row) * _ROW + 2
        if cid >= 0:
            colour = tuple(int(v) for v in palette[cid]) if cid < len(palette) else (0, 0, 0)
            draw.rectangle([x, y, x + 10, y + 10], fill=colour, outline=(0, 0, 0))
        draw.text((x + 14, y), name[:16], fill=(0, 0, 0))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def present_classes(*maps: Optional[Tensor]) -> list[int]:
    """Class ids (ignore index excluded) present in any of ``maps``, the most frequent first."""
    counts: dict[int, int] = {}
    for m in maps:
        if m is not None:
            ids, n = torch.unique(m, return_counts=True)
            for i, c in zip(ids.tolist(), n.tolist()):
                counts[i] = counts.get(i, 0) + c
    counts.pop(IGNORE_INDEX, None)
    return sorted(counts, key=lambda i: (-counts[i], i))


def save_png(picture: Tensor, path: PathLike) -> Path:
    """Write a (3,H,W) uint8 tensor as an RGB PNG."""
    path = Path(path)
    Image.fromarray(picture.detach().cpu().permute(1, 2, 0).numpy()).save(path)
    return path
