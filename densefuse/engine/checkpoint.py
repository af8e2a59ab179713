"""Checkpoint files (kept for imports; the code lives in :mod:`densefuse.engine.state`)."""
from .state import atomic_write, load_checkpoint, load_model_state, save_checkpoint

__all__ = ["atomic_write", "load_checkpoint", "load_model_state", "save_checkpoint"]
