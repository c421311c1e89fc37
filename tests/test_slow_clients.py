"""Slow clients against the real services (run_edge.sh / run_cloud.sh, api_common.gunicorn_worker).

4 and then 16 connections send half their headers and stall, more than the
4 request threads each service has. Good requests must still be answered,
on the edge (classify) and on the cloud (an offload, whose route reads
nothing before the token), while the stalled connections stay open.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import DEFAULT_MODEL_DIR
from popex.data import encode_png
from popex.testbed.services import start_cloud, start_edge
from popex.wire import encode_offload

pytestmark = pytest.mark.slow

_HALF_HEADERS = b"POST /api/v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Le"
_N_GOOD = 5
_TIMEOUT_S = 8.0  # well under the worker's header timeout: answered while the slow ones still hold on


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root: Path = tmp_path_factory.mktemp("slow-clients")
    token = secrets.token_hex(16)
    with start_cloud(token=token, state_dir=root / "cloud", log_path=root / "cloud.log") as cloud:
        cloud.wait_ready()
        with start_edge(token=token, cloud_url=cloud.url, state_dir=root / "edge", log_path=root / "edge.log",
                        n_threads=4) as edge:
            edge.wait_ready(timeout_s=180)
            deadline_s = time.monotonic() + 180
            while _default_model(edge)["state"] != "ready":  # pushed to the cloud, so offloads can reach it
                assert time.monotonic() < deadline_s and _default_model(edge)["state"] != "failed"
                time.sleep(0.5)
            yield {"cloud": cloud, "edge": edge, "token": token}


def _stall(url: str, n_connections: int) -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(n_connections):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(_HALF_HEADERS)
        sockets.append(sock)
    time.sleep(0.5)  # let the service take them
    return sockets


def _input_shape() -> list[int]:
    """The default model's input shape, read from its files (whichever form it ships in)."""
    for name in ("model.json", "spec.json"):
        if (DEFAULT_MODEL_DIR / name).is_file():
            return json.loads((DEFAULT_MODEL_DIR / name).read_text())["input_shape"]
    pytest.skip(f"no default model in {DEFAULT_MODEL_DIR}")


def _default_model(edge) -> dict:
    (listed,) = requests.get(edge.url + "/api/v1/models", timeout=30).json()["models"]
    return requests.get(f"{edge.url}/api/v1/models/{listed['model_id']}", timeout=30).json()


@pytest.mark.parametrize("n_slow", [4, 16])
def test_half_open_connections_do_not_keep_good_requests_from_an_answer(services, n_slow):
    edge, cloud = services["edge"], services["cloud"]
    image = encode_png(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    model = _default_model(edge)
    payload = encode_offload(np.zeros((1, *_input_shape()), np.float32), model_id=model["model_id"], split=0,
                             request_id="slow-test")
    stalled = _stall(edge.url, n_slow) + _stall(cloud.url, n_slow)
    try:
        statuses = []
        for _ in range(_N_GOOD):
            statuses.append(requests.post(edge.url + "/api/v1/classify?deadline_ms=1000", data=image,
                                          headers={"Content-Type": "image/png"}, timeout=_TIMEOUT_S).status_code)
            statuses.append(requests.post(cloud.url + "/api/v1/infer", data=payload, timeout=_TIMEOUT_S,
                                          headers={"Authorization": f"Bearer {services['token']}",
                                                   "Content-Type": "application/octet-stream"}).status_code)
        assert statuses == [200] * (2 * _N_GOOD)
        # the stalled connections are still open: nothing was answered to them yet
        for sock in stalled:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-000000"])
@pytest.mark.parametrize("path", ["/api/v1/infer", "/api/v1/models/" + "0" * 64])
def test_the_cloud_refuses_a_request_without_its_token_before_reading_the_body(services, authorization, path):
    """Headers that announce a 50 MB body, and no body: the 401 comes at once, so the cloud never waited for
    (or read) the body of a caller without the token."""
    host, port = services["cloud"].url.removeprefix("http://").split(":")
    method = "POST" if path.endswith("infer") else "PUT"
    auth = f"Authorization: {authorization}\r\n" if authorization else ""
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/octet-stream\r\n"
                     f"Content-Length: 50000000\r\n\r\n".encode())
        sock.settimeout(5.0)  # well under the worker's 10 s read timeout: the answer did not wait for a body
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
