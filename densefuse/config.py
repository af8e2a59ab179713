"""Configs: YAML files with ``_base_`` inheritance, ``--set a.b=c`` overrides and strict keys.

Every key must exist in :data:`DEFAULTS` (or, inside the open sections listed in :data:`OPEN`, be
accepted by the builder that reads them). Unknown keys are errors with a did-you-mean hint. Values are
checked against :data:`RULES` (type, range, choices; keys whose default is ``null`` declare their type
there) or else must have the type of the default. All of it runs at load time, before any work starts.
Files and ``--set`` values are read with YAML 1.2's core schema: ``off`` is a string, ``5e-4`` a float.
"""
from __future__ import annotations

import copy
import importlib.resources
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import yaml

from .errors import ConfigError, UnknownKeyError, did_you_mean

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
        "encoder": {"name": "resnet18", "out_indices": None, "output_stride": None,
                    "pretrained": None, "kwargs": {}},
        "decode_head": {"type": "uper"},
        "auxiliary_head": None,
        "smp": {"arch": "UPerNet", "encoder_name": "resnet18", "kwargs": {}},
        "sync_bn": None,  # null: SyncBatchNorm when training on more than one process
        "neck": None,  # depth model: {type: hahi, ...} (tasks/depth/model.py NECK_KEYS) or null
        "init": None,  # depth model: gedepth | torch (null: torch) initialisation of its decoder and necks
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
        # batch: crop-then-scale augmentation on the whole batch (densefuse.data.augment);
        # mmseg: RandomResize on the whole image + RandomCrop(cat_max_ratio) per sample (tasks/seg/pipeline.py)
        "pipeline": "batch",
        "scale": None,  # mmseg RandomResize reference scale [long, short]; null = the dataset's
        "ratio_range": [0.5, 2.0],
        "cat_max_ratio": 0.75,
        "test_scale": None,  # test-time keep-ratio Resize [long, short]; null = the dataset's; [] = none
        "verify": None,  # decode every sample before training (densefuse check-data); null: when under 2000 samples
        "skip_bad": False,  # replace an unreadable sample by the next readable one (deterministic) instead of stopping
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
        "compile": False,  # torch.compile the model: false, true (inductor) or a torch.compile backend name
        "keep_last": 1,  # iter_<N>.pth checkpoints kept besides latest.pth
        "tensorboard": False,  # also write TensorBoard scalars (needs the tensorboard package)
        "dist_timeout": 1800,  # seconds to wait for the other processes (rendezvous, collectives)
        "nonfinite": "stop",  # inf/nan loss or gradient norm: stop (nothing written after the last finite state) | skip
        "nonfinite_limit": 10,  # with skip: stop once more steps than this were dropped
    },
    "optim": {"type": "adamw", "lr": 1.0e-3, "weight_decay": 0.01, "momentum": 0.9,
              "betas": [0.9, 0.999], "norm_decay": True,
              # mmseg's paramwise_cfg: custom_keys {substring: {lr_mult, decay_mult}}, multipliers for norms,
              # biases and depthwise convs, ConvNeXt's layer_decay {rate, num_layers, family}
              "paramwise": {"custom_keys": {}, "norm_decay_mult": None, "bias_decay_mult": None,
                            "bias_lr_mult": None, "dwconv_decay_mult": None, "layer_decay": None}},
    "schedule": {"type": "poly", "power": 1.0, "min_lr": 0.0, "warmup_iters": 0, "warmup_ratio": 1.0e-6},
    "calibration": {"num_images": 64, "batch_size": 8},
    "eval": {
        "batch_size": 1,
        "mode": "whole",  # whole | slide (densefuse.inference)
        "crop_size": None,  # slide window [h, w]
        "stride": None,  # slide stride [h, w]
        "slide_batch": 8,  # windows per forward call
        "tta": {"flip": False, "scales": None},  # scales: ratios, e.g. mmseg's [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
    },
}

#: Sections whose keys are checked by the code that consumes them (head, dataset and timm kwargs).
OPEN = {
    "model.decode_head",
    "model.auxiliary_head",
    "model.neck",
    "model.encoder.kwargs",
    "model.smp.kwargs",
    "data.kwargs",
    "optim.paramwise.custom_keys",
    "optim.paramwise.layer_decay",
}


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalars: only true/false are booleans (``mode: off`` stays
    the string 'off'), ``5e-4`` / ``1E3`` are floats, ``010`` is the int 10 and ``1:20`` a string."""


_YAML12 = {
    "tag:yaml.org,2002:bool": (r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    "tag:yaml.org,2002:int": (r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    "tag:yaml.org,2002:float": (
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        "-+.0123456789",
    ),
}
_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag not in _YAML12] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# ints first: a digit string that is an int must not resolve as a float
for _tag in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"):
    _Loader.add_implicit_resolver(_tag, re.compile(_YAML12[_tag][0]), list(_YAML12[_tag][1]))


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith("0o"):
        return int(text[2:], 8)
    return int(text, 0) if text.startswith("0x") else int(text, 10)


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping names one key twice: plain YAML keeps the last silently, so a config would not run what
    it says (two top-level ``train:`` blocks once doubled a paper config's batch size)."""


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue  # ``<<`` merges may override keys on purpose
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise DuplicateKeyError(
                problem=f"duplicate key '{key}' (first at line {seen[key] + 1}; YAML would keep only the last)",
                problem_mark=key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _construct_mapping  # type: ignore[method-assign]


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
    """Where bare config names are looked up: ``./configs`` (the user's own), then the configs shipped
    with the package (``densefuse_configs``; the repository's ``configs/`` folder in a source checkout)."""
    dirs = [Path.cwd() / "configs"]
    try:  # a regular package on disk (wheels install it unzipped), so its files() is a real path
        dirs.append(Path(str(importlib.resources.files("densefuse_configs"))))
    except ModuleNotFoundError:  # running from a source tree that is not installed
        pass
    checkout = Path(__file__).resolve().parent.parent / "configs"
    if checkout not in dirs:
        dirs.append(checkout)
    return dirs


def find_config(name: PathLike) -> Path:
    """Resolve a config path; bare names like ``seg/synthetic_upernet_r18`` search :func:`config_dirs`."""
    p = Path(name)
    # names may contain dots (``gedepth-vanilla_swin-l_8xb2-76.8k_kitti-352x704``): only .yaml/.yml is a suffix
    candidates = [p] if p.suffix in (".yaml", ".yml") else [p, p.parent / (p.name + ".yaml")]
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
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}:{e.problem_mark.line + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise ConfigError(f"{where}: invalid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level")
    return data


def _load_layers(path: Path, stack: tuple[Path, ...] = ()) -> tuple[dict, dict]:
    """(everything the ``_base_`` files give, the file's own keys) for ``path``."""
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
    return merged, data


def _load_file(path: Path, stack: tuple[Path, ...] = ()) -> dict:
    base, own = _load_layers(path, stack)
    return merge(base, own)


# ---------------------------------------------------------------------------------------------- schema
@dataclass(frozen=True)
class Rule:
    """What one config value may be: a kind, optional null, bounds, choices, a pattern, list shape."""

    kind: str  # "int" | "number" | "str" | "bool" | "list" | "mapping" | "name" | "any"
    nullable: bool = False
    min: Optional[float] = None  # inclusive lower bound
    gt: Optional[float] = None  # exclusive lower bound
    lt: Optional[float] = None  # exclusive upper bound
    choices: Optional[tuple] = None
    pattern: Optional[str] = None
    length: Optional[int] = None  # for lists
    item: Optional["Rule"] = None  # rule of every list item
    ignore_case: bool = False  # string choices compared case-insensitively (``AdamW`` is ``adamw``)

    def ok(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.choices is not None:
            if self.ignore_case and isinstance(value, str):
                return value.lower() in self.choices
            return value in self.choices and (self.kind != "int" or isinstance(value, int))
        if not _KIND_OK[self.kind](value):
            return False
        if self.kind in ("int", "number"):
            return ((self.min is None or value >= self.min) and (self.gt is None or value > self.gt)
                    and (self.lt is None or value < self.lt))
        if self.pattern is not None:
            return re.fullmatch(self.pattern, value) is not None
        if self.kind == "list":
            return (self.length is None or len(value) == self.length) and (
                self.item is None or all(v is not None and self.item.ok(v) for v in value))
        return True

    def describe(self) -> str:
        if self.choices is not None:
            text = "one of " + ", ".join(str(c) for c in self.choices if c is not None)
        elif self.kind == "list":
            n = f"{self.length} " if self.length is not None else ""
            item = self.item.describe() if self.item else "value"
            first, _, rest = item.partition(" ")
            text = f"a list of {n}{first}s" + (f" {rest}" if rest else "")
        else:
            text = {"int": "int", "number": "number", "str": "str", "bool": "bool", "mapping": "mapping",
                    "name": "a name", "any": "any value"}[self.kind]
            if self.pattern is not None:
                text = self.pattern_text or text
            bounds = [f">= {_num(self.min)}" if self.min is not None else "",
                      f"> {_num(self.gt)}" if self.gt is not None else "",
                      f"< {_num(self.lt)}" if self.lt is not None else ""]
            text = " ".join([text] + [b for b in bounds if b])
        return text + (" or null" if self.nullable else "")

    @property
    def pattern_text(self) -> Optional[str]:
        return _PATTERN_TEXT.get(self.pattern or "")


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_KIND_OK = {
    "int": _is_int,
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "list": lambda v: isinstance(v, (list, tuple)),
    "mapping": lambda v: isinstance(v, Mapping),
    # a registry or dataset name: any scalar passes here, so the code that knows the names lists them
    "name": lambda v: isinstance(v, (str, int, float, bool)),
    "any": lambda v: True,
}

_DEVICE = r"auto|cpu|mps|cuda(?::[0-9]+)?"
_PATTERN_TEXT = {_DEVICE: "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"}

_POS_INT = Rule("int", min=1)
_NUM = Rule("number")

#: Value rules, by dotted key. Keys not listed must have the type of their default (any type when the
#: default is null and no rule is listed). Tasks check their own section in ``Task.validate_config``.
RULES: dict[str, Rule] = {
    "task": Rule("name"),  # any scalar reaches get_task, which lists the installed tasks
    "name": Rule("str", nullable=True),
    "seed": Rule("int", min=0),
    "device": Rule("str", pattern=_DEVICE),
    "work_dir": Rule("str", nullable=True),
    "model.type": Rule("name"),
    "model.num_classes": _POS_INT,
    "model.equalizer.mode": Rule("str", choices=("off", "explicit", "fold")),
    "model.equalizer.eps": Rule("number", gt=0),
    "model.encoder.name": Rule("str"),
    "model.encoder.out_indices": Rule("list", nullable=True, item=Rule("int")),
    "model.encoder.output_stride": Rule("int", nullable=True, choices=(8, 16, 32, None)),
    "model.encoder.pretrained": Rule("str", nullable=True),
    "model.auxiliary_head": Rule("mapping", nullable=True),
    "model.sync_bn": Rule("bool", nullable=True),
    "model.neck": Rule("mapping", nullable=True),
    "model.init": Rule("str", nullable=True, choices=("gedepth", "torch", None)),
    "data.type": Rule("name"),
    "data.root": Rule("str", nullable=True),
    "data.crop_size": Rule("list", length=2, item=_POS_INT),
    "data.mean": Rule("list", length=3, item=_NUM),
    "data.std": Rule("list", length=3, item=Rule("number", gt=0)),
    "data.num_workers": Rule("int", min=0),
    "data.augment.scale_range": Rule("list", length=2, item=Rule("number", gt=0)),
    "data.pipeline": Rule("str", choices=("batch", "mmseg")),
    "data.scale": Rule("list", nullable=True, length=2, item=_POS_INT),
    "data.ratio_range": Rule("list", length=2, item=Rule("number", gt=0)),
    "data.cat_max_ratio": Rule("number", gt=0, lt=1.000001),
    "data.test_scale": Rule("list", nullable=True, item=_POS_INT),
    "train.iters": _POS_INT,
    "train.batch_size": _POS_INT,
    "train.val_interval": _POS_INT,
    "train.log_interval": _POS_INT,
    "train.ckpt_interval": _POS_INT,
    "train.grad_clip": Rule("number", nullable=True, gt=0),
    "train.amp": Rule("str", choices=("off", "fp16", "bf16")),
    "train.compile": Rule("any"),  # a bool or a backend name: densefuse.engine.step.check_compile
    "train.accum_steps": _POS_INT,
    "train.keep_last": Rule("int", min=0),
    "train.dist_timeout": Rule("number", gt=0),
    "train.nonfinite": Rule("str", choices=("stop", "skip")),
    "train.nonfinite_limit": Rule("int", min=0),
    "data.verify": Rule("bool", nullable=True),
    "data.skip_bad": Rule("bool"),
    "optim.type": Rule("str", choices=("adamw", "sgd"), ignore_case=True),
    "optim.lr": Rule("number", gt=0),
    "optim.weight_decay": Rule("number", min=0),
    "optim.momentum": Rule("number", min=0),
    "optim.betas": Rule("list", length=2, item=Rule("number", min=0, lt=1)),
    "optim.paramwise.custom_keys": Rule("mapping"),
    "optim.paramwise.norm_decay_mult": Rule("number", nullable=True, min=0),
    "optim.paramwise.bias_decay_mult": Rule("number", nullable=True, min=0),
    "optim.paramwise.bias_lr_mult": Rule("number", nullable=True, min=0),
    "optim.paramwise.dwconv_decay_mult": Rule("number", nullable=True, min=0),
    "optim.paramwise.layer_decay": Rule("mapping", nullable=True),
    "schedule.type": Rule("str", choices=("poly", "constant", "cosine")),
    "schedule.power": Rule("number", min=0),
    "schedule.min_lr": Rule("number", min=0),
    "schedule.warmup_iters": Rule("int", min=0),
    "schedule.warmup_ratio": Rule("number", gt=0),
    "calibration.num_images": Rule("int", nullable=True, min=1),
    "calibration.batch_size": Rule("int", min=2),
    "eval.batch_size": _POS_INT,
    "eval.mode": Rule("str", choices=("whole", "slide")),
    "eval.crop_size": Rule("list", nullable=True, length=2, item=_POS_INT),
    "eval.stride": Rule("list", nullable=True, length=2, item=_POS_INT),
    "eval.slide_batch": _POS_INT,
    "eval.tta.flip": Rule("bool"),
    "eval.tta.scales": Rule("list", nullable=True, item=Rule("number", gt=0)),
}


def _rule_from_default(default: Any) -> Rule:
    if isinstance(default, bool):
        return Rule("bool")
    if isinstance(default, float):
        return Rule("number")
    if isinstance(default, int):
        return Rule("int")
    if isinstance(default, str):
        return Rule("str")
    if isinstance(default, (list, tuple)):
        return Rule("list")
    if isinstance(default, Mapping):
        return Rule("mapping")
    return Rule("any", nullable=True)


def _type_name(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping",
            type(None): "null"}.get(type(v), type(v).__name__)


def _fail(path: str, rule: Rule, value: Any, where: str, extra: str = "") -> ConfigError:
    return ConfigError(f"{where}'{path}' must be {rule.describe()}{extra}, got {_type_name(value)} {value!r}")


def _check(cfg: Mapping, defaults: Mapping, prefix: str = "", source: Union[str, Callable[[str], str]] = "",
           rules: Optional[Mapping[str, Rule]] = None) -> None:
    """Unknown keys (with a hint) and every value against its :class:`Rule` (``rules``, default
    :data:`RULES`). ``source`` names where a value came from (a file, ``--set``), or maps a dotted key to
    that name."""
    rules = RULES if rules is None else rules
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        src = source(path) if callable(source) else source
        where = f"{src}: " if src else ""
        if key not in defaults:
            raise ConfigError(f"{where}unknown config key '{path}'{did_you_mean(key, defaults, prefix)}")
        default = defaults[key]
        rule = rules.get(path) or _rule_from_default(default)
        if not rule.ok(value):
            raise _fail(path, rule, value, where)
        if path in OPEN or value is None:
            continue
        if isinstance(default, Mapping):
            _check(value, default, path + ".", source, rules)


# ------------------------------------------------------------------------------------------ heads
HEAD_SECTIONS = ("model.decode_head", "model.auxiliary_head")


def _get(cfg: Mapping, dotted: str) -> Any:
    node: Any = cfg
    for k in dotted.split("."):
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


def _fits(value: Any, default: Any) -> bool:
    """Whether ``value`` has the kind of a head argument's default (no default: anything fits)."""
    if default is None or default is inspect.Parameter.empty or value is None:
        return True
    return _rule_from_default(default).ok(value) or (isinstance(default, float) and _KIND_OK["number"](value))


def _check_heads(cfg: dict, inherited: Mapping, written: set[str], source: Callable[[str], str]) -> None:
    """Validate the head sections against the head they name, before any model is built.

    When the head type differs from the one the ``_base_`` files give (a switch by the top file or
    ``--set``), inherited keys the new head does not take (unknown, or of the wrong kind, e.g. UPerHead's
    ``in_index`` list for PSPHead) are dropped: the new head's defaults apply. Keys the user wrote (in
    the top file or ``--set``) are never dropped: a wrong one is an error saying what to change.
    """
    if cfg["model"]["type"] != "encoder_decoder":
        return
    from .model import head_arguments  # the model module imports this one
    from .registry import HEADS

    for section in HEAD_SECTIONS:
        spec = _get(cfg, section)
        if not spec:
            continue
        base = _get(inherited, section) or {}
        switched = base.get("type") is not None and spec.get("type") != base.get("type")
        try:
            accepted = head_arguments(section, spec)
        except ConfigError as e:  # an unknown type or predictor: name where that key came from
            key = "predictor" if f"{section}.predictor" in str(e) else "type"
            raise ConfigError(f"{source(f'{section}.{key}')}: {e}") from None
        choices = _head_choices(section, spec)
        kind = f"{section}.type '{spec.get('type')}'"
        for key in list(spec):
            path = f"{section}.{key}"
            ok = key in accepted and _fits(spec[key], accepted[key])
            bad_choice = key in accepted and key in choices and spec[key] not in choices[key]
            if ok and not bad_choice:
                continue
            if switched and path not in written and key in base:
                del spec[key]
                continue
            where = f"{source(path)}: "
            if bad_choice:  # whatever its type: the choices say what to write
                raise ConfigError(f"{where}'{path}' must be one of {', '.join(choices[key])}, "
                                  f"got {_type_name(spec[key])} {spec[key]!r}"
                                  f"{did_you_mean(str(spec[key]), choices[key])}")
            if key not in accepted:
                hint = did_you_mean(key, accepted, section + ".")
                names = ", ".join(k for k in accepted if k != "type")
                raise ConfigError(f"{where}unknown config key '{path}' for {kind}{hint}; remove it "
                                  f"(that head takes: {names})")
            want = _rule_from_default(accepted[key]).describe()
            raise ConfigError(f"{where}'{path}' must be {want} for {kind}, got {_type_name(spec[key])} "
                              f"{spec[key]!r}; remove it to use the default {_plain(accepted[key])!r}")
        missing = [k for k, default in accepted.items() if default is inspect.Parameter.empty and k not in spec]
        if missing:
            raise ConfigError(f"{source(section + '.type')}: {kind} needs '{section}.{missing[0]}' "
                              f"(required arguments: {', '.join(missing)})")
        need, why = getattr(HEADS.get(spec["type"]), "min_batch_size", lambda _: (1, ""))(spec)
        batch = cfg["train"]["batch_size"]
        if batch < need:
            raise ConfigError(f"{source('train.batch_size')}: train.batch_size={batch} is too small for {kind}: "
                              f"{why}; use train.batch_size >= {need}")


def _head_choices(section: str, spec: Mapping[str, Any]) -> dict[str, tuple]:
    """Allowed values a head declares for some of its arguments (``arg_choices``)."""
    from .registry import HEADS

    return dict(getattr(HEADS.get(spec.get("type"), key=f"{section}.type"), "arg_choices", {}))


def _written_keys(data: Mapping, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        out.add(prefix + k)
        if isinstance(v, Mapping):
            out |= _written_keys(v, prefix + k + ".")
    return out


def _set(cfg: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node: Any = cfg
    for i, k in enumerate(keys):
        path = ".".join(keys[: i + 1])
        open_section = ".".join(keys[:i]) in OPEN
        if not isinstance(node, dict) or (k not in node and not (open_section and i == len(keys) - 1)):
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
    ``key=value`` overrides and validate every key, type and value."""
    if path is None:
        if task_default is None:
            raise ConfigError("no config given")
        path = task_default
    file = find_config(path)
    base, own = _load_layers(file)
    cfg = from_dict(merge(base, own), overrides, source=str(file), inherited=base, written=_written_keys(own))
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


def rules_for(task: str) -> dict[str, Rule]:
    """:data:`RULES` plus the task's rules for its own section: a task class may declare
    ``config_rules = {key: Rule}`` (keys inside its section, e.g. ``{"eval_crop": Rule("str",
    choices=...)}``) so a wrong value of any type lists the choices."""
    from .tasks import task_class

    own = getattr(task_class(task), "config_rules", None) or {}
    return {**RULES, **{f"{task}.{k}": r for k, r in own.items()}}


def from_dict(
    data: Mapping[str, Any],
    overrides: Iterable[str] = (),
    source: str = "config",
    inherited: Optional[Mapping[str, Any]] = None,
    written: Optional[set[str]] = None,
) -> Config:
    """Validate a plain config dict (e.g. one embedded in a checkpoint), fill defaults, apply overrides.

    ``inherited`` (what ``_base_`` files gave) and ``written`` (dotted keys the top file wrote) let a
    head switched by the top file or ``--set`` drop the old head's inherited keys; without them every
    key counts as written by the user.
    """
    task = data.get("task", DEFAULTS["task"])
    if not isinstance(task, str):
        from .tasks import available_tasks

        raise ConfigError(f"{source}: 'task' must be one of {', '.join(available_tasks())}, "
                          f"got {_type_name(task)} {task!r}")
    defaults = defaults_for(task)
    _check(data, defaults, source=source)
    cfg = merge(defaults, data)
    pairs = parse_overrides(overrides)
    for k, v in pairs:
        _set(cfg, k, v)
    set_keys = {k for k, _ in pairs}

    def origin(path: str) -> str:
        for k, v in reversed(pairs):
            if path == k or path.startswith(k + ".") or k.startswith(path + "."):
                return f"--set {k}={v}"
        return source

    rules = rules_for(task)
    _check(cfg, defaults, source=origin, rules=rules)
    written_all = (set(written) if written is not None else _written_keys(data)) | set_keys
    inherited = inherited if inherited is not None else {}
    _check_model_type(cfg, origin)
    _check_heads(cfg, inherited, written_all, origin)
    _check_sections(cfg, origin)
    _reset_switched_eval_batch(cfg, inherited, written_all)
    out = _wrap(cfg)
    _validate_task(task, out, _switched_dataset_keys(cfg, inherited, written_all), origin)
    return out


def _reset_switched_eval_batch(cfg: dict, inherited: Mapping[str, Any], written: set[str]) -> None:
    """A ``_base_``'s ``eval.batch_size`` was chosen for its own dataset (the synthetic base batches its
    same-size images by 8): when the top file or ``--set`` switches ``data.type`` and the user did not write
    ``eval.batch_size``, it goes back to the default 1, which evaluates images of any size."""
    base = _get(inherited, "data") or {}
    if base.get("type") is None or base.get("type") == cfg["data"]["type"] or "eval.batch_size" in written:
        return
    if (_get(inherited, "eval") or {}).get("batch_size") is not None:
        cfg["eval"]["batch_size"] = DEFAULTS["eval"]["batch_size"]


def _switched_dataset_keys(cfg: Mapping[str, Any], inherited: Mapping[str, Any], written: set[str]) -> set[str]:
    """``data.kwargs`` keys a ``_base_`` file gave for another ``data.type`` than the config's (a switch by
    the top file or ``--set``) and that the user did not write: the task may drop them."""
    base = _get(inherited, "data") or {}
    if base.get("type") is None or base.get("type") == cfg["data"]["type"]:
        return set()
    given = cfg["data"].get("kwargs") or {}
    return {f"data.kwargs.{k}" for k in (base.get("kwargs") or {}) if k in given and f"data.kwargs.{k}" not in written}


def _validate_task(task: str, cfg: Config, droppable: set[str], source: Callable[[str], str]) -> None:
    """The task's own checks (``Task.validate_config``). A key it does not accept is dropped when it is
    in ``droppable`` (inherited for another dataset type), else the error names where the key came from."""
    droppable = set(droppable)
    while True:
        try:
            _task_class(task)(cfg).validate_config(cfg)
            return
        except UnknownKeyError as e:
            if e.key not in droppable:
                raise UnknownKeyError(f"{source(e.key)}: {e}", e.key) from None
            droppable.discard(e.key)
            section, _, key = e.key.rpartition(".")
            del _get(cfg, section)[key]


def _check_model_type(cfg: Mapping[str, Any], source: Callable[[str], str]) -> None:
    """``model.type`` names a registered model builder (the task's own, e.g. depth's, registered on import)."""
    from .registry import MODELS

    name = cfg["model"]["type"]
    if name not in MODELS:
        known = MODELS.names()
        raise ConfigError(f"{source('model.type')}: unknown model.type '{name}'{did_you_mean(str(name), known)}; "
                          f"available: {', '.join(known)}")


def _check_sections(cfg: Mapping[str, Any], source: Callable[[str], str]) -> None:
    """Cross-key checks of the inference (``eval``) and param-wise optimizer (``optim.paramwise``) sections,
    by the code that reads them, so a slide mode without a window fails at load time."""
    from .engine.optim import check_paramwise
    from .inference import check_eval_config

    for section, check in (("eval", check_eval_config), ("optim.paramwise", check_paramwise)):
        try:
            check(_get(cfg, section))
        except ConfigError as e:
            raise ConfigError(f"{source(section)}: {e}") from None


def _task_class(name: str) -> Any:
    from .tasks import task_class

    return task_class(name)


def check_kwargs(section: str, kwargs: Mapping[str, Any], accepted: Iterable[str], owner: str = "") -> None:
    """Raise an :class:`~densefuse.errors.UnknownKeyError` naming ``section.key`` for the first key a builder
    does not accept. ``owner`` (e.g. ``"data.type 'ade20k'"``) adds what reads the section and the keys it takes."""
    accepted = list(accepted)
    for k in kwargs:
        if k not in accepted:
            hint = did_you_mean(k, accepted, section + ".")
            takes = f" for {owner}{hint}; it takes: {', '.join(accepted) or 'none'}" if owner else hint
            raise UnknownKeyError(f"unknown config key '{section}.{k}'{takes}", f"{section}.{k}")


def dump(cfg: Mapping, path: PathLike) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(_plain(cfg), f, sort_keys=False)
