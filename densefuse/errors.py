"""User-facing error types.

Anything a user can cause (a bad config key, a missing file, a corrupt image, a wrong label value)
raises a subclass of :class:`DensefuseError`. The CLI prints its message on one line and exits
non-zero without a traceback; programming errors keep their traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class DensefuseError(Exception):
    """Base class for errors caused by user input."""


class ConfigError(DensefuseError):
    """A config file, key or value is wrong."""


class UnknownKeyError(ConfigError):
    """A config key the code reading its section does not accept; ``key`` is its dotted name. Config
    loading uses it to drop keys inherited from a ``_base_`` file for another dataset type."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class DataError(DensefuseError):
    """A dataset file is missing, unreadable or has invalid content."""


class CalibrationError(DensefuseError):
    """An equalizer is used in a state that makes no sense (uncalibrated, folded twice, ...)."""


def did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """Return ``" (did you mean 'prefix.x'?)"`` for the closest choice, or an empty string."""
    match = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""
