"""Configs: a typed tree declared once by its owners, read from YAML in one validation pass.

- :mod:`.schema`: how a setting is declared (:func:`setting`, :class:`Rule`, :class:`Section`);
- :mod:`.sections`: the core's sections (:class:`CoreConfig`); a task's own live in ``tasks/<name>/config.py``;
- :mod:`.loader`: YAML with ``_base_`` / ``_delete_`` / ``--set``, the origin of every value, validation.
"""
from .loader import config_dirs, dump, find_config, from_dict, load_config, parse_overrides, safe_load
from .schema import Config, Rule, Section, build_section, check_kwargs, configclass, merge, plain, setting, subsection
from .sections import DEFAULTS, CoreConfig

__all__ = [
    "DEFAULTS", "Config", "CoreConfig", "Rule", "Section", "build_section", "check_kwargs", "config_dirs",
    "configclass", "dump", "find_config", "from_dict", "load_config", "merge", "parse_overrides", "plain",
    "safe_load", "setting", "subsection",
]
