"""Decoding image and label files, with one clear :class:`DataError` per bad file.

Images come back as uint8 RGB ``(3,H,W)`` tensors, labels as int64 ``(H,W)`` tensors holding the raw
values stored in the PNG (palette PNGs give the palette indices, as in mmseg's pillow backend); with
``small=True`` an 8-bit label stays uint8, which the segmentation readers check and remap faster.

Complete JPEG and 8-bit PNG images are decoded by torchvision (libjpeg-turbo / libpng straight into a
tensor: the same pixels as pillow, without pillow's intermediate copies); anything else, and any file
torchvision refuses, goes through pillow, whose errors name the file.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Union

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


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _decode_fast(path: Path) -> Optional[Tensor]:
    """uint8 (3,H,W) RGB of a complete JPEG or an 8-bit PNG via torchvision, or None (then pillow decodes).

    A JPEG must end with its EOI marker: libjpeg only warns about a truncated stream, pillow raises."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # pragma: no cover - torchvision is a dependency; keep pillow working without it
        return None
    data = path.read_bytes()
    is_jpeg = data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] == b"\xff\xd9"
    if not (is_jpeg or data[:8] == _PNG_MAGIC):
        return None
    try:
        with warnings.catch_warnings():  # torchvision >= 0.29 announces moving decoding to torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            out = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None
    return out if out.dtype == torch.uint8 and out.ndim == 3 and out.shape[0] == 3 else None


def read_image(path: PathLike, channels_last: bool = False) -> Tensor:
    """Decode an image file as a uint8 RGB tensor ``(3,H,W)`` (grayscale/RGBA/palette are converted).

    ``channels_last=True`` returns the decoder's pixel-interleaved memory as it is (strides (1, 3W, 3)),
    without the copy to planar order: what a bilinear uint8 resize wants as input anyway.
    """
    p = Path(path)
    out = _decode_fast(p) if p.is_file() else None
    if out is None:
        img = _open(path, "image")
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit grey: keep the high byte, as OpenCV's colour read does (pillow's convert would clip at 255)
            img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int64) >> 8, 0, 255).astype(np.uint8))
        if img.mode != "RGB":
            img = img.convert("RGB")
        out = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    return out if channels_last else out.contiguous()


def read_label(path: PathLike, small: bool = False) -> Tensor:
    """Decode a single-channel label PNG (palette, 8-bit or 16-bit grayscale) as int64 ``(H,W)``.

    Values are taken unchanged (no palette-to-colour conversion). ``small=True`` keeps an 8-bit file's
    values as uint8 (16-bit files stay int64). A colour (RGB) label image is a :class:`DataError`: it would
    need a colour-to-class table, which the official layouts never use.
    """
    img = _open(path, "label")
    if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(f"label file {path} has mode {img.mode}; expected a single-channel (palette or grayscale) PNG")
    arr = np.array(img)
    if arr.ndim != 2:
        raise DataError(f"label file {path} is not a single-channel image (shape {arr.shape})")
    if small and arr.dtype == np.uint8:
        return torch.from_numpy(arr)
    return torch.from_numpy(arr.astype(np.int64))


def label_counts(label: Tensor) -> Optional[Tensor]:
    """The 256-bin histogram of a uint8 label (one pass; ``None`` for other dtypes): what
    :func:`check_label` reads, and what tells a reader whether a remapping has anything to fix."""
    return torch.bincount(label.reshape(-1), minlength=256) if label.dtype == torch.uint8 else None


def check_label(label: Tensor, num_classes: int, path: PathLike = "<label>", ignore_index: int = IGNORE_INDEX,
                note: str = "", counts: Optional[Tensor] = None) -> Tensor:
    """Return ``label`` if every value is in ``[0, num_classes)`` or ``ignore_index``; else a DataError.

    Call it on the values as stored in the file (before any remapping such as ``reduce_zero_label``),
    so the message names the file and up to ten of *its* offending values; ``note`` explains a
    remapping in the message. ``counts``: the label's :func:`label_counts`, when the caller has them.
    """
    if label.dtype == torch.uint8:  # a 256-bin histogram instead of three full-size comparisons
        counts = label_counts(label) if counts is None else counts
        allowed = torch.zeros(256, dtype=torch.bool)
        allowed[: max(0, min(num_classes, 256))] = True
        if 0 <= ignore_index < 256:
            allowed[ignore_index] = True
        values = torch.nonzero((counts > 0) & ~allowed).flatten().tolist()
    else:
        bad = ((label < 0) | (label >= num_classes)) & (label != ignore_index)
        values = torch.unique(label[bad]).tolist() if bool(bad.any()) else []
    if values:
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


def image_size(path: PathLike, kind: str = "image") -> tuple[int, int]:
    """``(height, width)`` an image file declares in its header, without decoding its pixels (so a file
    declaring 20000x20000 can be refused before it takes memory, and a dataset's sizes read quickly)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{kind} file not found: {p}")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # only the header is read: pillow's bomb check is for decoding
        with Image.open(p) as img:
            w, h = img.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot decode {kind} file {p}: {e}") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return int(h), int(w)
