"""Prometheus metrics for both services: one registry per app, HTTP request counts and durations, ``/metrics``.

Each app gets its own :class:`prometheus_client.CollectorRegistry` (several
apps live in one test process; the global registry would mix them). The
HTTP layer counts every request by route pattern, method and status, and
times it; a service adds its own metrics to :attr:`ServiceMetrics.registry`
(``edge_api.telemetry``, ``cloud_api.telemetry``). Names carry their unit
(``_seconds``, ``_bytes``) and their service (``popex_edge_``, ``popex_cloud_``).
"""

from __future__ import annotations

import time

from flask import Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["METRICS_KEY", "LATENCY_BUCKETS_S", "ServiceMetrics", "get_metrics", "init_metrics"]

METRICS_KEY = "popex_metrics"  # app.extensions key of the ServiceMetrics
# Request latencies of this system are ms to a few s: finer at the low end than prometheus_client's default.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServiceMetrics:
    """The metrics of one service's app.

    Parameters
    ----------
    service : {"edge", "cloud"}
        The name prefix: ``popex_<service>_``.
    """

    def __init__(self, service: str) -> None:
        self.service = service
        self.prefix = f"popex_{service}_"
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(f"{self.prefix}http_requests_total", "HTTP requests by route, method, status",
                                     ["route", "method", "status"], registry=self.registry)
        self.http_duration = Histogram(f"{self.prefix}http_request_duration_seconds",
                                       "HTTP request duration by route (reading the body to the response)",
                                       ["route"], buckets=LATENCY_BUCKETS_S, registry=self.registry)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


def get_metrics(app: Flask | None = None) -> ServiceMetrics:
    """The :class:`ServiceMetrics` of ``app`` (default: the current app)."""
    return (current_app if app is None else app).extensions[METRICS_KEY]


def _started() -> None:
    g.metrics_started_s = time.perf_counter()


def _observed(response: Response) -> Response:
    metrics = get_metrics()
    rule = request.url_rule
    route = rule.rule if rule is not None else "unmatched"  # a pattern, never a raw path: bounded label values
    metrics.http_requests.labels(route, request.method, str(response.status_code)).inc()
    started = g.get("metrics_started_s")
    if started is not None:
        metrics.http_duration.labels(route).observe(time.perf_counter() - started)
    return response


def _metrics_view() -> Response:
    """Prometheus metrics (text exposition format)."""
    return Response(get_metrics().exposition(), mimetype=CONTENT_TYPE_LATEST.split(";")[0],
                    headers={"Content-Type": CONTENT_TYPE_LATEST})


def init_metrics(app: Flask, *, service: str) -> ServiceMetrics:
    """Attach a :class:`ServiceMetrics`, count and time every request, and serve ``GET /metrics``."""
    metrics = ServiceMetrics(service)
    app.extensions[METRICS_KEY] = metrics
    app.before_request(_started)
    app.after_request(_observed)
    app.add_url_rule("/metrics", "metrics", _metrics_view, methods=["GET"])
    return metrics
