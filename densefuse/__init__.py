"""densefuse: dense prediction with scale-equalized multi-level feature fusion."""
from . import smp  # segmentation_models_pytorch is imported lazily inside
from .calibration import calibrate, equalizers, fold, measure, set_mode
from .config import Config, CoreConfig, load_config
from .equalizer import ScaleEqualizer
from .errors import CalibrationError, ConfigError, DataError, DensefuseError
from .fusion import Fusion
from .model import EncoderDecoder, build_model
from .plugins import equalize, export_plain, load_equalized
from .registry import HEADS, MODELS, PREDICTORS, TASKS, Registry
from .tasks import Task, get_task, register_task

__version__ = "0.1.0"

__all__ = [
    "Config",
    "CoreConfig",
    "CalibrationError",
    "ConfigError",
    "DataError",
    "DensefuseError",
    "EncoderDecoder",
    "Fusion",
    "HEADS",
    "MODELS",
    "PREDICTORS",
    "Registry",
    "ScaleEqualizer",
    "TASKS",
    "Task",
    "build_model",
    "calibrate",
    "equalize",
    "equalizers",
    "export_plain",
    "fold",
    "get_task",
    "load_config",
    "load_equalized",
    "measure",
    "register_task",
    "set_mode",
    "smp",
]
