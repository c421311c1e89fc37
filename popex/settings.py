"""Declarative settings: a service's frozen config, its constraint table, one checker.

A service's configuration is a frozen dataclass whose defaults are its
fields' defaults (the only place a default lives) and whose allowed values
sit in a class-level table ``_constraints``: one rule of
:mod:`popex.constraints` per field, in the manner of scikit-learn's
``_parameter_constraints``. ``__post_init__`` hands
the instance to :func:`check_settings`, which applies every rule once and
stores what the rule returns (a float for a number, a :class:`~pathlib.Path`
for a directory), so everything built from the config can trust it.

The rest is the layering the services share: a YAML file, the environment
and a mapping of overrides (:func:`load_settings`, for production), or a
mapping alone (:func:`settings_from_mapping`, for tests: a test config
replaces the other layers instead of being laid over them).

In a YAML file an empty string means "not set here" and ``null`` (an empty
value) means None, which only a :class:`~popex.constraints.Nullable` field accepts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import MISSING, fields
import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from popex.constraints import Nullable, Rule
from popex.errors import ConfigError

__all__ = [
    "Settings",
    "check_settings",
    "settings_repr",
    "settings_from_mapping",
    "read_yaml_settings",
    "yaml_layer",
    "load_settings",
    "documented_settings",
]

# configs/*.yaml document each key as "# key: default" (or "# key:" where there is none)
_DOCUMENTED_KEY_LINE = re.compile(r"^# ?([a-z_][a-z0-9_]*):(?: (.*))?$")

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


class Settings:
    """Base of a service's frozen config dataclass: checked on creation, built from a mapping, secret hidden.

    A subclass is a ``@dataclass(frozen=True, repr=False)`` with the class
    attributes ``_constraints`` (one :class:`~popex.constraints.Rule` per field) and
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
    >>> from popex.constraints import Number
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
        missing, extra = sorted(set(names) - set(constraints)), sorted(set(constraints) - set(names))
        raise TypeError(f"{type(config).__name__}._constraints must have one rule per field: "
                        f"missing {missing}, extra {extra}")
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
        value = getattr(config, name)
        return "'***'" if name in hidden and value is not None else repr(value)

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


def documented_settings(text: str, *, where: str = "config file") -> dict[str, Any]:
    r"""The keys a config file documents as commented lines (``# key: default``), with their values.

    The shipped ``configs/*.yaml`` set no key: each one is a commented line
    showing its default, which lives in the dataclass.

    Parameters
    ----------
    text : str
        The file's text.
    where : str
        Names the file in the message.

    Returns
    -------
    dict
        Key -> the commented value parsed as YAML (None for ``# key:``).

    Raises
    ------
    ConfigError
        If a key is documented twice.

    Examples
    --------
    >>> documented_settings("# A comment: not a key\n# probe_interval_s: 5.0\n# token:\n")
    {'probe_interval_s': 5.0, 'token': None}
    """
    found: dict[str, Any] = {}
    for line in text.splitlines():
        match = _DOCUMENTED_KEY_LINE.match(line)
        if match:
            if match.group(1) in found:
                raise ConfigError(f"{where} documents {match.group(1)!r} twice")
            found[match.group(1)] = yaml.safe_load(match.group(2) or "null")
    return found
