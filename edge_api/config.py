"""The edge service's configuration: one frozen dataclass, built and checked once.

The dataclass's defaults are the only defaults (``configs/edge.yaml``
documents every key and shows each default as a comment); its
``_constraints`` table says what each key accepts, checked once by
:func:`popex.settings.check_settings`. Production layers, later ones
winning: defaults, the YAML file (``$POPEX_EDGE_CONFIG`` or
``configs/edge.yaml`` in the checkout), the environment (``POPEX_TOKEN``,
``POPEX_ADMIN_TOKEN``, ``POPEX_CLIENT_TOKEN``, ``POPEX_DEVICE_TOKEN``, ``POPEX_CLOUD_URL``,
``POPEX_EDGE_STATE_DIR``, ``POPEX_EMULATE_LINK``,
``POPEX_EMULATE_EDGE_SLOWDOWN``, ``POPEX_LINK_IFACE``), then the overrides
(:func:`load_config`). A test config replaces all of them
(:meth:`EdgeConfig.from_mapping`). Nothing below the factory reads the
environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from popex.checks import MAX_DEADLINE_MS, OBJECTIVES
from popex.constraints import (DirectoryPath, Flag, HttpUrl, Integer, Matching, Nullable, Number, OneOf, Parsed, Rule,
                               Secret)
from popex.decision.policies import DEFAULT_HEADROOM_FRACTION, MAX_HEADROOM_FRACTION
from popex.edge.admission import DEFAULT_MAX_CONFIGURATIONS
from popex.edge.uplink import RTT_METHODS
from popex.edge.vetting import DEFAULT_VETTING_MEMORY_BYTES, DEFAULT_VETTING_TIMEOUT_S
from popex.errors import ConfigError
from popex.link.emulation import parse_link
from popex.link.shaping import IFACE_PATTERN
from popex.runtime.batcher import MAX_BATCH_SIZE, MAX_BATCH_WAIT_MS
from popex.runtime.model_cost import DEFAULT_MAX_ACTIVATION_BYTES, DEFAULT_MAX_MODEL_FLOPS
from popex.settings import Settings, load_settings, settings_repr, yaml_layer
from api_common.logs import LOG_FORMATS, LOG_LEVELS
from popex.wire import WIRE_COMPRESSIONS, WIRE_DTYPES

__all__ = ["EdgeConfig", "load_config", "DEFAULT_CONFIG_PATH", "MIN_TOKEN_CHARS"]

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "edge.yaml"
MIN_TOKEN_CHARS = 8
_ENV_KEYS = {
    "POPEX_TOKEN": "token",
    "POPEX_ADMIN_TOKEN": "admin_token",
    "POPEX_CLIENT_TOKEN": "client_token",
    "POPEX_DEVICE_TOKEN": "device_token",
    "POPEX_CLOUD_URL": "cloud_url",
    "POPEX_EDGE_STATE_DIR": "state_dir",
    "POPEX_EMULATE_LINK": "emulate_link",
    "POPEX_EMULATE_EDGE_SLOWDOWN": "emulate_edge_slowdown",
    "POPEX_LINK_IFACE": "shaping_interface",
    "POPEX_DEFAULT_MODEL_DIR": "default_model_dir",
}
_MAX_MS = 60_000.0
_SECRETS = ("token", "admin_token", "client_token", "device_token")


def _from_environment(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {key: environ[env] for env, key in _ENV_KEYS.items() if environ.get(env)}
    if "emulate_edge_slowdown" in values:  # the only number among the environment keys
        raw = values["emulate_edge_slowdown"]
        try:
            values["emulate_edge_slowdown"] = float(raw)
        except ValueError as err:
            raise ConfigError(f"POPEX_EMULATE_EDGE_SLOWDOWN must be a number, got {raw!r}") from err
    return values


@dataclass(frozen=True, repr=False)
class EdgeConfig(Settings):
    """Settings of one edge service (configs/edge.yaml documents every key).

    Attributes
    ----------
    token : str
        Shared secret sent to the cloud as ``Authorization: Bearer``; required.
    admin_token : str or None
        What every write on the edge needs (register, delete, admin routes);
        None is refused at start unless ``allow_open_writes``.
    allow_open_writes : bool
        Start without an admin token: anyone who reaches the port may write.
    client_token : str or None
        When set, classify and the read routes need it (or the admin token).
    device_token : str or None
        What a device sends to the three-tier routes (``edge_api.device``:
        its plan, its reports, its tensors); None turns those routes off.
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
    infeasible_accuracy_margin : float
        When no strategy meets a requirement: the fastest within this much
        accuracy of the best (0.05: five points), answered ``feasible: false``.
    strategy_hysteresis_accuracy : float
        A re-plan replaces a request's strategy only by one more accurate by
        more than this (or when the old one no longer fits).
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
        The most bytes one active uplink probe uploads (each is sized from the RTT and the estimate).
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
    offload_rate_per_s, offload_bucket_depth, offload_policy : float or None, float, {"mdp", "baseline"}
        Token bucket on offloads (None: off) and its policy (popex.ratelimit.live).
    max_image_bytes : int
        Largest classify request body (413 above it).
    max_image_pixels : int
        Largest width x height an image may declare.
    max_model_bytes : int
        Largest model upload (spec + weights + calibration), bytes; at most
        the cloud's ``max_body_bytes``, or the push to the cloud fails.
    max_strategy_configurations : int
        A model whose plan sweeps more threshold configurations (12 per branch,
        multiplied, times the head sets) is refused at registration.
    max_model_flops, max_activation_bytes : int
        A model needing more FLOPs per sample, or one layer holding more bytes
        of activations per sample, is refused before anything runs
        (:mod:`popex.runtime.model_cost`); at most the cloud's.
    registration_memory_bytes, registration_timeout_s : int, float
        Address-space limit (RLIMIT_AS) and time limit of the process that
        vets an uploaded model (:mod:`popex.edge.vetting`).
    breaker_n_failures : int
        Consecutive cloud failures (timeouts, refused connections) after which
        offloads are skipped.
    breaker_open_s : float
        How long they are skipped before one request probes the cloud, s.
    max_n_models : int
        Most models the store holds.
    max_store_bytes : int
        Most bytes the stored models' directories take together.
    profile_n_repeats : int
        Timed runs per stage when a model is prepared.
    n_threads : int or None
        ONNX Runtime intra-op threads of each stage's session (None = 1).
        1 by default: batch-1 inference of a small network gains nothing from
        more, and an idle thread pool stalls when cores are shared.
    max_batch_size : int
        Most classify requests of one model, cut and head set run as one
        batch (:mod:`popex.runtime.batcher`); 1 = each request on its own.
    batch_max_wait_ms : float
        Longest a batch waits for more requests after its first, ms; never
        past the tightest budget in it less the batch's predicted time.
    max_batch_images : int
        Most images one ``POST /api/v1/classify/batch`` may carry (413 above).
    batch_plan : bool
        Run a batch with only the branches the batch-aware plan finds worth
        running at its size (:mod:`popex.edge.batch_plans`); off: every active branch.
    start_background : bool
        Start the uplink monitor thread (tests turn it off).
    shaping_interface : str or None
        Interface whose egress ``PUT /api/v1/admin/link`` shapes with tc
        (needs CAP_NET_ADMIN); None: the endpoint changes the emulated link
        instead (``emulate_link``).
    log_level : {"DEBUG", "INFO", "WARNING", "ERROR"}
        Level of the service's log (stderr).
    log_format : {"text", "json"}
        Plain log lines, or one JSON object per line.
    """

    _service: ClassVar[str] = "edge"
    _constraints: ClassVar[Mapping[str, Rule]] = {
        "token": Secret(MIN_TOKEN_CHARS, "the edge refuses to start without a token: set POPEX_TOKEN to the secret "
                                         f"shared with the cloud (at least {MIN_TOKEN_CHARS} characters)"),
        "admin_token": Nullable(Secret(MIN_TOKEN_CHARS, "admin_token is empty")),
        "allow_open_writes": Flag(),
        "client_token": Nullable(Secret(MIN_TOKEN_CHARS, "client_token is empty")),
        "device_token": Nullable(Secret(MIN_TOKEN_CHARS, "device_token is empty")),
        "cloud_url": HttpUrl(),
        "state_dir": DirectoryPath(),
        "default_model_dir": Nullable(DirectoryPath()),
        "distortion_aware_default": Flag(),
        "default_deadline_ms": Number(low=0.0, high=MAX_DEADLINE_MS),
        "objective": OneOf(OBJECTIVES),
        "plan_headroom_fraction": Number(low=0.0, high=MAX_HEADROOM_FRACTION),
        "infeasible_accuracy_margin": Number(low=0.0, high=1.0),
        "strategy_hysteresis_accuracy": Number(low=0.0, high=1.0),
        "emulate_link": Nullable(Parsed(parse_link)),
        "emulate_edge_slowdown": Number(low=1.0, high=1000.0),
        "initial_uplink_mbps": Number(low=0.0, high=1e6, low_open=True),
        "initial_rtt_ms": Number(low=0.0, high=_MAX_MS),
        "probe_interval_s": Number(low=0.0, high=86_400.0, low_open=True),
        "probe_n_bytes": Integer(1, 64 * 2**20),
        "uplink_window_n": Integer(1, 10_000),
        "replan_hysteresis_fraction": Number(low=0.0, high=10.0),
        "rtt_method": OneOf(RTT_METHODS),
        "initial_offload_overhead_ms": Number(low=0.0, high=_MAX_MS),
        "cloud_speedup": Number(low=0.0, high=1e6, low_open=True),
        "cloud_timeout_s": Number(low=0.0, high=3600.0, low_open=True),
        "wire_dtype": OneOf(WIRE_DTYPES),
        "wire_compression": OneOf(WIRE_COMPRESSIONS),
        "offload_rate_per_s": Nullable(Number(low=0.0, high=1e9, low_open=True)),
        "offload_bucket_depth": Number(low=1.0, high=1e6),
        "offload_policy": OneOf(("mdp", "baseline")),
        "max_image_bytes": Integer(1024, 2**30),
        "max_image_pixels": Integer(1, 2**31),
        "max_model_bytes": Integer(1024, 2**31),
        "max_strategy_configurations": Integer(1, 10**9),
        "max_n_models": Integer(1, 100_000),
        "max_model_flops": Integer(1, 10**15),
        "max_activation_bytes": Integer(1024, 2**40),
        "registration_memory_bytes": Integer(256 * 2**20, 2**44),
        "registration_timeout_s": Number(low=0.1, high=3600.0),
        "breaker_n_failures": Integer(1, 10**6),
        "breaker_open_s": Number(low=0.0, high=3600.0),
        "max_store_bytes": Integer(1024, 2**50),
        "profile_n_repeats": Integer(1, 1000),
        "n_threads": Nullable(Integer(1, 1024)),
        "max_batch_size": Integer(1, MAX_BATCH_SIZE),
        "batch_max_wait_ms": Number(low=0.0, high=MAX_BATCH_WAIT_MS),
        "max_batch_images": Integer(1, MAX_BATCH_SIZE),
        "batch_plan": Flag(),
        "start_background": Flag(),
        "shaping_interface": Nullable(Matching(IFACE_PATTERN, "an interface name")),
        "log_level": OneOf(LOG_LEVELS),
        "log_format": OneOf(LOG_FORMATS),
    }

    token: str
    admin_token: str | None = None
    allow_open_writes: bool = False
    client_token: str | None = None
    device_token: str | None = None
    cloud_url: str = "http://127.0.0.1:8001"
    state_dir: Path = Path("state/edge")
    default_model_dir: Path | None = Path("models/default-distortion")
    distortion_aware_default: bool = True
    default_deadline_ms: float = 100.0
    objective: str = "mean"
    plan_headroom_fraction: float = DEFAULT_HEADROOM_FRACTION
    infeasible_accuracy_margin: float = 0.05
    strategy_hysteresis_accuracy: float = 0.01
    emulate_link: str | None = None
    emulate_edge_slowdown: float = 1.0
    initial_uplink_mbps: float = 10.0
    initial_rtt_ms: float = 20.0
    probe_interval_s: float = 5.0
    probe_n_bytes: int = 1048576
    uplink_window_n: int = 9
    replan_hysteresis_fraction: float = 0.2
    rtt_method: str = "auto"
    initial_offload_overhead_ms: float = 2.0
    cloud_speedup: float = 1.0
    cloud_timeout_s: float = 30.0
    wire_dtype: str = "float32"
    wire_compression: str = "deflate"
    offload_rate_per_s: float | None = None
    offload_bucket_depth: float = 10.0
    offload_policy: str = "mdp"
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 2048 * 2048  # ~4 MP: decoding more costs seconds and hundreds of MB
    max_model_bytes: int = 64 * 2**20  # the cloud's max_body_bytes: what the edge takes it can push
    max_strategy_configurations: int = DEFAULT_MAX_CONFIGURATIONS
    max_n_models: int = 32
    max_model_flops: int = DEFAULT_MAX_MODEL_FLOPS
    max_activation_bytes: int = DEFAULT_MAX_ACTIVATION_BYTES
    registration_memory_bytes: int = DEFAULT_VETTING_MEMORY_BYTES
    registration_timeout_s: float = DEFAULT_VETTING_TIMEOUT_S
    breaker_n_failures: int = 3
    breaker_open_s: float = 2.0
    max_store_bytes: int = 4 * 2**30
    profile_n_repeats: int = 30
    n_threads: int | None = 1
    max_batch_size: int = 1
    batch_max_wait_ms: float = 2.0
    max_batch_images: int = 32
    batch_plan: bool = False
    start_background: bool = True
    shaping_interface: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"

    def __repr__(self) -> str:  # never print a secret
        return settings_repr(self, hidden=_SECRETS)


def load_config(overrides: Mapping[str, Any] | None = None, *,
                environ: Mapping[str, str] | None = None) -> EdgeConfig:
    """Build the production :class:`EdgeConfig`: defaults < YAML < the environment < ``overrides``.

    Tests build theirs with :meth:`EdgeConfig.from_mapping` instead, so
    that neither the YAML file nor the environment reaches them.

    Parameters
    ----------
    overrides : mapping, optional
        Keys of :class:`EdgeConfig`; they win over everything else.
    environ : mapping, optional
        The environment (default ``os.environ``). ``POPEX_EDGE_CONFIG`` names
        the YAML file; ``POPEX_TOKEN``, ``POPEX_ADMIN_TOKEN``, ``POPEX_CLIENT_TOKEN``, ``POPEX_DEVICE_TOKEN``,
        ``POPEX_CLOUD_URL``, ``POPEX_EDGE_STATE_DIR``, ``POPEX_EMULATE_LINK``,
        ``POPEX_EMULATE_EDGE_SLOWDOWN`` and ``POPEX_LINK_IFACE`` set those keys.

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
    layers = [yaml_layer(environ, env_key="POPEX_EDGE_CONFIG", default_path=DEFAULT_CONFIG_PATH, service="edge"),
              ("the environment", _from_environment(environ)),
              ("the config mapping", dict(overrides or {}))]
    return load_settings(EdgeConfig, layers, service="edge")
