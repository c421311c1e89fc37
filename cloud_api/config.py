"""The cloud service's configuration: one frozen dataclass, built and checked once.

Layers, later ones winning: defaults, the YAML file (``$POPEX_CLOUD_CONFIG``
or ``configs/cloud.yaml`` in the checkout), the environment (``POPEX_TOKEN``,
``POPEX_CLOUD_STATE_DIR``), then the mapping passed to ``create_app``.
Nothing below the factory reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from popex.errors import ConfigError
from popex.cloud.runner import MAX_PROFILE_N_REPEATS

__all__ = ["CloudConfig", "load_config", "DEFAULT_CONFIG_PATH", "MIN_TOKEN_CHARS"]

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "cloud.yaml"
MIN_TOKEN_CHARS = 8
_ENV_KEYS = {"POPEX_TOKEN": "token", "POPEX_CLOUD_STATE_DIR": "state_dir"}
_MIN_BODY_BYTES = 1024
_MAX_BODY_BYTES = 2**30
_MAX_THREADS = 1024


@dataclass(frozen=True)
class CloudConfig:
    """Settings of one cloud service.

    Attributes
    ----------
    token : str
        Shared secret the edge sends as ``Authorization: Bearer <token>``.
    state_dir : Path
        Where registered models are stored (``<state_dir>/models/<model_id>/``).
    max_body_bytes : int
        Largest request body accepted (413 above it): offload payloads,
        model uploads, probes.
    n_threads : int or None
        Torch intra-op threads for cloud compute and profiling (None: torch's default).
    profile_n_repeats : int
        Timed runs per stage when the edge asks for a profile without saying.
    """

    token: str
    state_dir: Path = Path("state/cloud")
    max_body_bytes: int = 64 * 2**20
    n_threads: int | None = None
    profile_n_repeats: int = 30

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token.strip():
            raise ConfigError("the cloud refuses to start without a token: set POPEX_TOKEN to a shared secret "
                              f"of at least {MIN_TOKEN_CHARS} characters")
        if len(self.token) < MIN_TOKEN_CHARS or any(ch.isspace() for ch in self.token) \
                or not self.token.isprintable():
            raise ConfigError(f"the token must be at least {MIN_TOKEN_CHARS} printable characters without spaces "
                              f"(got {len(self.token)} characters)")
        if not isinstance(self.state_dir, (str, os.PathLike)) or not str(self.state_dir):
            raise ConfigError(f"state_dir must be a directory path, got {self.state_dir!r}")
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        _check_int("max_body_bytes", self.max_body_bytes, _MIN_BODY_BYTES, _MAX_BODY_BYTES)
        if self.n_threads is not None:
            _check_int("n_threads", self.n_threads, 1, _MAX_THREADS)
        _check_int("profile_n_repeats", self.profile_n_repeats, 1, MAX_PROFILE_N_REPEATS)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "CloudConfig":
        """The whole config from ``mapping`` alone: no YAML file, no environment.

        Tests use this so that a developer's ``POPEX_CLOUD_CONFIG`` or
        ``POPEX_TOKEN`` cannot change their outcome; keys left out take the
        dataclass defaults.

        Raises
        ------
        ConfigError
            On an unknown key or a bad value.
        """
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(mapping) - known)
        if unknown:
            raise ConfigError(f"unknown cloud config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{"token": "", **mapping})

    def __repr__(self) -> str:  # never print the secret
        return (f"CloudConfig(token='***', state_dir={str(self.state_dir)!r}, max_body_bytes={self.max_body_bytes}, "
                f"n_threads={self.n_threads}, profile_n_repeats={self.profile_n_repeats})")


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int in {low}..{high}, got {value!r}")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read cloud config {str(path)!r}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"cloud config {str(path)!r} must be a mapping of keys to values")
    return {key: value for key, value in data.items() if value not in (None, "")}


def load_config(overrides: Mapping[str, Any] | None = None, *,
                environ: Mapping[str, str] | None = None) -> CloudConfig:
    """Build the :class:`CloudConfig` from defaults, YAML, the environment and ``overrides``.

    Parameters
    ----------
    overrides : mapping, optional
        Keys of :class:`CloudConfig`; they win over everything else (tests use this).
    environ : mapping, optional
        The environment (default ``os.environ``). ``POPEX_CLOUD_CONFIG`` names
        the YAML file; ``POPEX_TOKEN`` and ``POPEX_CLOUD_STATE_DIR`` set the
        token and the state directory.

    Returns
    -------
    CloudConfig

    Raises
    ------
    ConfigError
        On an unknown key, a value out of range, an unreadable YAML file, or
        no real token.
    """
    environ = os.environ if environ is None else environ
    known = {field.name for field in fields(CloudConfig)}
    explicit_path = environ.get("POPEX_CLOUD_CONFIG")
    path = Path(explicit_path) if explicit_path else DEFAULT_CONFIG_PATH
    if explicit_path and not path.is_file():
        raise ConfigError(f"POPEX_CLOUD_CONFIG names {explicit_path!r}, which is not a file")
    values: dict[str, Any] = {}
    layers = [("the YAML file " + str(path), _read_yaml(path) if path.is_file() else {}),
              ("the environment", {key: environ[env] for env, key in _ENV_KEYS.items() if environ.get(env)}),
              ("the config mapping", dict(overrides or {}))]
    for where, layer in layers:
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ConfigError(f"unknown cloud config keys {unknown} in {where}; known keys: {sorted(known)}")
        values.update(layer)
    values.setdefault("token", "")
    return CloudConfig(**values)

