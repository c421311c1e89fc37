"""The edge service: a Flask app factory over popex.runtime (registry, plans, runner).

Run it with ``./run_edge.sh`` (gunicorn ``'edge_api:create_app()'``, one
worker process: the models, plans and uplink estimate live in its memory).
Nothing is built at import time; :func:`create_app` builds the shared
objects through the ``init_*`` functions below, and :func:`close_app` stops
what they started.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from flask import Flask

from edge_api.admin import bp as admin_bp
from edge_api.classify import MAX_IMAGE_BYTES_KEY, RUNNER_KEY
from edge_api.classify import bp as classify_bp
from edge_api.config import EdgeConfig, load_config
from edge_api.errors import init_errors
from edge_api.models import MAX_MODEL_BYTES_KEY, SERVICE_KEY
from edge_api.models import bp as models_bp
from edge_api.status import init_status
from popex.edge.uplink import UplinkMonitor
from popex.decision.latency import Link
from popex.errors import PopexError
from popex.edge.cloud_port import CloudClient
from popex.edge.pipeline import EdgeRunner, OverheadTracker
from popex.edge.preparation import EdgeService
from popex.link.emulation import parse_link
from popex.edge.plans import PlanBook
from popex.edge.store import ModelRegistry

__all__ = [
    "CONFIG_KEY",
    "CLIENT_KEY",
    "REGISTRY_KEY",
    "PLANS_KEY",
    "MONITOR_KEY",
    "EdgeConfig",
    "create_app",
    "close_app",
    "init_cloud_client",
    "init_registry",
    "init_plans",
    "init_monitor",
    "init_runner",
    "init_service",
]

log = logging.getLogger(__name__)

CONFIG_KEY = "popex_edge_config"
CLIENT_KEY = "popex_edge_cloud_client"
REGISTRY_KEY = "popex_edge_registry"
PLANS_KEY = "popex_edge_plans"
MONITOR_KEY = "popex_edge_uplink_monitor"
_HISTORY_FILE = "uplink_history.csv"


def init_cloud_client(app: Flask, config: EdgeConfig, client: Any | None = None) -> Any:
    """Attach the cloud client: ``client`` if given (tests pass a fake), else a
    :class:`CloudClient` for ``config.cloud_url``, through the emulated link if configured."""
    if client is None:
        link = parse_link(config.emulate_link) if config.emulate_link is not None else None
        client = CloudClient(config.cloud_url, token=config.token, link=link)
    app.extensions[CLIENT_KEY] = client
    return client


def init_registry(app: Flask, config: EdgeConfig) -> ModelRegistry:
    """Attach the model registry on ``config.state_dir`` (the stored models load here)."""
    registry = ModelRegistry(config.state_dir)
    app.extensions[REGISTRY_KEY] = registry
    log.info("edge registry on %s with %d stored models", config.state_dir, len(registry))
    return registry


def init_plans(app: Flask, config: EdgeConfig, client: Any) -> PlanBook:
    """Attach the plan book, planning first with the emulated link if any, else the configured one."""
    emulated = getattr(client, "link", None)
    if emulated is not None:
        link = Link(uplink_mbps=emulated.uplink_mbps, rtt_ms=emulated.rtt_ms)
    else:
        link = Link(uplink_mbps=config.initial_uplink_mbps, rtt_ms=config.initial_rtt_ms)
    plans = PlanBook(link=link, headroom_fraction=config.plan_headroom_fraction)
    app.extensions[PLANS_KEY] = plans
    return plans


def init_monitor(app: Flask, config: EdgeConfig, client: Any, plans: PlanBook) -> UplinkMonitor:
    """Attach the uplink monitor; a change of the estimate re-plans every model (not started here)."""
    monitor = UplinkMonitor(
        client,
        cloud_url=config.cloud_url,
        initial_link=plans.link,
        probe_interval_s=config.probe_interval_s,
        probe_n_bytes=config.probe_n_bytes,
        window_n=config.uplink_window_n,
        hysteresis_fraction=config.replan_hysteresis_fraction,
        history_path=config.state_dir / _HISTORY_FILE,
        on_change=plans.set_link,
        rtt_method=config.rtt_method,
        timeout_s=config.cloud_timeout_s,
    )
    app.extensions[MONITOR_KEY] = monitor
    return monitor


def init_runner(app: Flask, config: EdgeConfig, *, registry: ModelRegistry, plans: PlanBook, client: Any,
                monitor: UplinkMonitor) -> EdgeRunner:
    """Attach the :class:`EdgeRunner` that classifies with the registry's models and the current plans."""
    runner = EdgeRunner(
        registry,
        plans,
        client,
        monitor=monitor,
        objective=config.objective,
        default_deadline_ms=config.default_deadline_ms,
        max_image_pixels=config.max_image_pixels,
        wire_dtype=config.wire_dtype,
        wire_compression=config.wire_compression,
        overhead=OverheadTracker(initial_ms=config.initial_offload_overhead_ms),
        replan_hysteresis_fraction=config.replan_hysteresis_fraction,
        edge_slowdown=config.emulate_edge_slowdown,
        distortion_aware_default=config.distortion_aware_default,
    )
    app.extensions[RUNNER_KEY] = runner
    app.extensions[MAX_IMAGE_BYTES_KEY] = config.max_image_bytes
    return runner


def init_service(app: Flask, config: EdgeConfig, runner: EdgeRunner) -> EdgeService:
    """Attach the :class:`EdgeService`, plan the stored models and register the default model."""
    service = EdgeService(
        runner,
        cloud_url=config.cloud_url,
        emulated_link=getattr(runner.client, "link", None),
        cloud_speedup=config.cloud_speedup,
        profile_n_repeats=config.profile_n_repeats,
        cloud_timeout_s=config.cloud_timeout_s,
    )
    app.extensions[SERVICE_KEY] = service
    app.extensions[MAX_MODEL_BYTES_KEY] = config.max_model_bytes
    service.open()
    directory = config.default_model_dir
    if directory is not None and directory.is_dir():
        try:
            runner.default_model_id = service.register_directory(str(directory))
        except PopexError as err:  # the service is still useful for uploaded models
            log.error("cannot register the default model from %s: %s", directory, err)
    return service


def create_app(config: EdgeConfig | Mapping[str, Any] | None = None, *, cloud_client: Any | None = None) -> Flask:
    """Build the edge app.

    Parameters
    ----------
    config : EdgeConfig or mapping, optional
        A ready config, or overrides layered on YAML and the environment
        (see :func:`edge_api.config.load_config`).
    cloud_client : object, optional
        Replaces the :class:`CloudClient` (tests inject a fake with the same methods).

    Raises
    ------
    popex.errors.ConfigError
        If the configuration is invalid, e.g. there is no real token.
    """
    config = config if isinstance(config, EdgeConfig) else load_config(config)
    if config.n_threads is not None:
        torch.set_num_threads(config.n_threads)
    app = Flask(__name__)
    # The largest body any route takes; each route lowers it for itself.
    app.config["MAX_CONTENT_LENGTH"] = max(config.max_image_bytes, config.max_model_bytes)
    app.json.sort_keys = False
    app.extensions[CONFIG_KEY] = config
    init_errors(app)
    client = init_cloud_client(app, config, cloud_client)
    registry = init_registry(app, config)
    plans = init_plans(app, config, client)
    monitor = init_monitor(app, config, client, plans)
    runner = init_runner(app, config, registry=registry, plans=plans, client=client, monitor=monitor)
    init_service(app, config, runner)
    app.register_blueprint(classify_bp)
    app.register_blueprint(models_bp)
    app.register_blueprint(admin_bp)
    init_status(app)
    if config.start_background:
        monitor.start()
    return app


def close_app(app: Flask) -> None:
    """Stop the uplink monitor and the preparation worker, close the cloud client."""
    app.extensions[MONITOR_KEY].stop()
    app.extensions[SERVICE_KEY].close()
    close = getattr(app.extensions[CLIENT_KEY], "close", None)
    if callable(close):
        close()
