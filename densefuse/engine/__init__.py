"""Training and evaluation: the loop and its parts (runtime, distributed, step, state, evaluate, logger),
optimizers and schedules, the mode comparison."""
from .evaluate import evaluate, evaluate_full
from .optim import build_optimizer, build_scheduler
from .state import Checkpointer, load_checkpoint, save_checkpoint
from .trainer import Trainer

__all__ = ["Checkpointer", "Trainer", "build_optimizer", "build_scheduler", "evaluate", "evaluate_full",
           "load_checkpoint", "save_checkpoint"]
