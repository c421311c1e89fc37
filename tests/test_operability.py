"""Operability (issue 16): log lines, readiness, Prometheus metrics of both services.

The metrics are parsed with prometheus_client's own text parser, as a
Prometheus server would read them; counts are compared before and after a
stream of requests, never absolute latencies.
"""

from __future__ import annotations

import io
import json
import logging

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from api_common.logs import init_logging
from cloud_api import create_app as create_cloud_app
from edge_api import get_node
from popex.data import encode_png
from popex.decision.latency import Link
from popex.edge.cloud_port import CloudUnavailable

N_REQUESTS = 100


def _png(seed: int = 1) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8))


def _samples(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.get_data(as_text=True))
            for sample in family.samples}


def _total(samples, name: str, **labels: str) -> float:
    return sum(value for (sample_name, sample_labels), value in samples.items()
               if sample_name == name and all(dict(sample_labels).get(k) == v for k, v in labels.items()))


@pytest.fixture
def ready_edge(app, client, model_actions):
    assert model_actions.wait_idle()
    return app, client


def test_readyz_follows_the_default_model_and_the_cloud(ready_edge, fake_cloud):
    _, client = ready_edge
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["checks"]["default_model"]["state"] == "ready"
    fake_cloud.down = True
    response = client.get("/readyz")
    assert response.status_code == 503 and response.get_json()["checks"]["cloud"]["ok"] is False
    assert client.get("/healthz").status_code == 200  # liveness is not readiness


def test_readyz_is_not_ready_while_the_default_model_is_missing(make_app, config, tmp_path):
    app = make_app({**config, "default_model_dir": str(tmp_path / "absent")})
    response = app.test_client().get("/readyz")
    assert response.status_code == 503 and response.get_json()["checks"]["default_model"]["state"] == "missing"
    app = make_app({**config, "default_model_dir": None, "state_dir": str(tmp_path / "other")})
    assert app.test_client().get("/readyz").status_code == 200


def test_metrics_counters_move_over_a_stream_of_requests(ready_edge, fake_cloud, edge_internals, model_actions):
    app, client = ready_edge
    model_actions.force(get_node(app).runner.default_model_id, split=2)  # every image offloaded after stage 2
    n_cloud_before = edge_internals(app)[1].counts()["n_cloud"]
    before = _samples(client)
    n_fallback = 10
    for i in range(N_REQUESTS):
        if i == N_REQUESTS - n_fallback:
            fake_cloud.fail("infer", CloudUnavailable("the cloud is down"))
        response = client.post("/api/v1/classify?deadline_ms=1000", data=_png(i), content_type="image/png")
        assert response.status_code == 200, response.get_json()
    assert client.post("/api/v1/classify", data=b"", content_type="image/png").status_code == 400
    assert get_node(app).planner.drain()  # the offload measurements reach the metrics on the planner's thread
    after = _samples(client)
    moved = _total(after, "popex_edge_classify_requests_total") - _total(before, "popex_edge_classify_requests_total")
    assert moved == N_REQUESTS + 1
    assert _total(after, "popex_edge_classify_requests_total", outcome="refused") == 1
    assert _total(after, "popex_edge_classify_latency_seconds_count") == N_REQUESTS
    assert _total(after, "popex_edge_classify_part_latency_seconds_count", part="edge") == N_REQUESTS
    assert _total(after, "popex_edge_latency_prediction_error_seconds_count") == N_REQUESTS
    n_unavailable = _total(after, "popex_edge_fallbacks_total", reason="CloudUnavailable")
    n_open = _total(after, "popex_edge_fallbacks_total", reason="circuit_open")  # then answered locally at once
    assert n_unavailable == get_node(app).config.breaker_n_failures
    assert n_unavailable + n_open == _total(after, "popex_edge_classify_requests_total", outcome="fallback") \
        == n_fallback
    assert _total(after, "popex_edge_http_requests_total", route="/api/v1/classify", status="200") == N_REQUESTS
    assert _total(after, "popex_edge_uplink_estimate_bytes_per_second") > 0
    assert _total(after, "popex_edge_uplink_rtt_seconds") >= 0
    assert _total(after, "popex_edge_models", state="ready") == 1
    assert ("popex_edge_plan_changes_total", ()) in after
    n_cloud = edge_internals(app)[1].counts()["n_cloud"] - n_cloud_before
    assert _total(after, "popex_edge_offload_bytes_count") == n_cloud
    assert _total(after, "popex_edge_classify_requests_total", where="cloud") == n_cloud
    assert n_cloud == N_REQUESTS - n_fallback and _total(after, "popex_edge_offload_payload_bytes_total") > 0
    recent = client.get("/api/v1/requests").get_json()["requests"]
    assert len(recent) == N_REQUESTS and {"total_ms", "deadline_ms", "where", "exit"} <= set(recent[-1])


def test_a_replan_logs_the_old_and_new_strategy_and_why(make_app, config, caplog):
    # A slow edge: a fast link makes offloading pay, a slow one does not, so the strategy changes.
    app = make_app({**config, "emulate_edge_slowdown": 50.0})
    client, node = app.test_client(), get_node(app)
    assert node.preparation.wait_idle(120.0)
    node.planner.submit_link(Link(uplink_mbps=1000.0, rtt_ms=0.5))
    assert node.planner.drain()
    caplog.set_level(logging.INFO)
    caplog.clear()
    before = _total(_samples(client), "popex_edge_plan_changes_total")
    node.planner.submit_link(Link(uplink_mbps=0.01, rtt_ms=900.0))  # nothing can be offloaded in time
    assert node.planner.drain()
    messages = [record.getMessage() for record in caplog.records]
    assert any(m.startswith("re-planned: uplink estimate 0.01 Mbit/s") for m in messages), messages
    changes = [m for m in messages if " strategy: split " in m and "->" in m]
    assert len(changes) == 1 and changes[0].endswith("(uplink estimate 0.01 Mbit/s, RTT 900 ms)"), changes
    assert _total(_samples(client), "popex_edge_plan_changes_total") == before + len(changes)


def test_refusals_fallbacks_and_state_changes_are_logged_without_secrets(ready_edge, fake_cloud, caplog, token):
    app, client = ready_edge
    caplog.set_level(logging.INFO)
    response = client.get("/api/v1/admin/link", headers={"Authorization": "Bearer wrong-secret-value"})
    assert response.status_code == 401
    fake_cloud.fail("infer", CloudUnavailable("the cloud is down"))
    client.post("/api/v1/classify?deadline_ms=1000", data=_png(), content_type="image/png")
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "refused GET /api/v1/admin/link: 401" in text
    assert "wrong-secret-value" not in text and token not in text
    fallbacks = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fallback of request")]
    assert all("CloudUnavailable" in m for m in fallbacks)


def test_model_state_changes_are_logged(make_app, config, caplog, tmp_path):
    caplog.set_level(logging.INFO)
    app = make_app({**config, "state_dir": str(tmp_path / "logged")})
    assert get_node(app).preparation.wait_idle(120.0)
    messages = [record.getMessage() for record in caplog.records]
    assert any(" -> ready" in m and m.startswith("model ") for m in messages), messages


def test_json_log_lines(token):
    stream = io.StringIO()
    handler = init_logging(level="INFO", log_format="json", stream=stream)
    try:
        logging.getLogger("popex.edge.planner").info("re-planned: %s", "why")
        line = json.loads(stream.getvalue().splitlines()[-1])
        assert line["message"] == "re-planned: why" and line["level"] == "INFO" and line["ts"].endswith("Z")
    finally:
        logging.getLogger().removeHandler(handler)


def test_the_cloud_serves_readyz_and_metrics(tmp_path, token):
    app = create_cloud_app({"token": token, "state_dir": str(tmp_path / "cloud"), "log_format": "json"})
    client = app.test_client()
    response = client.get("/readyz")
    assert response.status_code == 200 and response.get_json() == {"ready": True, "n_models": 0}
    for _ in range(3):
        assert client.post("/api/v1/infer", data=b"x" * 100).status_code == 401
    samples = _samples(client)
    assert _total(samples, "popex_cloud_offloads_total", status="401") == 3
    assert _total(samples, "popex_cloud_offload_received_bytes_total") == 300
    assert _total(samples, "popex_cloud_models_loaded") == 0
    assert _total(samples, "popex_cloud_http_requests_total", route="/readyz") == 1


@pytest.mark.parametrize("script", ["run_edge.sh", "run_cloud.sh"])
@pytest.mark.parametrize("bad_token", ["short", "has a space 0123"])
def test_the_run_scripts_refuse_a_bad_token_in_one_line_before_gunicorn(script, bad_token, tmp_path):
    import os
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {"PATH": os.environ["PATH"], "POPEX_TOKEN": bad_token, "HOME": str(tmp_path)}
    result = subprocess.run([str(repo / script), "--cloud-url", "http://127.0.0.1:9"] if script == "run_edge.sh"
                            else [str(repo / script)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "at least 8 characters" in result.stderr, result.stderr


def test_fallback_reasons_become_bounded_labels():
    from edge_api.telemetry import fallback_kind

    assert fallback_kind("CloudTimeout: the cloud took longer than 12 ms") == "CloudTimeout"
    assert fallback_kind("no time left in the budget for the cloud") == "budget_exhausted"
    assert fallback_kind("cannot encode the tensor: NaN") == "encode_failed"
    assert fallback_kind("some free text: with a colon") == "other"
    assert fallback_kind(None) == "unknown"
