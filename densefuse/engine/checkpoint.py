"""Atomic, ``torch.load(weights_only=True)``-compatible checkpoints."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from ..errors import DensefuseError


def save_checkpoint(path: Union[str, Path], state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same dir, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path: Union[str, Path], map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; user-facing errors for missing or corrupt files."""
    path = Path(path)
    if not path.is_file():
        raise DensefuseError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DensefuseError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if not isinstance(state, dict):
        raise DensefuseError(f"{path} is not a densefuse checkpoint")
    return state


def load_model_state(model: nn.Module, state: dict[str, Any], source: Union[str, Path]) -> None:
    """Load ``state['model']`` (or a bare state_dict) strictly, with a readable mismatch message."""
    sd = state.get("model", state)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise DensefuseError(f"checkpoint {source} does not match the model: {str(e).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} keys (e.g. {unexpected[0]})")
        raise DensefuseError(f"checkpoint {source} does not match the model: {'; '.join(parts)}")
