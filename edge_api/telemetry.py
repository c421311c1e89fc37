"""What the edge tells its operator: classify outcomes, fallbacks and re-plans as metrics and log lines.

Hooked in the Flask layer, never on the request's critical path: the
classify route leaves its :class:`~popex.edge.classification.Classification`
on ``flask.g``, and an ``after_request`` hook counts it (outcome, where,
exit, policy), times it (total and per part), records the latency model's
error, logs a fallback with its reason and keeps it in a short ring of recent
requests (``GET /api/v1/requests``, the dashboard's source). The planner's
re-plans reach :class:`StrategyWatch` on the planner's own thread: it logs
each model's strategy change (old -> new, and why) and counts it. Gauges of
the uplink estimate, the RTT, the measured overhead and each model's current
strategy are read from the node when ``/metrics`` is scraped.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from api_common.metrics import LATENCY_BUCKETS_S, ServiceMetrics
from edge_api.auth import require_client
from edge_api.node import get_node
from popex.errors import PopexError

__all__ = ["CLASSIFICATION_KEY", "EdgeTelemetry", "StrategyWatch", "bp", "init_telemetry", "fallback_kind"]

_log = logging.getLogger(__name__)

CLASSIFICATION_KEY = "popex_classification"  # flask.g attribute the classify route sets
TELEMETRY_KEY = "popex_edge_telemetry"
_N_RECENT = 200
_ERROR_BUCKETS_S = (-0.05, -0.02, -0.01, -0.005, -0.002, -0.001, 0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
_PARTS = ("edge", "transfer", "cloud")
_BYTES_BUCKETS = tuple(float(2**k) for k in range(8, 25, 2))  # 256 B .. 16 MiB
_CLASSIFY_ENDPOINT = "classify.classify"

bp = Blueprint("telemetry", __name__, url_prefix="/api/v1")


def fallback_kind(reason: str | None) -> str:
    """A bounded label for a fallback reason: the error class before ':' or a short kind.

    >>> fallback_kind("CloudUnavailable: connection refused")
    'CloudUnavailable'
    >>> fallback_kind("no time left in the budget for the cloud")
    'budget_exhausted'
    """
    if not reason:
        return "unknown"
    if reason.startswith("no time left"):
        return "budget_exhausted"
    if reason.startswith("cannot encode"):
        return "encode_failed"
    if reason.startswith("the cloud's circuit breaker"):
        return "circuit_open"
    head = reason.split(":", 1)[0].strip()
    return head if head.isidentifier() and len(head) <= 40 else "other"


def _strategies(node: Any) -> Iterator[tuple[str, Any]]:
    """(model id, current strategy at the default requirement) of every planned model."""
    runner = node.runner
    for model_id in node.registry.ids():
        try:
            model = node.registry.get(model_id)
            strategy = runner.plan_of(model).strategy(runner.default_deadline_ms, runner.objective)
        except PopexError:  # removed meanwhile, or not planned yet
            continue
        yield model_id, strategy


def _describe(strategy: Any) -> str:
    thresholds = ",".join("off" if t is None else f"{t:g}" for t in strategy.thresholds)
    return (f"split {strategy.split} thresholds [{thresholds}] ({strategy.latency_ms:.2f} ms, "
            f"accuracy {strategy.accuracy:.4f}{'' if strategy.feasible else ', infeasible'})")


class StrategyWatch:
    """Logs and counts each model's strategy change (at the default requirement) after a re-plan.

    Parameters
    ----------
    node : EdgeNode
    plan_changes : prometheus_client.Counter
        Incremented once per model whose strategy changed.
    """

    def __init__(self, node: Any, plan_changes: Counter) -> None:
        self.node = node
        self.plan_changes = plan_changes
        self._lock = threading.Lock()
        self._last: dict[str, tuple[Any, ...]] = {}
        self._described: dict[str, str] = {}
        self.replanned("start")

    def replanned(self, reason: str) -> None:
        """Compare every model's strategy with the last one seen; log and count each change with ``reason``."""
        with self._lock:
            for model_id, strategy in _strategies(self.node):
                key = (strategy.split, tuple(strategy.thresholds))
                old = self._last.get(model_id)
                if old == key:
                    continue
                described = _describe(strategy)
                if old is not None:
                    _log.info("model %s strategy: %s -> %s (%s)", model_id[:12], self._described[model_id],
                              described, reason)
                    self.plan_changes.inc()
                self._last[model_id] = key
                self._described[model_id] = described


class _NodeCollector(Collector):
    """Gauges read from the node at scrape time: uplink, RTT, overhead, models by state, current strategies."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[GaugeMetricFamily]:
        node = self.node
        link = node.monitor.link() if node.monitor is not None else node.plans.link
        yield GaugeMetricFamily("popex_edge_uplink_estimate_bytes_per_second",
                                "The uplink rate estimate the plans use", value=link.uplink_mbps * 1e6 / 8.0)
        yield GaugeMetricFamily("popex_edge_uplink_rtt_seconds", "The RTT estimate to the cloud",
                                value=link.rtt_ms / 1000.0)
        yield GaugeMetricFamily("popex_edge_offload_overhead_seconds", "Measured per-offload overhead O (median)",
                                value=node.planner.overhead.current_ms / 1000.0)
        states = GaugeMetricFamily("popex_edge_models", "Registered models by state", labels=["state"])
        counts: collections.Counter[str] = collections.Counter(
            node.registry.get(model_id).state for model_id in node.registry.ids())
        for state, n in sorted(counts.items()):
            states.add_metric([state], n)
        yield states
        split = GaugeMetricFamily("popex_edge_strategy_split", "Current split at the default requirement",
                                  labels=["model"])
        predicted = GaugeMetricFamily("popex_edge_strategy_predicted_latency_seconds",
                                      "Predicted latency of the current strategy", labels=["model"])
        accuracy = GaugeMetricFamily("popex_edge_strategy_accuracy_ratio",
                                     "Calibrated accuracy of the current strategy", labels=["model"])
        for model_id, strategy in _strategies(node):
            split.add_metric([model_id[:12]], strategy.split)
            predicted.add_metric([model_id[:12]], strategy.latency_ms / 1000.0)
            accuracy.add_metric([model_id[:12]], strategy.accuracy)
        yield from (split, predicted, accuracy)


class EdgeTelemetry:
    """The edge's own metrics, the strategy watch and the ring of recent requests.

    Parameters
    ----------
    node : EdgeNode
    metrics : ServiceMetrics
        Its registry receives the edge's metrics.
    """

    def __init__(self, node: Any, metrics: ServiceMetrics) -> None:
        registry = metrics.registry
        self.requests = Counter("popex_edge_classify_requests_total", "Classify requests by outcome, where, exit",
                                ["outcome", "where", "exit", "policy"], registry=registry)
        self.latency = Histogram("popex_edge_classify_latency_seconds", "Classify latency, arrival to answer",
                                 buckets=LATENCY_BUCKETS_S, registry=registry)
        self.part_latency = Histogram("popex_edge_classify_part_latency_seconds", "Classify latency by part",
                                      ["part"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.prediction_error = Histogram("popex_edge_latency_prediction_error_seconds",
                                          "Measured minus predicted latency of a classify request",
                                          buckets=_ERROR_BUCKETS_S, registry=registry)
        self.fallbacks = Counter("popex_edge_fallbacks_total", "Answers at a local exit after a cloud failure",
                                 ["reason"], registry=registry)
        self.plan_changes = Counter("popex_edge_plan_changes_total",
                                    "Strategy changes (per model, default requirement) after a re-plan",
                                    registry=registry)
        self.offload_bytes = Histogram("popex_edge_offload_bytes", "Bytes on the wire of one request's offload",
                                       buckets=_BYTES_BUCKETS, registry=registry)
        self.offload_payload_bytes = Counter("popex_edge_offload_payload_bytes_total",
                                             "Payload bytes of request offloads before compression",
                                             registry=registry)
        node.planner.offload_listeners.append(self._offloaded)
        registry.register(_NodeCollector(node))
        self.watch = StrategyWatch(node, self.plan_changes)
        node.planner.replan_listeners.append(self.watch.replanned)
        self._recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=_N_RECENT)
        self._recent_lock = threading.Lock()

    def _offloaded(self, n_bytes: int, payload_n_bytes: int) -> None:
        self.offload_bytes.observe(n_bytes)
        self.offload_payload_bytes.inc(payload_n_bytes)

    def observe(self, result: Any) -> None:
        """Count, time and remember one answered classify request."""
        exit_label = str(result.exit)
        outcome = "fallback" if result.fallback else "answered"
        self.requests.labels(outcome, result.where, exit_label, result.policy).inc()
        latency = result.latency
        self.latency.observe(latency.total_ms / 1000.0)
        for part, value_ms in zip(_PARTS, (latency.edge_ms, latency.transfer_ms, latency.cloud_ms)):
            self.part_latency.labels(part).observe(value_ms / 1000.0)
        self.prediction_error.observe((latency.total_ms - result.predicted_latency_ms) / 1000.0)
        if result.fallback:
            kind = fallback_kind(result.fallback_reason)
            self.fallbacks.labels(kind).inc()
            _log.warning("fallback of request %s (model %s) at exit %s: %s", result.request_id[:12],
                         result.model_id[:12], exit_label, result.fallback_reason)
        with self._recent_lock:
            self._recent.append({
                "request_id": result.request_id, "model": result.model_id, "where": result.where,
                "exit": result.exit, "fallback": result.fallback, "total_ms": latency.total_ms,
                "predicted_latency_ms": result.predicted_latency_ms, "deadline_ms": result.deadline_ms,
                "policy": result.policy,
            })

    def refused(self, status: int) -> None:
        """Count a classify request answered with an error status."""
        self.requests.labels("refused" if status < 500 else "error", "none", "none", "none").inc()

    def recent(self) -> list[dict[str, Any]]:
        """The recent answered requests, oldest first."""
        with self._recent_lock:
            return list(self._recent)


def _get_telemetry() -> EdgeTelemetry:
    return current_app.extensions[TELEMETRY_KEY]


def _after_classify(response: Response) -> Response:
    if request.endpoint != _CLASSIFY_ENDPOINT:
        return response
    result = g.pop(CLASSIFICATION_KEY, None)
    if result is not None:
        _get_telemetry().observe(result)
    elif response.status_code >= 400:
        _get_telemetry().refused(response.status_code)
    return response


@bp.get("/requests")
@require_client
def recent_requests() -> ResponseReturnValue:
    """The most recent answered classify requests (at most 200), oldest first."""
    return jsonify({"requests": _get_telemetry().recent()})


def init_telemetry(app: Flask, metrics: ServiceMetrics) -> EdgeTelemetry:
    """Attach the edge's telemetry to ``app``: metrics, the strategy watch, ``GET /api/v1/requests``."""
    telemetry = EdgeTelemetry(get_node(app), metrics)
    app.extensions[TELEMETRY_KEY] = telemetry
    app.after_request(_after_classify)
    app.register_blueprint(bp)
    return telemetry
