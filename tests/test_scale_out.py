"""Scale-out (DESIGN §8) with real processes: two cloud replicas behind a real nginx on loopback.

The edge streams images with cloud-only cuts through nginx (docker/nginx.conf,
only its listen and replica lines replaced). The replica the edge is routed
to is killed (SIGKILL) mid-stream; the other one has never seen the model.
Every request must be answered, none with a 5xx; the survivor must have been
given the model on its 409 and answer from then on.

Needs the Debian ``nginx`` package (``apt-get install -y nginx-light`` or
``nginx``); without it the test is skipped, saying so.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests

from popex.testbed.services import REPO_ROOT, free_port, start_cloud, start_edge

pytestmark = pytest.mark.slow

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").is_file() else None)
NGINX_CONF = REPO_ROOT / "docker" / "nginx.conf"
HTTP_TIMEOUT_S = 60.0
N_IMAGES = 40
KILL_AFTER = 12


def _loopback_conf(replica_urls: list[str], port: int, prefix: Path) -> str:
    """docker/nginx.conf with loopback replicas and port, and its files under ``prefix``."""
    text = NGINX_CONF.read_text()
    servers = "\n".join(f"        server {url.removeprefix('http://')} max_fails=1 fail_timeout=5s;"
                        for url in replica_urls)
    text, n_replicas = re.subn(r"^ *server cloud:8001 .*# replicas$", servers, text, flags=re.M)
    text, n_listen = re.subn(r"^ *listen 8001; *# listen$", f"        listen 127.0.0.1:{port};", text, flags=re.M)
    assert (n_replicas, n_listen) == (1, 1), "docker/nginx.conf lost its '# replicas' or '# listen' line"
    paths = "\n".join(f"    {name}_temp_path {prefix / name};" for name in ("client_body", "proxy", "fastcgi",
                                                                          "uwsgi", "scgi"))
    text = text.replace("http {\n", f"http {{\n    access_log {prefix / 'access.log'};\n{paths}\n", 1)
    return f"error_log {prefix / 'error.log'} info;\npid {prefix / 'nginx.pid'};\n" + text


def _png(seed: int) -> bytes:
    image = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    return encoded.tobytes()


def _wait_ready(edge_url: str, timeout_s: float = 300.0) -> str:
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        models = requests.get(f"{edge_url}/api/v1/models", timeout=HTTP_TIMEOUT_S).json()["models"]
        if models and models[0]["state"] == "ready":
            return models[0]["model_id"]
        assert not models or models[0]["state"] != "failed", models
        time.sleep(0.5)
    raise AssertionError(f"the default model was not ready after {timeout_s:.0f} s")


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed: apt-get install -y nginx-light "
                                          "(Debian; scripts/bootstrap.sh does it as root)")
def test_a_killed_replica_and_one_that_never_saw_the_model_lose_no_request(tmp_path):
    token = secrets.token_hex(16)
    started = []
    nginx = None
    try:
        replicas = []
        for name in ("a", "b"):
            replica = start_cloud(token=token, state_dir=tmp_path / f"cloud-{name}", log_path=tmp_path / f"{name}.log")
            started.append(replica)
            replicas.append(replica)
        for replica in replicas:
            replica.wait_ready()
        port = free_port()
        prefix = tmp_path / "nginx"
        prefix.mkdir()
        (prefix / "nginx.conf").write_text(_loopback_conf([r.url for r in replicas], port, prefix))
        nginx = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        balancer_url = f"http://127.0.0.1:{port}"
        deadline_s = time.monotonic() + 30
        while True:
            try:
                if requests.get(balancer_url + "/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert nginx.poll() is None and time.monotonic() < deadline_s, (prefix / "error.log").read_text()
            time.sleep(0.2)
        edge = start_edge(token=token, cloud_url=balancer_url, state_dir=tmp_path / "edge",
                          log_path=tmp_path / "edge.log", config={"profile_n_repeats": 5})
        started.append(edge)
        edge.wait_ready(timeout_s=120)
        model_id = _wait_ready(edge.url)
        holders = [r for r, name in zip(replicas, "ab") if (tmp_path / f"cloud-{name}" / "models" / model_id).is_dir()]
        assert len(holders) == 1, "nginx keeps one edge on one replica: exactly one should hold the model"
        routed, other = holders[0], next(r for r in replicas if r is not holders[0])
        other_state = tmp_path / f"cloud-{'ab'[replicas.index(other)]}" / "models" / model_id

        answers = []
        for index in range(N_IMAGES):
            if index == KILL_AFTER:
                os.killpg(routed.process.pid, signal.SIGKILL)  # a crash, not a graceful stop
                routed.process.wait(timeout=10)
            response = requests.post(f"{edge.url}/api/v1/classify", data=_png(index),
                                     params={"policy": "cloud-only", "deadline_ms": "60000"},
                                     headers={"Content-Type": "application/octet-stream"}, timeout=HTTP_TIMEOUT_S)
            assert response.status_code == 200, (index, response.status_code, response.text[:300])
            answers.append(response.json())
        assert len(answers) == N_IMAGES
        assert all(answer["split"] == 0 for answer in answers)  # cloud-only cuts
        fallbacks = [i for i, answer in enumerate(answers) if answer["fallback"]]
        # the only requests that may fall back are the ones caught by the kill
        assert all(KILL_AFTER <= i <= KILL_AFTER + 1 for i in fallbacks), [answers[i] for i in fallbacks]
        assert all(answer["where"] == "cloud" for answer in answers[KILL_AFTER + 2:])
        assert other_state.is_dir(), "the surviving replica was never given the model"
        assert "registered model" in other.log_path.read_text()
    finally:
        if nginx is not None and nginx.poll() is None:
            os.killpg(nginx.pid, signal.SIGTERM)
            nginx.wait(timeout=10)
        for process in reversed(started):
            process.stop()
