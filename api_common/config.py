"""How both app factories read the ``config`` argument they are given."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

__all__ = ["resolve_config"]

C = TypeVar("C")


def resolve_config(config: C | Mapping[str, Any] | None, *, config_class: type[C], load: Callable[[], C]) -> C:
    """A ready config as it is; a mapping as the *whole* config (tests: no YAML, no environment); None: ``load()``.

    Raises
    ------
    popex.errors.ConfigError
        If the mapping or the loaded layers are not a valid config.
    """
    if config is None:
        return load()
    if isinstance(config, config_class):
        return config
    return config_class.from_mapping(config)  # type: ignore[attr-defined]
