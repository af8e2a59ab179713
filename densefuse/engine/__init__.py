"""Training and evaluation loops, optimizers and schedules, checkpoints."""
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import build_optimizer, build_scheduler
from .trainer import Trainer, evaluate

__all__ = ["Trainer", "build_optimizer", "build_scheduler", "evaluate", "load_checkpoint", "save_checkpoint"]
