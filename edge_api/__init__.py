"""The edge service: a Flask app factory over one :class:`~popex.edge.node.EdgeNode`.

Run it with ``./run_edge.sh`` (gunicorn ``'edge_api:create_app()'``, one
worker process: the models, plans and uplink estimate live in its memory).
Nothing is built at import time; :func:`create_app` builds the node from the
config, stores it under one extension key and registers the blueprints,
which reach it through :func:`get_node`; :func:`close_app` closes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask

from edge_api.admin import bp as admin_bp
from edge_api.rate_limit import bp as rate_limit_admin_bp
from edge_api.auth import check_write_access
from edge_api.benchmark import bp as benchmark_bp
from edge_api.classify import bp as classify_bp
from edge_api.classify_batch import bp as classify_batch_bp
from edge_api.config import EdgeConfig, load_config
from edge_api.dashboard import bp as dashboard_bp
from edge_api.device import bp as device_bp
from api_common.config import resolve_config
from api_common.errors import init_errors
from api_common.json_io import init_json
from api_common.logs import init_logging, init_request_logging
from api_common.metrics import init_metrics
from edge_api.models import bp as models_bp
from edge_api.node import NODE_KEY, get_node
from edge_api.openapi_doc import init_edge_openapi
from edge_api.readiness import init_readiness
from edge_api.status import init_status
from edge_api.telemetry import init_telemetry
from popex.edge.node import EdgeNode

__all__ = ["EdgeConfig", "NODE_KEY", "create_app", "close_app", "get_node"]


def create_app(config: EdgeConfig | Mapping[str, Any] | None = None, *, cloud_client: Any | None = None) -> Flask:
    """Build the edge app.

    Parameters
    ----------
    config : EdgeConfig or mapping, optional
        A ready config; or a mapping that is the whole config
        (:meth:`EdgeConfig.from_mapping`: no YAML, no environment; tests);
        None: :func:`edge_api.config.load_config` (defaults, YAML, environment).
    cloud_client : object, optional
        Replaces the :class:`~popex.edge.cloud_port.CloudClient` (tests inject a fake with the same methods).

    Returns
    -------
    Flask

    Raises
    ------
    popex.errors.ConfigError
        If the configuration is invalid, e.g. there is no real token, or writes would be open
        (no admin token and no ``allow_open_writes``; :func:`edge_api.auth.check_write_access`).
    """
    config = resolve_config(config, config_class=EdgeConfig, load=load_config)
    check_write_access(config)
    init_logging(level=config.log_level, log_format=config.log_format)
    app = Flask(__name__)
    # The largest body any route takes; each route lowers it for itself.
    app.config["MAX_CONTENT_LENGTH"] = max(config.max_image_bytes, config.max_model_bytes)
    init_json(app)
    node = EdgeNode.from_config(config, cloud_client=cloud_client)
    app.extensions[NODE_KEY] = node
    init_errors(app, service_name="edge")
    init_request_logging(app)
    init_telemetry(app, init_metrics(app, service="edge"))
    app.register_blueprint(classify_bp)
    app.register_blueprint(classify_batch_bp)
    app.register_blueprint(models_bp)
    app.register_blueprint(benchmark_bp)  # popex.tiers: GET .../benchmark
    app.register_blueprint(admin_bp)
    app.register_blueprint(rate_limit_admin_bp)  # popex.ratelimit.streams: per-stream buckets
    app.register_blueprint(device_bp)  # popex.edge.tensor_run, three_tier_plan: the device tier's routes
    init_status(app)
    init_readiness(app)
    app.register_blueprint(dashboard_bp)
    init_edge_openapi(app)
    if config.start_background:
        node.start()
    return app


def close_app(app: Flask) -> None:
    """Close the app's node: stop its threads, close the cloud client."""
    get_node(app).close()
