"""Rules of a config's constraint table: what one field accepts, and how it is stored.

Each rule checks one value and returns it normalised (a float for a
number, a :class:`~pathlib.Path` for a directory); a refused value is a
:class:`~popex.errors.ConfigError` naming the field, the bound and the value.
They build on :mod:`popex.checks`, so a config and a request check a number
by the same rule. :func:`popex.settings.check_settings` applies them.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from popex.checks import check_choice, check_finite, check_int
from popex.errors import ConfigError

__all__ = [
    "Rule",
    "Number",
    "Integer",
    "OneOf",
    "Flag",
    "DirectoryPath",
    "HttpUrl",
    "Matching",
    "Parsed",
    "Secret",
    "Nullable",
]


class Rule(Protocol):
    """What a constraint does: check one field's value and return it normalised."""

    def check(self, name: str, value: object) -> object:
        """``value`` as the config stores it.

        Parameters
        ----------
        name : str
            The field, named in the message.
        value : object
            What the layers gave.

        Returns
        -------
        object
            The value to store (normalised: a float for a number, a Path for a directory).

        Raises
        ------
        ConfigError
            Naming ``name``, the rule and the value, when the value breaks the rule.
        """


@dataclass(frozen=True)
class Number:
    """A finite real number in ``[low, high]`` (``(low, high]`` with ``low_open``), stored as float.

    Text is refused even when it reads as a number: a config file writes numbers as numbers.
    """

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False

    def check(self, name: str, value: object) -> float:
        """See :class:`Rule`."""
        return check_finite(value, name=name, low=self.low, high=self.high, low_open=self.low_open,
                            allow_text=False)


@dataclass(frozen=True)
class Integer:
    """An int in ``low..high`` (bools refused)."""

    low: int
    high: int

    def check(self, name: str, value: object) -> int:
        """See :class:`Rule`."""
        return check_int(value, name=name, low=self.low, high=self.high)


@dataclass(frozen=True)
class OneOf:
    """One of a few named choices."""

    choices: tuple[str, ...]

    def check(self, name: str, value: object) -> str:
        """See :class:`Rule`."""
        return check_choice(value, name=name, choices=self.choices)


@dataclass(frozen=True)
class Flag:
    """``true`` or ``false``; 0 and 1 are not booleans here."""

    def check(self, name: str, value: object) -> bool:
        """See :class:`Rule`."""
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value


@dataclass(frozen=True)
class DirectoryPath:
    """A non-empty path (it need not exist yet), stored as :class:`~pathlib.Path`."""

    def check(self, name: str, value: object) -> Path:
        """See :class:`Rule`."""
        if not isinstance(value, (str, os.PathLike)) or not str(value):
            raise ConfigError(f"{name} must be a directory path, got {value!r}")
        return Path(value)


@dataclass(frozen=True)
class HttpUrl:
    """An ``http://`` or ``https://`` base URL, stored without trailing slashes."""

    def check(self, name: str, value: object) -> str:
        """See :class:`Rule`."""
        if not isinstance(value, str) or not value.startswith(("http://", "https://")):
            raise ConfigError(f"{name} must start with http:// or https://, got {value!r}")
        return value.rstrip("/")


@dataclass(frozen=True)
class Matching:
    """A string matching ``pattern`` in full; ``what`` names it in the message."""

    pattern: re.Pattern[str]
    what: str

    def check(self, name: str, value: object) -> str:
        """See :class:`Rule`."""
        if not isinstance(value, str) or not self.pattern.fullmatch(value):
            raise ConfigError(f"{name} must be {self.what} matching {self.pattern.pattern}, got {value!r}")
        return value


@dataclass(frozen=True)
class Parsed:
    """Text that ``parse`` accepts (it raises ConfigError naming the bad text); stored as given."""

    parse: Callable[[str], object]

    def check(self, name: str, value: object) -> object:
        """See :class:`Rule`."""
        self.parse(value)  # type: ignore[arg-type]
        return value


@dataclass(frozen=True)
class Secret:
    """A shared token: at least ``min_chars`` printable characters, no whitespace.

    ``missing`` is the message when there is none at all: it says how to give one.
    """

    min_chars: int
    missing: str

    def check(self, name: str, value: object) -> str:
        """See :class:`Rule`."""
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(self.missing)
        if len(value) < self.min_chars or any(ch.isspace() for ch in value) or not value.isprintable():
            raise ConfigError(f"the {name} must be at least {self.min_chars} printable characters without spaces "
                              f"(got {len(value)} characters)")
        return value


@dataclass(frozen=True)
class Nullable:
    """None, or what ``rule`` accepts."""

    rule: Rule

    def check(self, name: str, value: object) -> object:
        """See :class:`Rule`."""
        return None if value is None else self.rule.check(name, value)
