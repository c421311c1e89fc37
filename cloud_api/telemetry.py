"""The cloud's own metrics: offloads by status, their payload bytes and duration, the models loaded.

Hooked in the Flask layer (``after_request`` on the infer route), so the
routes and the runner stay as they are. Bytes are those received on the
wire (deflated when the edge deflated them).
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Flask, Response, current_app, request
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from api_common.metrics import ServiceMetrics
from cloud_api.routes import RUNNER_KEY

__all__ = ["init_telemetry"]

_INFER_ENDPOINT = "cloud_api.infer"
_BYTES_BUCKETS = tuple(float(2**k) for k in range(8, 27, 2))  # 256 B .. 64 MiB
TELEMETRY_KEY = "popex_cloud_telemetry"


class _RunnerCollector(Collector):
    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runner = self.app.extensions.get(RUNNER_KEY)
        yield GaugeMetricFamily("popex_cloud_models_loaded", "Models the cloud holds",
                                value=0 if runner is None else runner.n_models)


class _CloudTelemetry:
    def __init__(self, metrics: ServiceMetrics, app: Flask) -> None:
        registry = metrics.registry
        self.offloads = Counter("popex_cloud_offloads_total", "Offloaded inferences by HTTP status", ["status"],
                                registry=registry)
        self.offload_bytes = Histogram("popex_cloud_offload_payload_bytes", "Bytes of an offload request body",
                                       buckets=_BYTES_BUCKETS, registry=registry)
        self.offload_bytes_total = Counter("popex_cloud_offload_received_bytes_total",
                                           "Bytes received in offload request bodies", registry=registry)
        registry.register(_RunnerCollector(app))


def _after_infer(response: Response) -> Response:
    if request.endpoint == _INFER_ENDPOINT:
        telemetry: _CloudTelemetry = current_app.extensions[TELEMETRY_KEY]
        telemetry.offloads.labels(str(response.status_code)).inc()
        n_bytes = request.content_length
        if n_bytes is not None:
            telemetry.offload_bytes.observe(n_bytes)
            telemetry.offload_bytes_total.inc(n_bytes)
    return response


def init_telemetry(app: Flask, metrics: ServiceMetrics) -> None:
    """Attach the cloud's metrics to ``metrics.registry`` and count every offload."""
    app.extensions[TELEMETRY_KEY] = _CloudTelemetry(metrics, app)
    app.after_request(_after_infer)
