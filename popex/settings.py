"""Declarative settings: a service's frozen config, its constraint table, one checker.

A service's configuration is a frozen dataclass whose defaults are its
fields' defaults (the only place a default lives) and whose allowed values
sit in a class-level table ``_constraints``: one rule per field, in the
manner of scikit-learn's ``_parameter_constraints``. ``__post_init__`` hands
the instance to :func:`check_settings`, which applies every rule once and
stores what the rule returns (a float for a number, a :class:`~pathlib.Path`
for a directory), so everything built from the config can trust it.

The rest is the layering the services share: a YAML file, the environment
and a mapping of overrides (:func:`load_settings`, for production), or a
mapping alone (:func:`settings_from_mapping`, for tests: a test config
replaces the other layers instead of being laid over them).

In a YAML file an empty string means "not set here" and ``null`` (an empty
value) means None, which only a :class:`Nullable` field accepts.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import yaml

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
    "Settings",
    "check_settings",
    "settings_repr",
    "settings_from_mapping",
    "read_yaml_settings",
    "yaml_layer",
    "load_settings",
]

T = TypeVar("T")
S = TypeVar("S", bound="Settings")


def _constraints_of(cls: type) -> Mapping[str, Rule]:
    constraints = getattr(cls, "_constraints", None)
    if not isinstance(constraints, Mapping):
        raise TypeError(f"{cls.__name__} has no _constraints table")
    return constraints


def _known_keys(cls: type) -> set[str]:
    return {field.name for field in fields(cls)}


def _refuse_unknown(cls: type, values: Mapping[str, Any], *, service: str, where: str) -> None:
    known = _known_keys(cls)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {service} config keys {unknown}{where}; known keys: {sorted(known)}")


def _refuse_null(cls: type, values: Mapping[str, Any], *, where: str) -> None:
    constraints = _constraints_of(cls)
    for name, value in values.items():
        if value is None and not isinstance(constraints[name], Nullable):
            raise ConfigError(f"{name} is empty{where}, and it cannot be: give a value or leave the key out")


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


class Settings:
    """Base of a service's frozen config dataclass: checked on creation, built from a mapping, secret hidden.

    A subclass is a ``@dataclass(frozen=True, repr=False)`` with the class
    attributes ``_constraints`` (one :class:`Rule` per field) and
    ``_service`` ("edge", "cloud": named in messages).
    """

    _constraints: ClassVar[Mapping[str, Rule]]
    _service: ClassVar[str]

    def __post_init__(self) -> None:
        check_settings(self)

    @classmethod
    def from_mapping(cls: type[S], mapping: Mapping[str, Any]) -> S:
        """The whole config from ``mapping`` alone: no YAML file, no environment.

        Tests use this so that a developer's config file or environment
        cannot change their outcome; keys left out take the dataclass
        defaults.

        Parameters
        ----------
        mapping : mapping
            Field values.

        Returns
        -------
        The config.

        Raises
        ------
        ConfigError
            On an unknown key or a bad value.
        """
        return settings_from_mapping(cls, mapping, service=cls._service)

    def __repr__(self) -> str:  # never print the secret
        return settings_repr(self)


def check_settings(config: object) -> None:
    """Apply a frozen config's ``_constraints`` to every field, storing the normalised values.

    Parameters
    ----------
    config : dataclass instance
        Its class has a ``_constraints`` mapping with exactly one rule per field.

    Raises
    ------
    ConfigError
        At the first field (in field order) whose value its rule refuses.
    TypeError
        If the table does not cover exactly the fields (a bug, not user input).

    Examples
    --------
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Demo:
    ...     rate_mbps: float = 1
    ...     def __post_init__(self):
    ...         check_settings(self)
    >>> Demo._constraints = {"rate_mbps": Number(low=0.0, low_open=True)}  # a ClassVar in a real config
    >>> Demo().rate_mbps
    1.0
    >>> Demo(rate_mbps=0)
    Traceback (most recent call last):
    ...
    popex.errors.ConfigError: rate_mbps must be in (0, inf], got 0
    """
    constraints = _constraints_of(type(config))
    names = [field.name for field in fields(config)]  # type: ignore[arg-type]
    if set(names) != set(constraints):
        raise TypeError(f"{type(config).__name__}._constraints must have one rule per field: "
                        f"missing {sorted(set(names) - set(constraints))}, extra {sorted(set(constraints) - set(names))}")
    for name in names:
        object.__setattr__(config, name, constraints[name].check(name, getattr(config, name)))


def settings_repr(config: object, *, hidden: Sequence[str] = ("token",)) -> str:
    """``Name(field=value, ...)`` with the ``hidden`` fields shown as ``'***'``: never print a secret.

    Parameters
    ----------
    config : dataclass instance
    hidden : sequence of str
        Fields whose values are replaced.

    Returns
    -------
    str
    """
    def shown(name: str) -> str:
        return "'***'" if name in hidden else repr(getattr(config, name))

    fields_shown = ", ".join(f"{field.name}={shown(field.name)}" for field in fields(config))  # type: ignore[arg-type]
    return f"{type(config).__name__}({fields_shown})"


def settings_from_mapping(cls: type[T], mapping: Mapping[str, Any], *, service: str) -> T:
    """The whole config from ``mapping`` alone: no YAML file, no environment.

    Parameters
    ----------
    cls : type
        A frozen config dataclass with a ``_constraints`` table.
    mapping : mapping
        Field values; fields left out take their defaults, a required field
        left out is None (its rule says what is missing).
    service : str
        "edge" or "cloud", for the messages.

    Returns
    -------
    cls instance

    Raises
    ------
    ConfigError
        On an unknown key or a bad value.
    """
    _refuse_unknown(cls, mapping, service=service, where="")
    required = {field.name: None for field in fields(cls)  # type: ignore[arg-type]
                if field.default is MISSING and field.default_factory is MISSING}
    return cls(**{**required, **mapping})


def read_yaml_settings(path: Path, *, service: str) -> dict[str, Any]:
    """The keys set in a YAML config file (empty strings mean "not set here").

    Parameters
    ----------
    path : Path
        The file.
    service : str
        "edge" or "cloud", for the messages.

    Returns
    -------
    dict
        Key to value; a key whose value is null maps to None.

    Raises
    ------
    ConfigError
        If the file cannot be read or parsed, or is not a mapping.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read {service} config {str(path)!r}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{service} config {str(path)!r} must be a mapping of keys to values")
    return {key: value for key, value in data.items() if value != ""}


def yaml_layer(environ: Mapping[str, str], *, env_key: str, default_path: Path,
               service: str) -> tuple[str, dict[str, Any]]:
    """The YAML layer of a service: the file ``environ[env_key]`` names, else ``default_path``.

    Parameters
    ----------
    environ : mapping
        The environment.
    env_key : str
        The variable that names the file, e.g. ``"POPEX_EDGE_CONFIG"``.
    default_path : Path
        The checkout's file; a missing one is an empty layer.
    service : str
        "edge" or "cloud", for the messages.

    Returns
    -------
    (str, dict)
        Where the layer comes from (for messages) and its values.

    Raises
    ------
    ConfigError
        If ``env_key`` names a file that does not exist or cannot be read.
    """
    explicit_path = environ.get(env_key)
    path = Path(explicit_path) if explicit_path else default_path
    if explicit_path and not path.is_file():
        raise ConfigError(f"{env_key} names {explicit_path!r}, which is not a file")
    return "the YAML file " + str(path), read_yaml_settings(path, service=service) if path.is_file() else {}


def load_settings(cls: type[T], layers: Sequence[tuple[str, Mapping[str, Any]]], *, service: str) -> T:
    """A config from layers of values, later layers winning over earlier ones and the defaults.

    Parameters
    ----------
    cls : type
        A frozen config dataclass with a ``_constraints`` table.
    layers : sequence of (where, mapping)
        E.g. the YAML file, the environment, the overrides; ``where``
        (``"the environment"``) names the layer in messages.
    service : str
        "edge" or "cloud", for the messages.

    Returns
    -------
    cls instance

    Raises
    ------
    ConfigError
        On an unknown key (naming its layer), a None for a field that is not
        nullable, or a bad value.
    """
    values: dict[str, Any] = {}
    for where, layer in layers:
        _refuse_unknown(cls, layer, service=service, where=f" in {where}")
        _refuse_null(cls, layer, where=f" in {where}")
        values.update(layer)
    return settings_from_mapping(cls, values, service=service)
