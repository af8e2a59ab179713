"""Prediction on image files: which files a list of inputs names (folders walked, suffixes in any case,
what was left out), their output names, a pixel limit read from the headers, and the staged writing of
the task's files, so a failure or a name clash leaves the user's folder as it was.

Every check here runs before the model is built or an image decoded.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import default_collate

from ..data.io import image_size, read_image
from ..errors import DataError
from ..tasks import Task
from .evaluate import infer_outputs
from .runtime import refuse_overwrite, to_device

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

#: ``predict --max-pixels`` default: 100 megapixels (a decoded RGB image of 300 MB, its float copy 1.2 GB)
MAX_PIXELS = 100_000_000


def image_paths(inputs: Sequence[str], exclude: Optional[Path] = None) -> tuple[list[Path], list[Path]]:
    """(image files named or found in the named folders and their subfolders, each once; the files of
    those folders that were skipped as not images). Suffixes match in any case (``.JPG``); files under
    ``exclude`` (the output folder) are not inputs."""
    paths: list[Path] = []
    skipped: list[Path] = []
    skip_root = exclude.resolve() if exclude is not None else None
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            for q in sorted(p.rglob("*")):
                if not q.is_file() or any(part.startswith(".") for part in q.relative_to(p).parts):
                    continue
                if skip_root is not None and skip_root in q.resolve().parents:
                    continue
                (paths if q.suffix.lower() in IMAGE_SUFFIXES else skipped).append(q)
        elif p.is_file():
            paths.append(p)
        else:
            raise DataError(f"input not found: {item}")
    if not paths:
        raise DataError(f"no input images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(inputs)}")
    unique = list({q.resolve(): q for q in paths}.values())
    return unique, skipped


def skipped_line(skipped: Sequence[Path]) -> str:
    """One line naming what a folder walk left out: counts by suffix and the first few files."""
    by_suffix: dict[str, int] = {}
    for q in skipped:
        key = q.suffix.lower() or "(no suffix)"
        by_suffix[key] = by_suffix.get(key, 0) + 1
    kinds = ", ".join(f"{k}: {n}" for k, n in sorted(by_suffix.items()))
    shown = ", ".join(str(q) for q in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
    return (f"skipped {len(skipped)} file{'s' if len(skipped) != 1 else ''} that are not images predict reads "
            f"({kinds}): {shown}")


def check_pixels(paths: Sequence[Path], max_pixels: int) -> None:
    """Every image's declared size (header only) within ``max_pixels``, before any image is decoded."""
    for p in paths:
        h, w = image_size(p)
        if h * w > max_pixels:
            raise DataError(f"{p} declares {w}x{h} pixels ({h * w / 1e6:.1f} megapixels), more than --max-pixels "
                            f"{max_pixels}; decoding it needs about {h * w * 15 / 2**30:.1f} GiB (uint8 and float "
                            f"copies): pass a larger --max-pixels if this machine has the memory")


def output_stems(paths: Sequence[Path]) -> list[Path]:
    """A distinct relative output stem per input: the path below the inputs' common folder without its
    suffix (``a/x.png`` and ``b/x.png`` -> ``a/x``, ``b/x``); inputs that would still share a stem keep
    their suffix in it (``a/x.png``, ``a/x.jpg`` -> ``a/x_png``, ``a/x_jpg``). A clash left after that
    is refused before anything is written."""
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(r.parent) for r in resolved]))
    rel = [r.relative_to(root) for r in resolved]
    plain = [r.with_suffix("") for r in rel]
    counts: dict[Path, int] = {}
    for s in plain:
        counts[s] = counts.get(s, 0) + 1
    stems = [s if counts[s] == 1 else s.with_name(f"{s.name}_{r.suffix.lstrip('.').lower()}") for s, r in zip(plain, rel)]
    seen: dict[Path, Path] = {}
    for stem, src in zip(stems, paths):
        if stem in seen:
            raise DataError(f"inputs {seen[stem]} and {src} would both write predictions named {stem}; rename one")
        seen[stem] = src
    return stems


def sample_batch(task: Task, cfg: Any, sample: dict[str, Any]) -> dict[str, Any]:
    """A batch of one sample (the image, plus what the task adds, e.g. depth's ground embedding) through the
    task's per-sample test pipeline (what the evaluation dataset applies to its samples, e.g. the keep-ratio
    test Resize recording ``ori_size``), collated."""
    pipeline = task.test_pipeline(cfg)
    if pipeline is not None:
        sample = pipeline(sample)
    return default_collate([sample])


def write_predictions(task: Task, cfg: Any, model: nn.Module, device: torch.device, paths: Sequence[Path],
                      stems: Sequence[Path], out: Path, calib: Optional[str] = None) -> list[Path]:
    """Predict every image of ``paths`` (the evaluation's test pipeline, ``eval.mode`` and ``eval.tta``, at
    the image's own size) and write the task's files for it under ``out`` as ``stems``; returns the files.

    Everything is written to a staging folder first and moved into place only when every image succeeded
    and no target exists, so a failure or a clash leaves the user's files as they were (and a folder this
    call created is removed again)."""
    model.eval()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".densefuse-predict-", dir=out))
    try:
        transform = task.build_transform(cfg, train=False)
        written: list[Path] = []
        with torch.no_grad():
            for path, stem in zip(paths, stems):
                sample = task.predict_sample(read_image(path), path, calib)  # depth: KITTI calib, KB crop
                image = sample["image"]
                batch = transform(to_device(sample_batch(task, cfg, sample), device))
                prediction = task.predict(infer_outputs(model, task, batch))
                (staging / stem).parent.mkdir(parents=True, exist_ok=True)
                written += task.save_prediction(prediction[0].cpu(), staging / stem, image=image)
        targets = [out / p.relative_to(staging) for p in written]
        for t in targets:
            refuse_overwrite(t)
        for src, dst in zip(written, targets):
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.replace(dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return targets
