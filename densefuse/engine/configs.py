"""A command's config: loaded and validated once, then checked against this machine (device, pretrained file)
and, for ``train`` / ``compare``, built once without writing anything."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch

from ..config.loader import drop_legacy_keys, from_dict, load_config
from ..config.sections import CoreConfig
from ..encoders import check_pretrained
from ..errors import DensefuseError
from ..tasks import get_task, task_class
from .optim import build_optimizer, build_scheduler
from .runtime import resolve_device


def load_run_config(config: Optional[str], overrides: tuple[str, ...] = (), task: Optional[str] = None,
                    weights: bool = True) -> CoreConfig:
    """The validated config of a command (the task's default config when ``config`` is None), checked against
    this machine (``weights``: also the pretrained file; commands that load a checkpoint do not need it)."""
    default = task_class(task or "seg").default_config if config is None else None
    cfg = load_config(config, overrides, task_default=default)
    if task is not None and config is not None and cfg["task"] != task:
        raise DensefuseError(f"--task {task} but the config is for task '{cfg['task']}'")
    check_machine(cfg, weights)
    return cfg


def check_machine(cfg: CoreConfig, weights: bool = True) -> None:
    """What a validated config cannot say by itself: that its device exists here and (``weights``) that the
    pretrained file ``model.encoder.pretrained`` names is there."""
    resolve_device(cfg["device"])
    model = cfg["model"]
    if weights and model["type"] != "smp":
        check_pretrained(model["encoder"]["pretrained"], model["encoder"]["name"])


def without_pretrained(cfg: CoreConfig) -> CoreConfig:
    """``cfg`` with ``model.encoder.pretrained: null``: a model whose weights all come from a checkpoint
    does not need (or read) the ImageNet file it was initialized from."""
    out = copy.deepcopy(cfg)
    out["model"]["encoder"]["pretrained"] = None
    return out


def checkpoint_config(checkpoint: str, config: Optional[str], overrides: tuple[str, ...], state: dict[str, Any],
                      from_mmseg: bool) -> CoreConfig:
    """The config to build a checkpoint's model from: the checkpoint's own (embedded) config unless ``config``
    is given; an mmseg checkpoint needs ``config`` and runs with ``model.equalizer.mode: off`` (its weights are
    a plain network)."""
    if config is None:
        if from_mmseg:
            raise DensefuseError(f"{checkpoint} is an mmseg checkpoint: pass --config with the densefuse config of "
                                 f"its model (docs/paper.md, 'Coming from mmseg')")
        if "config" not in state:
            raise DensefuseError(f"{checkpoint} has no embedded config; pass --config")
        cfg = from_dict(drop_legacy_keys(state["config"]), overrides, source=f"{checkpoint} (embedded config)")
        check_machine(cfg, weights=False)
    else:
        cfg = load_run_config(config, overrides, weights=False)
    cfg = without_pretrained(cfg)
    if from_mmseg:
        cfg["model"]["equalizer"]["mode"] = "off"
    return cfg


def build_everything(cfg: CoreConfig) -> None:
    """Everything a training run builds from the config, built once without writing anything (datasets
    index their files; the model, optimizer and schedule are built on the ``meta`` device, loading the
    pretrained file): ``compare`` runs it for every config, so a user error in the last one surfaces
    before the first run starts."""
    task = get_task(cfg["task"], cfg)
    for split in dict.fromkeys((cfg["data"]["train_split"], cfg["data"]["val_split"])):
        task.build_dataset(cfg, split)
    build_on_meta(cfg)


def build_on_meta(cfg: CoreConfig) -> None:
    """Build the model (loading its pretrained file), optimizer and schedule of ``cfg`` on PyTorch's ``meta``
    device: every check their builders make, at no cost in memory or initialization time."""
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")  # loading weights into meta tensors is a no-op, and says so
        model = get_task(cfg["task"], cfg).build_model(cfg)
        build_scheduler(build_optimizer(model, cfg["optim"]), cfg["schedule"], cfg["train"]["iters"])
