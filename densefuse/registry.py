"""Named builders chosen by a config string: heads, predictors, models and tasks.

One small :class:`Registry` per kind. A config's ``type`` string is looked up with :meth:`Registry.get`,
which raises a :class:`~densefuse.errors.ConfigError` naming the key, a did-you-mean hint and the
available names. The registries live here (not in the packages that fill them) so that a head module
and ``densefuse.heads`` never import each other.
"""
from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any, Callable, Iterator, Optional, TypeVar

from .errors import ConfigError, did_you_mean

T = TypeVar("T")


class Registry:
    """Name -> object (a class or a builder function).

    ``register("name")`` is a decorator, ``register("name", obj)`` a call; ``register_lazy("name",
    "module:attr")`` defers the import until the name is first looked up (so that importing densefuse
    does not import an optional dependency such as segmentation_models_pytorch). With ``group``, names
    installed under that entry-point group are found too (loaded at their first lookup). ``check`` registers
    a config check with an entry (``model.type`` builders check their sections at config load, see
    :meth:`checker`); ``on_load(name, obj)`` runs for every object added.
    """

    def __init__(self, kind: str, group: Optional[str] = None,
                 on_load: Optional[Callable[[str, Any], None]] = None) -> None:
        self.kind = kind
        self.group = group
        self._on_load = on_load
        self._items: dict[str, Any] = {}
        self._lazy: dict[str, str] = {}
        self._checks: dict[str, Callable[..., None]] = {}

    def register(self, name: str, obj: Any = None, check: Optional[Callable[..., None]] = None) -> Any:
        """Add ``obj`` under ``name``; without ``obj``, return a decorator that does."""
        if obj is None:
            def deco(o: T) -> T:
                self.register(name, o, check)
                return o

            return deco
        if self._on_load is not None:
            self._on_load(name, obj)
        self._items[name] = obj
        self._lazy.pop(name, None)
        if check is not None:
            self._checks[name] = check
        return obj

    def checker(self, name: str) -> Optional[Callable[..., None]]:
        """The config check registered with ``name`` (None when it has none)."""
        return self._checks.get(name)

    def _installed(self) -> dict[str, Any]:
        return {ep.name: ep for ep in entry_points(group=self.group)} if self.group else {}

    def register_lazy(self, name: str, target: str) -> None:
        """Add ``name`` as ``"package.module:attribute"``, imported at the first :meth:`get`."""
        if name not in self._items:
            self._lazy[name] = target

    def get(self, name: Any, key: Optional[str] = None) -> Any:
        """The object registered as ``name``; an unknown name is a ConfigError naming ``key``."""
        if isinstance(name, str) and name in self._items:
            return self._items[name]
        if isinstance(name, str) and name in self._lazy:
            module, _, attr = self._lazy.pop(name).partition(":")
            return self.register(name, getattr(importlib.import_module(module), attr))
        installed = self._installed() if isinstance(name, str) else {}
        if name in installed:
            return self.register(name, installed[name].load())
        what = key or f"{self.kind} type"
        known = self.names()
        raise ConfigError(
            f"unknown {what} '{name}'{did_you_mean(str(name), known)}; available: {', '.join(known) or 'none'}"
        )

    def names(self) -> list[str]:
        """Every registered name (lazy and installed ones included), sorted."""
        return sorted(set(self._items) | set(self._lazy) | set(self._installed()))

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items) + len(self._lazy)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def arguments(obj: Callable) -> dict[str, Any]:
    """Keyword arguments ``obj`` accepts, with their defaults (``inspect.Parameter.empty`` when required).

    For a class, the ``__init__`` of every base up to ``nn.Module``/``object`` is included, so a head
    that forwards ``**kwargs`` to its base reports the base's arguments too.
    """
    out: dict[str, Any] = {}
    funcs: list[Callable] = []
    if inspect.isclass(obj):
        for klass in obj.__mro__:
            if klass.__module__.startswith("torch.") or klass is object:
                break
            if "__init__" in vars(klass):
                funcs.append(vars(klass)["__init__"])
    else:
        funcs.append(obj)
    for fn in funcs:
        for p in inspect.signature(fn).parameters.values():
            if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            out.setdefault(p.name, p.default)
    return out


#: decoders (``model.decode_head.type``): return their fused feature map
HEADS = Registry("head")
#: predictors (``model.decode_head.predictor``): turn a decoder's features into the task output
PREDICTORS = Registry("predictor")
#: model builders (``model.type``): ``builder(cfg) -> nn.Module``, with the check of their config sections
MODELS = Registry("model")
#: entry-point group of task plugins (``seg`` ships as ``densefuse_tasks.seg:SegTask``)
TASK_GROUP = "densefuse.tasks"
#: tasks: registered in code (``densefuse.tasks.register_task``) or installed under :data:`TASK_GROUP`; each
#: task class is told the name it is registered under
TASKS = Registry("task", group=TASK_GROUP, on_load=lambda name, cls: setattr(cls, "name", name))
