"""Configs: YAML files with ``_base_`` inheritance, ``--set a.b=c`` overrides and strict keys.

Every key must exist in :data:`DEFAULTS` (or, inside the open sections listed in :data:`OPEN`, be
accepted by the builder that reads them). Unknown keys are errors with a did-you-mean hint; values
must have the type of the default. Files are read with a safe loader using YAML 1.2 booleans (``off`` is a string).
"""
from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from .errors import ConfigError, did_you_mean

PathLike = Union[str, Path]

#: Every known key with its default. ``None`` accepts any type.
DEFAULTS: dict[str, Any] = {
    "task": "seg",
    "name": None,
    "seed": 0,
    "device": "auto",
    "work_dir": None,
    "model": {
        "type": "encoder_decoder",  # encoder_decoder | smp
        "num_classes": 1,
        "align_corners": False,
        "equalizer": {"mode": "explicit", "eps": 1.0e-5},
        "encoder": {"name": "resnet18", "out_indices": [1, 2, 3, 4], "output_stride": None,
                    "pretrained": None, "kwargs": {}},
        "decode_head": {"type": "uper"},
        "auxiliary_head": None,
        "smp": {"arch": "UPerNet", "encoder_name": "resnet18", "kwargs": {}},
        "sync_bn": None,  # null: SyncBatchNorm when training on more than one process
    },
    "data": {
        "type": "synthetic",
        "root": None,
        "train_split": "train",
        "val_split": "val",
        "crop_size": [128, 128],
        "mean": [123.675, 116.28, 103.53],
        "std": [58.395, 57.12, 57.375],
        "num_workers": 0,
        "kwargs": {},
        "augment": {"scale_range": [0.5, 2.0], "flip": True, "photometric": False},
    },
    "train": {
        "iters": 1000,
        "batch_size": 8,
        "val_interval": 500,
        "log_interval": 20,
        "ckpt_interval": 500,
        "amp": "off",  # off | fp16 (CUDA) | bf16 (CUDA or CPU)
        "grad_clip": None,
        "accum_steps": 1,  # micro-batches of batch_size per optimizer step
        "channels_last": False,
        "compile": False,  # torch.compile the model
        "keep_last": 1,  # iter_<N>.pth checkpoints kept besides latest.pth
        "tensorboard": False,  # also write TensorBoard scalars (needs the tensorboard package)
        "dist_timeout": 1800,  # seconds to wait for the other processes (rendezvous, collectives)
    },
    "optim": {"type": "adamw", "lr": 1.0e-3, "weight_decay": 0.01, "momentum": 0.9,
              "betas": [0.9, 0.999], "norm_decay": True},
    "schedule": {"type": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 0, "warmup_ratio": 1.0e-6},
    "calibration": {"num_images": 64, "batch_size": 8},
    "eval": {"batch_size": 1},
}

#: Sections whose keys are checked by the code that consumes them (head, dataset and timm kwargs).
OPEN = {
    "model.decode_head",
    "model.auxiliary_head",
    "model.encoder.kwargs",
    "model.smp.kwargs",
    "data.kwargs",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans: only true/false. ``mode: off`` stays the string 'off'."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
    for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _first in "tTfF":
    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list(_first)
    )


def safe_load(text: Any) -> Any:
    """``yaml.safe_load`` with YAML 1.2 booleans (see :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader


class Config(dict):
    """A nested dict with attribute access (``cfg.train.iters``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_dict(self) -> dict:
        return _plain(self)


def _plain(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _wrap(x: Any) -> Any:
    if isinstance(x, Mapping):
        return Config({k: _wrap(v) for k, v in x.items()})
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def merge(base: Mapping, override: Mapping) -> dict:
    """Recursive merge; ``_delete_: true`` in an override dict replaces instead of merging."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and not v.get("_delete_", False):
            out[k] = merge(out[k], v)
        else:
            out[k] = {kk: vv for kk, vv in v.items() if kk != "_delete_"} if isinstance(v, Mapping) else copy.deepcopy(v)
    return out


def config_dirs() -> list[Path]:
    """Where bare config names are looked up: ./configs, then the source checkout's configs/."""
    here = Path(__file__).resolve().parent.parent / "configs"
    return [Path.cwd() / "configs", here]


def find_config(name: PathLike) -> Path:
    """Resolve a config path; bare names like ``seg/synthetic_upernet_r18`` search :func:`config_dirs`."""
    p = Path(name)
    candidates = [p] if p.suffix else [p, p.with_suffix(".yaml")]
    if not p.is_absolute():
        for d in config_dirs():
            candidates += [d / c for c in list(candidates)]
    for c in candidates:
        if c.is_file():
            return c
    raise ConfigError(f"config file not found: {name}")


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    return data


def _load_file(path: Path, stack: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in stack:
        raise ConfigError(f"{path}: circular _base_ inheritance")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for b in bases:
        bp = (path.parent / b) if not Path(b).is_absolute() else Path(b)
        if not bp.is_file():
            raise ConfigError(f"{path}: _base_ file not found: {b}")
        merged = merge(merged, _load_file(bp, stack + (path,)))
    return merge(merged, data)


def _type_name(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}.get(type(v), type(v).__name__)


def _check(cfg: Mapping, defaults: Mapping, prefix: str = "", source: str = "") -> None:
    where = f"{source}: " if source else ""
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if key not in defaults:
            raise ConfigError(f"{where}unknown config key '{path}'{did_you_mean(key, defaults, prefix)}")
        default = defaults[key]
        if path in OPEN or default is None or value is None:
            continue
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}'{path}' must be a mapping, got {_type_name(value)}")
            _check(value, default, path + ".", source)
        elif not _type_ok(value, default):
            raise ConfigError(f"{where}'{path}' must be {_type_name(default)}, got {_type_name(value)} {value!r}")


def _type_ok(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _set(cfg: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node: Any = cfg
    for i, k in enumerate(keys):
        path = ".".join(keys[: i + 1])
        if not isinstance(node, dict) or k not in node:
            choices = node.keys() if isinstance(node, dict) else []
            parent = ".".join(keys[:i])
            raise ConfigError(f"--set {dotted}: no config key '{path}'{did_you_mean(k, choices, parent + '.' if parent else '')}")
        if i == len(keys) - 1:
            try:
                node[k] = safe_load(raw) if raw != "" else ""
            except yaml.YAMLError:
                node[k] = raw
        else:
            node = node[k]


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, str]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def load_config(path: Optional[PathLike] = None, overrides: Iterable[str] = (), task_default: Optional[str] = None) -> Config:
    """Load a YAML config (with ``_base_`` inheritance) on top of :data:`DEFAULTS`, apply
    ``key=value`` overrides and validate every key and type."""
    if path is None:
        if task_default is None:
            raise ConfigError("no config given")
        path = task_default
    file = find_config(path)
    cfg = from_dict(_load_file(file), overrides, source=str(file))
    if cfg.get("name") is None:
        cfg["name"] = file.stem
    return cfg


def defaults_for(task: str) -> dict:
    """:data:`DEFAULTS` plus the task's own section ``{task: task.config_section}`` (when it has one)."""
    from .tasks import task_class

    defaults = copy.deepcopy(DEFAULTS)
    section = task_class(task).config_section
    if section:
        defaults[task] = copy.deepcopy(dict(section))
    return defaults


def from_dict(data: Mapping[str, Any], overrides: Iterable[str] = (), source: str = "config") -> Config:
    """Validate a plain config dict (e.g. one embedded in a checkpoint), fill defaults, apply overrides."""
    defaults = defaults_for(str(data.get("task", DEFAULTS["task"])))
    _check(data, defaults, source=source)
    cfg = merge(defaults, data)
    for k, v in parse_overrides(overrides):
        _set(cfg, k, v)
    _check(cfg, defaults, source="--set")
    return _wrap(cfg)


def check_kwargs(section: str, kwargs: Mapping[str, Any], accepted: Iterable[str]) -> None:
    """Raise a :class:`ConfigError` naming ``section.key`` for every key a builder does not accept."""
    accepted = list(accepted)
    for k in kwargs:
        if k not in accepted:
            raise ConfigError(f"unknown config key '{section}.{k}'{did_you_mean(k, accepted, section + '.')}")


def dump(cfg: Mapping, path: PathLike) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(_plain(cfg), f, sort_keys=False)
