"""The cloud service: a Flask app factory over popex.cloud.runner.

Run it with ``./run_cloud.sh`` (gunicorn ``'cloud_api:create_app()'``).
Nothing is built at import time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask

from cloud_api.auth import CONFIG_KEY
from cloud_api.config import CloudConfig, load_config
from api_common.config import resolve_config
from api_common.errors import init_errors
from api_common.json_io import init_json
from api_common.logs import init_logging, init_request_logging
from api_common.metrics import init_metrics
from cloud_api.openapi_doc import init_cloud_openapi
from cloud_api.readiness import init_readiness
from cloud_api.telemetry import init_telemetry
from cloud_api.benchmark import bp as cloud_benchmark_bp
from cloud_api.routes import RUNNER_KEY, init_routes
from popex.cloud.runner import CloudRunner

__all__ = ["create_app", "init_runner", "CloudConfig"]

log = logging.getLogger(__name__)


def init_runner(app: Flask, config: CloudConfig) -> CloudRunner:
    """Attach a :class:`CloudRunner` on ``config.state_dir`` (it loads the stored models)."""
    runner = CloudRunner(config.state_dir, n_threads=config.n_threads, max_batch_size=config.max_batch_size,
                         batch_max_wait_ms=config.batch_max_wait_ms)
    app.extensions[RUNNER_KEY] = runner
    log.info("cloud runner on %s with %d stored models", config.state_dir, runner.n_models)
    return runner


def create_app(config: CloudConfig | Mapping[str, Any] | None = None) -> Flask:
    """Build the cloud app.

    Parameters
    ----------
    config : CloudConfig or mapping, optional
        A ready config; a mapping is the whole config
        (:meth:`CloudConfig.from_mapping`: tests, no YAML, no environment);
        None reads the production layers (:func:`cloud_api.config.load_config`).

    Returns
    -------
    Flask

    Raises
    ------
    popex.errors.ConfigError
        If the configuration is invalid, e.g. there is no real token.
    """
    config = resolve_config(config, config_class=CloudConfig, load=load_config)
    init_logging(level=config.log_level, log_format=config.log_format)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    init_json(app)
    app.extensions[CONFIG_KEY] = config
    init_errors(app, service_name="cloud")
    init_request_logging(app)
    init_runner(app, config)
    init_routes(app)
    app.register_blueprint(cloud_benchmark_bp)  # popex.tiers: GET .../benchmark
    init_readiness(app)
    init_telemetry(app, init_metrics(app, service="cloud"))
    init_cloud_openapi(app)
    return app
