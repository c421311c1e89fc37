"""The cloud service's configuration: one frozen dataclass, built and checked once.

The dataclass's defaults are the only defaults (``configs/cloud.yaml``
documents every key and shows each default as a comment); its
``_constraints`` table says what each key accepts, checked once by
:func:`popex.settings.check_settings`. Production layers, later ones
winning: defaults, the YAML file (``$POPEX_CLOUD_CONFIG`` or
``configs/cloud.yaml`` in the checkout), the environment (``POPEX_TOKEN``,
``POPEX_CLOUD_STATE_DIR``), then the overrides (:func:`load_config`). A test
config replaces all of them (:meth:`CloudConfig.from_mapping`). Nothing
below the factory reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from popex.cloud.runner import MAX_PROFILE_N_REPEATS
from popex.runtime.model_cost import DEFAULT_MAX_ACTIVATION_BYTES, DEFAULT_MAX_MODEL_FLOPS
from popex.runtime.batcher import MAX_BATCH_SIZE, MAX_BATCH_WAIT_MS
from popex.constraints import DirectoryPath, Integer, Nullable, Number, OneOf, Rule, Secret
from popex.settings import Settings, load_settings, yaml_layer
from api_common.logs import LOG_FORMATS, LOG_LEVELS

__all__ = ["CloudConfig", "load_config", "DEFAULT_CONFIG_PATH", "MIN_TOKEN_CHARS"]

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[1] / "configs" / "cloud.yaml"
MIN_TOKEN_CHARS = 8
_ENV_KEYS = {"POPEX_TOKEN": "token", "POPEX_CLOUD_STATE_DIR": "state_dir"}
_MIN_BODY_BYTES = 1024
_MAX_BODY_BYTES = 2**30
_MAX_THREADS = 1024


@dataclass(frozen=True, repr=False)
class CloudConfig(Settings):
    """Settings of one cloud service (configs/cloud.yaml documents every key).

    Attributes
    ----------
    token : str
        Shared secret the edge sends as ``Authorization: Bearer <token>``; required.
    state_dir : Path
        Where registered models are stored (``<state_dir>/models/<model_id>/``).
    max_body_bytes : int
        Largest request body accepted (413 above it): offload payloads,
        model uploads, probes.
    max_model_flops, max_activation_bytes : int
        A model needing more FLOPs per sample, or one layer holding more bytes
        of activations per sample, is refused before it is loaded
        (:mod:`popex.runtime.model_cost`).
    n_threads : int or None
        ONNX Runtime intra-op threads of each stage's session (None: 1).
        1 by default: batch-1 requests to small networks
        gain nothing from more, and an idle thread pool stalls when cores are
        shared.
    profile_n_repeats : int
        Timed runs per stage when the edge asks for a profile without saying.
    max_batch_size : int
        Most one-sample offloads of one model, split and head set run as one
        batch (:mod:`popex.runtime.batcher`); 1 = each on its own.
    batch_max_wait_ms : float
        Longest a batch waits for more offloads after its first, ms; never
        past the tightest budget in it less the batch's predicted time.
    max_payload_batch_size : int
        Most samples one batched payload (``POST /api/v1/infer/batch``) may carry.
    log_level : {"DEBUG", "INFO", "WARNING", "ERROR"}
        Level of the service's log (stderr).
    log_format : {"text", "json"}
        Plain log lines, or one JSON object per line.
    """

    _service: ClassVar[str] = "cloud"
    _constraints: ClassVar[Mapping[str, Rule]] = {
        "token": Secret(MIN_TOKEN_CHARS, "the cloud refuses to start without a token: set POPEX_TOKEN to a shared "
                                         f"secret of at least {MIN_TOKEN_CHARS} characters"),
        "state_dir": DirectoryPath(),
        "max_body_bytes": Integer(_MIN_BODY_BYTES, _MAX_BODY_BYTES),
        "max_model_flops": Integer(1, 10**15),
        "max_activation_bytes": Integer(1024, 2**40),
        "n_threads": Nullable(Integer(1, _MAX_THREADS)),
        "profile_n_repeats": Integer(1, MAX_PROFILE_N_REPEATS),
        "max_batch_size": Integer(1, MAX_BATCH_SIZE),
        "batch_max_wait_ms": Number(low=0.0, high=MAX_BATCH_WAIT_MS),
        "max_payload_batch_size": Integer(1, MAX_BATCH_SIZE),
        "log_level": OneOf(LOG_LEVELS),
        "log_format": OneOf(LOG_FORMATS),
    }

    token: str
    state_dir: Path = Path("state/cloud")
    max_body_bytes: int = 64 * 2**20
    max_model_flops: int = DEFAULT_MAX_MODEL_FLOPS
    max_activation_bytes: int = DEFAULT_MAX_ACTIVATION_BYTES
    n_threads: int | None = 1
    profile_n_repeats: int = 30
    max_batch_size: int = 1
    batch_max_wait_ms: float = 2.0
    max_payload_batch_size: int = 64
    log_level: str = "INFO"
    log_format: str = "text"


def load_config(overrides: Mapping[str, Any] | None = None, *,
                environ: Mapping[str, str] | None = None) -> CloudConfig:
    """Build the production :class:`CloudConfig`: defaults < YAML < the environment < ``overrides``.

    Parameters
    ----------
    overrides : mapping, optional
        Keys of :class:`CloudConfig`; they win over everything else.
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
        On an unknown key (naming its layer), a value out of range, an
        unreadable YAML file, or no real token.

    See Also
    --------
    CloudConfig.from_mapping : what tests build instead: neither the YAML
        file nor the environment reaches them.
    """
    environ = os.environ if environ is None else environ
    layers = [yaml_layer(environ, env_key="POPEX_CLOUD_CONFIG", default_path=DEFAULT_CONFIG_PATH, service="cloud"),
              ("the environment", {key: environ[env] for env, key in _ENV_KEYS.items() if environ.get(env)}),
              ("the config mapping", dict(overrides or {}))]
    return load_settings(CloudConfig, layers, service="cloud")
