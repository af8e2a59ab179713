"""Reading configs: YAML files with ``_base_`` inheritance, ``_delete_``, ``--set a.b=c`` overrides, and the one
validation pass that turns them into a typed config.

The schema is the task's ``config_class`` (a :class:`~densefuse.config.sections.CoreConfig` subclass): unknown
keys are errors with a did-you-mean hint, values are checked against the declared rules, then the sections'
cross-key checks, the model builder's check (head sections) and the task's own ``validate_config`` run, each
once, before any work starts. Every message names where the value came from (the file or ``--set``).
Files and ``--set`` values are read with YAML 1.2's core schema: ``off`` is a string, ``5e-4`` a float.
"""
from __future__ import annotations

import importlib.resources
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import yaml

from ..errors import ConfigError, UnknownKeyError, did_you_mean
from ..registry import MODELS, TASKS
from .schema import Origin, check_tree, get_dotted, merge, plain, type_name
from .sections import CoreConfig

PathLike = Union[str, Path]
#: the task a config without ``task:`` is for
DEFAULT_TASK = CoreConfig.defaults()["task"]


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
    if p.is_dir():
        raise ConfigError(f"config {name} is a directory; give a .yaml file")
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
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {e.start}: {e.reason}); a config is YAML text") from None
    if data is None:  # nothing but blanks and comments: a file saved empty by mistake, not "all defaults"
        raise ConfigError(f"{path}: the config file is empty (it holds no settings)")
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
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names, got {bases!r}")
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


def _written_keys(data: Mapping, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        out.add(prefix + k)
        if isinstance(v, Mapping):
            out |= _written_keys(v, prefix + k + ".")
    return out


def _set(cfg: dict, dotted: str, raw: str, open_keys: set[str]) -> None:
    keys = dotted.split(".")
    node: Any = cfg
    for i, k in enumerate(keys):
        path = ".".join(keys[: i + 1])
        open_section = ".".join(keys[:i]) in open_keys
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



#: keys every config held before tasks declared their own (densefuse <= 0.4), with the value they had unless a
#: user set it: a checkpoint or run directory of a task that does not declare them drops them at that value
LEGACY_KEYS: dict[str, Any] = {
    "data.pipeline": "batch", "data.scale": None, "data.ratio_range": [0.5, 2.0], "data.cat_max_ratio": 0.75,
    "data.test_scale": None, "model.neck": None, "model.init": None,
}


def drop_legacy_keys(data: Mapping[str, Any]) -> dict:
    """``data`` (a config saved by an older densefuse) without the :data:`LEGACY_KEYS` its task does not declare,
    where they hold their old default (a value a user set stays, and is then an unknown key)."""
    out = plain(data)
    task = out.get("task", DEFAULT_TASK)
    declared = config_class(task).rules() if isinstance(task, str) else {}
    for key, old in LEGACY_KEYS.items():
        section, _, name = key.rpartition(".")
        node = get_dotted(out, section)
        if key not in declared and isinstance(node, dict) and name in node and node[name] == old:
            del node[name]
    return out


def config_class(task: str) -> type[CoreConfig]:
    """The schema of a ``task`` config: the task class's ``config_class``."""
    return TASKS.get(task, key="task").config_class


def load_config(path: Optional[PathLike] = None, overrides: Iterable[str] = (), task_default: Optional[str] = None) -> CoreConfig:
    """Load a YAML config (with ``_base_`` inheritance), apply ``key=value`` overrides and validate every key,
    type and value: the typed config of its task."""
    if path is None:
        if task_default is None:
            raise ConfigError("no config given")
        path = task_default
    file = find_config(path)
    base, own = _load_layers(file)
    cfg = from_dict(merge(base, own), overrides, source=str(file), inherited=base, written=_written_keys(own))
    if cfg.name is None:
        cfg.name = file.stem
    return cfg


def from_dict(
    data: Mapping[str, Any],
    overrides: Iterable[str] = (),
    source: str = "config",
    inherited: Optional[Mapping[str, Any]] = None,
    written: Optional[set[str]] = None,
) -> CoreConfig:
    """Validate a plain config dict (e.g. one embedded in a checkpoint), fill defaults, apply overrides: the one
    validation pass: builders take the result and never check it again.

    ``inherited`` (what ``_base_`` files gave) and ``written`` (dotted keys the top file wrote) let a head or a
    dataset switched by the top file or ``--set`` drop the old one's inherited keys; without them every key
    counts as written by the user.
    """
    data = plain(data)
    task = data.get("task", DEFAULT_TASK)
    if not isinstance(task, str):
        raise ConfigError(f"{source}: 'task' must be one of {', '.join(TASKS.names())}, "
                          f"got {type_name(task)} {task!r}")
    schema = config_class(task)
    defaults, rules, open_keys = schema.defaults(), schema.rules(), schema.open_keys()
    check_tree(data, defaults, rules, open_keys, source=source)
    cfg = merge(defaults, data)
    pairs = parse_overrides(overrides)
    for k, v in pairs:
        _set(cfg, k, v, open_keys)

    def origin(path: str) -> str:
        for k, v in reversed(pairs):
            if path == k or path.startswith(k + ".") or k.startswith(path + "."):
                return f"--set {k}={v}"
        return source

    check_tree(cfg, defaults, rules, open_keys, source=origin)
    written_all = (set(written) if written is not None else _written_keys(data)) | {k for k, _ in pairs}
    inherited = inherited if inherited is not None else {}
    _check_model(cfg, inherited, written_all, origin)
    _reset_switched_eval_batch(cfg, inherited, written_all, defaults)
    out = schema.build(cfg)
    out.run_checks(origin)
    _validate_task(out, _switched_dataset_keys(cfg, inherited, written_all), origin)
    return out


def _check_model(cfg: dict, inherited: Mapping[str, Any], written: set[str], origin: Origin) -> None:
    """``model.type`` names a registered builder, whose own check (the head sections of ``encoder_decoder``)
    then runs on the tree."""
    name = cfg["model"]["type"]
    if name not in MODELS:
        known = MODELS.names()
        raise ConfigError(f"{origin('model.type')}: unknown model.type '{name}'"
                          f"{did_you_mean(str(name), known)}; available: {', '.join(known)}")
    check = MODELS.checker(name)
    if check is not None:
        check(cfg, inherited, written, origin)


def _reset_switched_eval_batch(cfg: dict, inherited: Mapping[str, Any], written: set[str], defaults: Mapping) -> None:
    """A ``_base_``'s ``eval.batch_size`` was chosen for its own dataset (the synthetic base batches its
    same-size images by 8): when the top file or ``--set`` switches ``data.type`` and the user did not write
    ``eval.batch_size``, it goes back to the default 1, which evaluates images of any size."""
    base = get_dotted(inherited, "data") or {}
    if base.get("type") is None or base.get("type") == cfg["data"]["type"] or "eval.batch_size" in written:
        return
    if (get_dotted(inherited, "eval") or {}).get("batch_size") is not None:
        cfg["eval"]["batch_size"] = defaults["eval"]["batch_size"]


def _switched_dataset_keys(cfg: Mapping[str, Any], inherited: Mapping[str, Any], written: set[str]) -> set[str]:
    """``data.kwargs`` keys a ``_base_`` file gave for another ``data.type`` than the config's (a switch by
    the top file or ``--set``) and that the user did not write: the task may drop them."""
    base = get_dotted(inherited, "data") or {}
    if base.get("type") is None or base.get("type") == cfg["data"]["type"]:
        return set()
    given = cfg["data"].get("kwargs") or {}
    return {f"data.kwargs.{k}" for k in (base.get("kwargs") or {}) if k in given and f"data.kwargs.{k}" not in written}


def _validate_task(cfg: CoreConfig, droppable: set[str], origin: Origin) -> None:
    """The task's own checks (``Task.validate_config``). A key it does not accept is dropped when it is
    in ``droppable`` (inherited for another dataset type), else the error names where the key came from."""
    droppable = set(droppable)
    task = TASKS.get(cfg.task, key="task")(cfg)
    while True:
        try:
            task.validate_config(cfg)
            return
        except UnknownKeyError as e:
            if e.key not in droppable:
                raise UnknownKeyError(f"{origin(e.key)}: {e}", e.key) from None
            droppable.discard(e.key)
            section, _, key = e.key.rpartition(".")
            del get_dotted(cfg, section)[key]


def dump(cfg: Mapping, path: PathLike) -> None:
    """Write the resolved config as YAML."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(plain(cfg), f, sort_keys=False)
