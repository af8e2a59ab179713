"""How a config section is declared: dataclass fields with a default, a :class:`Rule` and a one-line doc.

A section is a dataclass deriving from :class:`Section`; each field is written once with :func:`setting`
(a value) or :func:`section` (a nested section). Everything else is derived from those declarations: the
defaults tree, the dotted-key rules, the open sub-mappings that a builder checks, the docs of
``docs/configs.md``. A validated section instance is also a mutable mapping (``cfg["train"]["iters"]``
and ``cfg.train.iters`` both work), so code that reads configs as dicts keeps working and checkpoints embed
the plain dict :meth:`Section.to_dict` gives.
"""
from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

from ..errors import ConfigError, UnknownKeyError, did_you_mean

#: where a value came from, given its dotted key: a file name, ``--set k=v`` or ``""``
Origin = Callable[[str], str]


# ------------------------------------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rule:
    """What one config value may be: a kind, optional null, bounds, choices, a pattern, list shape."""

    kind: str  # "int" | "number" | "str" | "bool" | "list" | "mapping" | "name" | "any"
    nullable: bool = False
    min: Optional[float] = None  # inclusive lower bound
    max: Optional[float] = None  # inclusive upper bound
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
                    and (self.max is None or value <= self.max) and (self.lt is None or value < self.lt))
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
                text = PATTERN_TEXT.get(self.pattern) or text
            bounds = [f">= {_num(self.min)}" if self.min is not None else "",
                      f"> {_num(self.gt)}" if self.gt is not None else "",
                      f"<= {_num(self.max)}" if self.max is not None else "",
                      f"< {_num(self.lt)}" if self.lt is not None else ""]
            text = " ".join([text] + [b for b in bounds if b])
        return text + (" or null" if self.nullable else "")


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

DEVICE_PATTERN = r"auto|cpu|mps|cuda(?::[0-9]+)?"
#: how a pattern is named in messages
PATTERN_TEXT = {DEVICE_PATTERN: "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"}


def rule_from_default(default: Any) -> Rule:
    """The rule of a field that declares none: the type of its default (anything when it is null)."""
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


def type_name(v: Any) -> str:
    """How a value's type is named in messages (YAML words: mapping, null)."""
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping",
            type(None): "null"}.get(type(v), "mapping" if isinstance(v, Mapping) else type(v).__name__)


# ---------------------------------------------------------------------------------------------- fields
def setting(default: Any, rule: Optional[Rule] = None, doc: str = "", open: bool = False) -> Any:
    """One config value: its ``default``, its :class:`Rule` (default: the type of the default) and a
    one-line ``doc``. ``open``: a mapping whose keys are checked by the builder that reads it (head,
    dataset and timm kwargs)."""
    meta = {"rule": rule, "doc": doc, "open": open}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def subsection(cls: type["Section"], doc: str = "") -> Any:
    """A nested section of type ``cls`` (filled with its own defaults)."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc, "section": cls})


def configclass(cls: type) -> type:
    """Make ``cls`` (a :class:`Section` subclass) a dataclass of settings: mapping equality and repr kept."""
    return dataclass(eq=False, repr=False)(cls)


class Config(dict):
    """An open mapping (a head section, ``data.kwargs``) with attribute access (``head.type``)."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def to_dict(self) -> dict:
        return plain(self)


def plain(x: Any) -> Any:
    """Plain dicts and lists all the way down (what a checkpoint or a YAML file holds)."""
    if isinstance(x, Mapping):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


def wrap(x: Any) -> Any:
    """Mappings as :class:`Config` (attribute access), recursively."""
    if isinstance(x, Mapping):
        return Config({k: wrap(v) for k, v in x.items()})
    if isinstance(x, list):
        return [wrap(v) for v in x]
    return x


class Section(MutableMapping):
    """Base of config sections: a :func:`configclass` whose fields are :func:`setting` / :func:`subsection`.

    Instances are made by :func:`densefuse.config.from_dict` / ``load_config`` after every value was
    checked, so a builder that receives one never checks it again. They read like the dict they were built
    from (``cfg["model"]["num_classes"]``), and a key that is not declared is a KeyError.
    """

    def check(self, origin: Origin) -> None:
        """Cross-key checks of this section (a slide mode without a window); raise :class:`ConfigError`.
        ``origin(key)`` names where a dotted key came from. Runs once, at load time."""

    # ---- the declarations
    @classmethod
    def fields(cls) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(cls)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The tree of defaults (plain dicts)."""
        out: dict[str, Any] = {}
        for f in cls.fields():
            sub = f.metadata.get("section")
            if sub is not None:
                out[f.name] = sub.defaults()
            elif f.default is not dataclasses.MISSING:
                out[f.name] = copy.deepcopy(f.default)
            else:
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out

    @classmethod
    def rules(cls, prefix: str = "") -> dict[str, Rule]:
        """Dotted key -> :class:`Rule` of every declared value (nested sections included)."""
        out: dict[str, Rule] = {}
        for f in cls.fields():
            sub = f.metadata.get("section")
            if sub is not None:
                out.update(sub.rules(f"{prefix}{f.name}."))
            else:
                out[prefix + f.name] = f.metadata.get("rule") or rule_from_default(cls.defaults()[f.name])
        return out

    @classmethod
    def open_keys(cls, prefix: str = "") -> set[str]:
        """Dotted keys of the open mappings (checked by the builders that read them)."""
        out: set[str] = set()
        for f in cls.fields():
            sub = f.metadata.get("section")
            if sub is not None:
                out |= sub.open_keys(f"{prefix}{f.name}.")
            elif f.metadata.get("open"):
                out.add(prefix + f.name)
        return out

    @classmethod
    def docs(cls, prefix: str = "") -> list[tuple[str, Any, str]]:
        """(dotted key, default, doc) of every value, in declaration order: the key tables of the docs."""
        out: list[tuple[str, Any, str]] = []
        defaults = cls.defaults()
        for f in cls.fields():
            sub = f.metadata.get("section")
            if sub is not None:
                out += sub.docs(f"{prefix}{f.name}.")
            else:
                out.append((prefix + f.name, defaults[f.name], f.metadata.get("doc", "")))
        return out

    @classmethod
    def section_class(cls, name: str) -> Optional[type["Section"]]:
        """The class of the nested section ``name`` (None when ``name`` is not a section of ``cls``)."""
        for f in cls.fields():
            if f.name == name:
                return f.metadata.get("section")
        return None

    @classmethod
    def build(cls, data: Mapping[str, Any]) -> "Section":
        """An instance from a checked tree ``data`` (missing keys take their defaults; open mappings get
        attribute access). Does not check: :func:`check_tree` does, before."""
        kwargs = {}
        for f in cls.fields():
            if f.name not in data:
                continue
            value, sub = data[f.name], f.metadata.get("section")
            kwargs[f.name] = sub.build(value) if sub is not None and isinstance(value, Mapping) else wrap(value)
        return cls(**kwargs)

    def run_checks(self, origin: Origin) -> None:
        """:meth:`check` of this section and of every nested one, depth first."""
        for f in self.fields():
            value = getattr(self, f.name)
            if isinstance(value, Section):
                value.run_checks(origin)
        self.check(origin)

    # ---- the mapping view
    def __getitem__(self, key: str) -> Any:
        if key in self._names():
            return getattr(self, key)
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._names():
            raise KeyError(f"{type(self).__name__} has no key '{key}'{did_you_mean(key, self._names())}")
        setattr(self, key, value)

    def __delitem__(self, key: str) -> None:
        raise TypeError(f"config key '{key}' cannot be removed (set it to null instead)")

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and plain(self) == plain(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({plain(self)!r})"

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict:
        """Plain dicts all the way down (what checkpoints embed and ``config.yaml`` holds)."""
        return plain(self)


# ---------------------------------------------------------------------------------------------- checks
def fail(path: str, rule: Rule, value: Any, where: str, extra: str = "") -> ConfigError:
    """The message for ``value`` breaking ``rule`` at ``path``."""
    return ConfigError(f"{where}'{path}' must be {rule.describe()}{extra}, got {type_name(value)} {value!r}")


def check_tree(cfg: Mapping, defaults: Mapping, rules: Mapping[str, Rule], open_keys: set[str], prefix: str = "",
               source: Union[str, Origin] = "") -> None:
    """Unknown keys (with a hint) and every value against its :class:`Rule`. ``source`` names where a
    value came from (a file, ``--set``), or maps a dotted key to that name."""
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        src = source(path) if callable(source) else source
        where = f"{src}: " if src else ""
        if key not in defaults:
            raise ConfigError(f"{where}unknown config key '{path}'{did_you_mean(key, defaults, prefix)}")
        default = defaults[key]
        rule = rules.get(path) or rule_from_default(default)
        if not rule.ok(value):
            raise fail(path, rule, value, where)
        if path in open_keys or value is None:
            continue
        if isinstance(default, Mapping):
            check_tree(value, default, rules, open_keys, path + ".", source)


def check_kwargs(section: str, kwargs: Mapping[str, Any], accepted: Iterable[str], owner: str = "") -> None:
    """Raise an :class:`~densefuse.errors.UnknownKeyError` naming ``section.key`` for the first key a builder
    does not accept. ``owner`` (e.g. ``"data.type 'ade20k'"``) adds what reads the section and the keys it takes."""
    accepted = list(accepted)
    for k in kwargs:
        if k not in accepted:
            hint = did_you_mean(k, accepted, section + ".")
            takes = f" for {owner}{hint}; it takes: {', '.join(accepted) or 'none'}" if owner else hint
            raise UnknownKeyError(f"unknown config key '{section}.{k}'{takes}", f"{section}.{k}")


def build_section(cls: type[Section], data: Optional[Mapping[str, Any]], prefix: str) -> Section:
    """A checked instance of ``cls`` from a partial mapping (for code called with a plain dict, e.g.
    ``infer(..., {"mode": "slide", ...})``); an instance is returned as it is."""
    if isinstance(data, cls):
        return data
    data = dict(data or {})
    defaults = cls.defaults()
    check_tree(data, defaults, cls.rules(prefix), cls.open_keys(prefix), prefix)
    out = cls.build(merge(defaults, data))
    out.run_checks(lambda key: "")
    return out


def get_dotted(cfg: Mapping, dotted: str) -> Any:
    """``cfg["a"]["b"]`` for ``"a.b"``, or None where a level is missing or not a mapping."""
    node: Any = cfg
    for k in dotted.split("."):
        if not isinstance(node, Mapping) or k not in node:
            return None
        node = node[k]
    return node


def merge(base: Mapping, override: Mapping) -> dict:
    """Recursive merge; ``_delete_: true`` in an override dict replaces instead of merging."""
    out = copy.deepcopy(dict(base))
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) and not v.get("_delete_", False):
            out[k] = merge(out[k], v)
        else:
            out[k] = {kk: vv for kk, vv in v.items() if kk != "_delete_"} if isinstance(v, Mapping) else copy.deepcopy(v)
    return out


def keys_table(cls: type[Section], skip: Optional[type[Section]] = None) -> str:
    """The Markdown table ``| key | default | meaning |`` of every value ``cls`` declares (without the keys
    ``skip`` declares, e.g. the core's in a task's table): ``docs/configs.md`` is generated from it."""
    import yaml

    known = {key for key, _, _ in skip.docs()} if skip is not None else set()
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for key, default, doc in cls.docs():
        if key in known:
            continue
        text = yaml.safe_dump(plain(default), default_flow_style=True, width=1000).strip()
        text = text[:-4].strip() if text.endswith("\n...") else text
        rows.append(f"| `{key}` | `{text}` | {doc.replace('|', chr(92) + '|')} |")  # a pipe would end the cell
    return "\n".join(rows) + "\n"
