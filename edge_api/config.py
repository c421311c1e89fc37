"""The edge service's configuration: one frozen dataclass, built and checked once.

Layers, later ones winning: defaults, the YAML file (``$POPEX_EDGE_CONFIG``
or ``configs/edge.yaml`` in the checkout), the environment (``POPEX_TOKEN``,
``POPEX_CLOUD_URL``, ``POPEX_EDGE_STATE_DIR``, ``POPEX_EMULATE_LINK``), then
the mapping passed to ``create_app``. Nothing below the factory reads the
environment.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from popex.edge.uplink import RTT_METHODS
from popex.decision.table import OBJECTIVES
from popex.decision.policies import DEFAULT_HEADROOM_FRACTION, MAX_HEADROOM_FRACTION
from popex.errors import ConfigError
from popex.link.shaping import IFACE_PATTERN
from popex.link.emulation import parse_link
from popex.wire import WIRE_COMPRESSIONS, WIRE_DTYPES

__all__ = ["EdgeConfig", "load_config", "DEFAULT_CONFIG_PATH", "MIN_TOKEN_CHARS"]

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "edge.yaml"
MIN_TOKEN_CHARS = 8
_ENV_KEYS = {
    "POPEX_TOKEN": "token",
    "POPEX_CLOUD_URL": "cloud_url",
    "POPEX_EDGE_STATE_DIR": "state_dir",
    "POPEX_EMULATE_LINK": "emulate_link",
    "POPEX_EMULATE_EDGE_SLOWDOWN": "emulate_edge_slowdown",
    "POPEX_LINK_IFACE": "shaping_interface",
}
_MAX_DEADLINE_MS = 3_600_000.0


def _number(name: str, value: Any, *, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise ConfigError(f"{name} must be in {bracket}{low:g}, {high:g}], got {value!r}")
    return float(value)


def _integer(name: str, value: Any, *, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int in {low}..{high}, got {value!r}")
    return value


@dataclass(frozen=True)
class EdgeConfig:
    """Settings of one edge service (configs/edge.yaml documents every key).

    Attributes
    ----------
    token : str
        Shared secret sent to the cloud as ``Authorization: Bearer``; required.
    cloud_url : str
        ``http://host:port`` of the cloud service.
    state_dir : Path
        Registered models (``models/<id>/``) and the uplink history CSV.
    default_model_dir : Path or None
        A model directory (spec.json, weights.safetensors, calibration.npz)
        registered at start if it exists.
    distortion_aware_default : bool
        Whether a classify request that does not say is distortion-aware when
        its model has expert heads (the classifier picks the head set).
    default_deadline_ms : float
        Latency requirement of a request that gives none, ms.
    objective : {"mean", "tail"}
        Expected (mean) or worst-case (tail) latency must meet the deadline.
    plan_headroom_fraction : float
        Plans hold every policy's predicted latency to the requirement less
        this fraction of it (0.05: 47.5 ms for 50 ms), room for prediction
        error; 0 plans right up to the requirement.
    emulate_link : str or None
        ``"RATE_MBPS,RTT_MS"``: emulate that uplink in the cloud client.
    emulate_edge_slowdown : float
        Emulate an edge device this many times slower than this machine
        (edge compute is stretched, profiles scaled alike); 1 = off.
    initial_uplink_mbps, initial_rtt_ms : float
        Link assumed until measured (ignored when the link is emulated:
        the emulated link is the initial assumption).
    probe_interval_s : float
        Seconds between two uplink measurement rounds.
    probe_n_bytes : int
        Bytes of one active uplink probe.
    uplink_window_n : int
        Samples in the sliding-median window of the uplink monitor.
    replan_hysteresis_fraction : float
        Relative change of the uplink, RTT or overhead that re-plans.
    rtt_method : {"auto", "icmp", "http"}
        How the RTT is measured.
    initial_offload_overhead_ms : float
        Per-offload overhead O assumed until measured, ms.
    cloud_speedup : float
        Cloud = edge time / cloud_speedup when the cloud cannot be profiled.
    cloud_timeout_s : float
        Timeout of control calls to the cloud (upload, profile, probes), s.
    wire_dtype : {"float32", "float16", "int8"}
        Precision of offloaded tensors.
    wire_compression : {"deflate", "none"}
        Deflate offload payloads on the HTTP hop (when that shrinks them).
    max_image_bytes : int
        Largest classify request body (413 above it).
    max_image_pixels : int
        Largest width x height an image may declare.
    max_model_bytes : int
        Largest model upload (spec + weights + calibration), bytes.
    profile_n_repeats : int
        Timed runs per stage when a model is prepared.
    n_threads : int or None
        torch intra-op threads of the edge process (None = torch's default).
        1 by default: batch-1 inference of a small network gains nothing from
        more, and an idle thread pool stalls when cores are shared.
    start_background : bool
        Start the uplink monitor thread (tests turn it off).
    shaping_interface : str or None
        Interface whose egress ``PUT /api/v1/admin/link`` shapes with tc
        (needs CAP_NET_ADMIN); None: the endpoint changes the emulated link
        instead (``emulate_link``).
    """

    token: str
    cloud_url: str = "http://127.0.0.1:8001"
    state_dir: Path = Path("state/edge")
    default_model_dir: Path | None = Path("models/default")
    distortion_aware_default: bool = True
    default_deadline_ms: float = 100.0
    objective: str = "mean"
    plan_headroom_fraction: float = DEFAULT_HEADROOM_FRACTION
    emulate_link: str | None = None
    emulate_edge_slowdown: float = 1.0
    initial_uplink_mbps: float = 10.0
    initial_rtt_ms: float = 20.0
    probe_interval_s: float = 5.0
    probe_n_bytes: int = 65536
    uplink_window_n: int = 9
    replan_hysteresis_fraction: float = 0.2
    rtt_method: str = "auto"
    initial_offload_overhead_ms: float = 2.0
    cloud_speedup: float = 1.0
    cloud_timeout_s: float = 30.0
    wire_dtype: str = "float32"
    wire_compression: str = "deflate"
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_model_bytes: int = 256 * 2**20
    profile_n_repeats: int = 30
    n_threads: int | None = 1
    start_background: bool = True
    shaping_interface: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token.strip():
            raise ConfigError("the edge refuses to start without a token: set POPEX_TOKEN to the secret "
                              f"shared with the cloud (at least {MIN_TOKEN_CHARS} characters)")
        if len(self.token) < MIN_TOKEN_CHARS or any(ch.isspace() for ch in self.token) \
                or not self.token.isprintable():
            raise ConfigError(f"the token must be at least {MIN_TOKEN_CHARS} printable characters without spaces "
                              f"(got {len(self.token)} characters)")
        if not isinstance(self.cloud_url, str) or not self.cloud_url.startswith(("http://", "https://")):
            raise ConfigError(f"cloud_url must start with http:// or https://, got {self.cloud_url!r}")
        object.__setattr__(self, "cloud_url", self.cloud_url.rstrip("/"))
        for name in ("state_dir", "default_model_dir"):
            value = getattr(self, name)
            if value is None and name == "default_model_dir":
                continue
            if not isinstance(value, (str, os.PathLike)) or not str(value):
                raise ConfigError(f"{name} must be a directory path, got {value!r}")
            object.__setattr__(self, name, Path(value))
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if not isinstance(self.distortion_aware_default, bool):
            raise ConfigError(f"distortion_aware_default must be true or false, got {self.distortion_aware_default!r}")
        if self.rtt_method not in RTT_METHODS:
            raise ConfigError(f"rtt_method must be one of {list(RTT_METHODS)}, got {self.rtt_method!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ConfigError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {self.wire_dtype!r}")
        if self.wire_compression not in WIRE_COMPRESSIONS:
            raise ConfigError(f"wire_compression must be one of {list(WIRE_COMPRESSIONS)}, "
                              f"got {self.wire_compression!r}")
        if self.emulate_link is not None:
            parse_link(self.emulate_link)  # raises ConfigError naming the bad text
        if self.shaping_interface is not None and (not isinstance(self.shaping_interface, str)
                                                   or not IFACE_PATTERN.fullmatch(self.shaping_interface)):
            raise ConfigError(f"shaping_interface must be an interface name matching {IFACE_PATTERN.pattern}, "
                              f"got {self.shaping_interface!r}")
        if not isinstance(self.start_background, bool):
            raise ConfigError(f"start_background must be true or false, got {self.start_background!r}")
        floats = {
            "default_deadline_ms": _number("default_deadline_ms", self.default_deadline_ms,
                                           low=0.0, high=_MAX_DEADLINE_MS),
            "initial_uplink_mbps": _number("initial_uplink_mbps", self.initial_uplink_mbps,
                                           low=0.0, high=1e6, low_open=True),
            "initial_rtt_ms": _number("initial_rtt_ms", self.initial_rtt_ms, low=0.0, high=60_000.0),
            "probe_interval_s": _number("probe_interval_s", self.probe_interval_s, low=0.0, high=86_400.0,
                                        low_open=True),
            "plan_headroom_fraction": _number("plan_headroom_fraction", self.plan_headroom_fraction,
                                              low=0.0, high=MAX_HEADROOM_FRACTION),
            "replan_hysteresis_fraction": _number("replan_hysteresis_fraction", self.replan_hysteresis_fraction,
                                                  low=0.0, high=10.0),
            "initial_offload_overhead_ms": _number("initial_offload_overhead_ms", self.initial_offload_overhead_ms,
                                                   low=0.0, high=60_000.0),
            "emulate_edge_slowdown": _number("emulate_edge_slowdown", self.emulate_edge_slowdown,
                                             low=1.0, high=1000.0),
            "cloud_speedup": _number("cloud_speedup", self.cloud_speedup, low=0.0, high=1e6, low_open=True),
            "cloud_timeout_s": _number("cloud_timeout_s", self.cloud_timeout_s, low=0.0, high=3600.0,
                                       low_open=True),
        }
        for name, value in floats.items():
            object.__setattr__(self, name, value)
        _integer("probe_n_bytes", self.probe_n_bytes, low=1, high=64 * 2**20)
        _integer("uplink_window_n", self.uplink_window_n, low=1, high=10_000)
        _integer("max_image_bytes", self.max_image_bytes, low=1024, high=2**30)
        _integer("max_image_pixels", self.max_image_pixels, low=1, high=2**31)
        _integer("max_model_bytes", self.max_model_bytes, low=1024, high=2**31)
        _integer("profile_n_repeats", self.profile_n_repeats, low=1, high=1000)
        if self.n_threads is not None:
            _integer("n_threads", self.n_threads, low=1, high=1024)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> "EdgeConfig":
        """The whole config from ``mapping`` alone: no YAML file, no environment.

        Tests use this so that a developer's ``POPEX_EDGE_CONFIG`` or
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
            raise ConfigError(f"unknown edge config keys {unknown}; known keys: {sorted(known)}")
        return cls(**{"token": "", **mapping})

    def __repr__(self) -> str:  # never print the secret
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "token")
        return f"EdgeConfig(token='***', {shown})"


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {key: environ[env] for env, key in _ENV_KEYS.items() if environ.get(env)}
    if "emulate_edge_slowdown" in values:  # the only number among the environment keys
        raw = values["emulate_edge_slowdown"]
        try:
            values["emulate_edge_slowdown"] = float(raw)
        except ValueError as err:
            raise ConfigError(f"POPEX_EMULATE_EDGE_SLOWDOWN must be a number, got {raw!r}") from err
    return values


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read edge config {str(path)!r}: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"edge config {str(path)!r} must be a mapping of keys to values")
    return {key: value for key, value in data.items() if value not in (None, "")}


def load_config(overrides: Mapping[str, Any] | None = None, *,
                environ: Mapping[str, str] | None = None) -> EdgeConfig:
    """Build the :class:`EdgeConfig` from defaults, YAML, the environment and ``overrides``.

    Parameters
    ----------
    overrides : mapping, optional
        Keys of :class:`EdgeConfig`; they win over everything else (tests use this).
    environ : mapping, optional
        The environment (default ``os.environ``). ``POPEX_EDGE_CONFIG`` names
        the YAML file; ``POPEX_TOKEN``, ``POPEX_CLOUD_URL``,
        ``POPEX_EDGE_STATE_DIR`` and ``POPEX_EMULATE_LINK`` set those keys.

    Returns
    -------
    EdgeConfig

    Raises
    ------
    ConfigError
        On an unknown key, a value out of range, an unreadable YAML file, or
        no real token.
    """
    environ = os.environ if environ is None else environ
    known = {field.name for field in fields(EdgeConfig)}
    explicit_path = environ.get("POPEX_EDGE_CONFIG")
    path = Path(explicit_path) if explicit_path else DEFAULT_CONFIG_PATH
    if explicit_path and not path.is_file():
        raise ConfigError(f"POPEX_EDGE_CONFIG names {explicit_path!r}, which is not a file")
    values: dict[str, Any] = {}
    layers = [("the YAML file " + str(path), _read_yaml(path) if path.is_file() else {}),
              ("the environment", _from_environment(environ)),
              ("the config mapping", dict(overrides or {}))]
    for where, layer in layers:
        unknown = sorted(set(layer) - known)
        if unknown:
            raise ConfigError(f"unknown edge config keys {unknown} in {where}; known keys: {sorted(known)}")
        values.update(layer)
    values.setdefault("token", "")
    return EdgeConfig(**values)
