"""Decoding image and label files with pillow, with one clear :class:`DataError` per bad file.

Images come back as uint8 RGB ``(3,H,W)`` tensors, labels as int64 ``(H,W)`` tensors holding the raw
values stored in the PNG (palette PNGs give the palette indices, as in mmseg's pillow backend).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..errors import DataError

PathLike = Union[str, "os.PathLike[str]"]

#: Label value that the loss and the metric skip (VOC boundaries, Cityscapes void, ADE "other").
IGNORE_INDEX = 255


def _open(path: PathLike, kind: str) -> Image.Image:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{kind} file not found: {p}")
    try:
        img = Image.open(p)
        img.load()  # decode now so truncated files fail here, not later in a worker
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode {kind} file {p}: {e}") from None
    return img


def read_image(path: PathLike) -> Tensor:
    """Decode an image file as a uint8 RGB tensor ``(3,H,W)`` (grayscale/RGBA/palette are converted)."""
    img = _open(path, "image")
    if img.mode != "RGB":
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def read_label(path: PathLike) -> Tensor:
    """Decode a single-channel label PNG (palette, 8-bit or 16-bit grayscale) as int64 ``(H,W)``.

    Values are taken unchanged (no palette-to-colour conversion). A colour (RGB) label image is a
    :class:`DataError`: it would need a colour-to-class table, which the official layouts never use.
    """
    img = _open(path, "label")
    if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(f"label file {path} has mode {img.mode}; expected a single-channel (palette or grayscale) PNG")
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise DataError(f"label file {path} is not a single-channel image (shape {arr.shape})")
    return torch.from_numpy(arr.astype(np.int64))


def check_label(label: Tensor, num_classes: int, path: PathLike = "<label>", ignore_index: int = IGNORE_INDEX,
                note: str = "") -> Tensor:
    """Return ``label`` if every value is in ``[0, num_classes)`` or ``ignore_index``; else a DataError.

    Call it on the values as stored in the file (before any remapping such as ``reduce_zero_label``),
    so the message names the file and up to ten of *its* offending values; ``note`` explains a
    remapping in the message.
    """
    bad = ((label < 0) | (label >= num_classes)) & (label != ignore_index)
    if bool(bad.any()):
        values = torch.unique(label[bad]).tolist()
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise DataError(
            f"label file {path} has values outside [0, {num_classes}) and not the ignore index "
            f"{ignore_index}: {shown}{f' ({note})' if note else ''}"
        )
    return label


def check_same_size(image: Tensor, label: Tensor, image_path: PathLike, label_path: PathLike) -> None:
    """DataError when an image and its label differ in height/width."""
    if tuple(image.shape[-2:]) != tuple(label.shape[-2:]):
        raise DataError(
            f"image {image_path} is {tuple(image.shape[-2:])} but its label {label_path} is "
            f"{tuple(label.shape[-2:])} (H, W)"
        )
