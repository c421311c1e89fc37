"""CloudClient against a real cloud process (gunicorn on 127.0.0.1), its failure mapping, and the port it implements.

Bounded in time, never asserting on latency.
"""

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from popex.nets import EarlyExitNet, compute_model_id, weights_to_bytes, zoo_spec
from popex.edge.cloud_port import (
    CloudClient,
    CloudError,
    CloudInference,
    CloudPort,
    CloudRejected,
    CloudTimeout,
    CloudUnavailable,
    ProbeResult,
)
from popex.edge.fake_cloud import FakeCloud
from popex.link.emulation import LinkEmulator
from popex.wire import encode_offload

REPO = Path(__file__).resolve().parents[1]
STARTUP_S = 60.0


def _files(model):
    """The spec form's files of a model fixture, by path."""
    return {"spec.json": model["spec_bytes"], "weights.safetensors": model["weights_bytes"]}


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gunicorn_command(port):
    gunicorn = Path(sys.executable).with_name("gunicorn")
    command = [str(gunicorn) if gunicorn.exists() else "gunicorn"]
    help_text = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=30).stdout
    if "--no-control-socket" in help_text:  # recent gunicorn: one control socket path per user
        command.append("--no-control-socket")
    return command + ["--bind", f"127.0.0.1:{port}", "--worker-class", "gthread", "--workers", "1",
                      "--threads", "4", "cloud_api:create_app()"]


class CloudProcess:
    """A cloud service in a subprocess: ``wait_ready()`` after starting, ``stop()`` at the end (idempotent)."""

    def __init__(self, state_dir, log_path, token, port=None):
        self.port = _free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        # The developer's POPEX_* settings (e.g. POPEX_CLOUD_CONFIG) stay out of the test's cloud.
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("POPEX_")}, "POPEX_TOKEN": token,
               "POPEX_CLOUD_STATE_DIR": str(state_dir), "PYTHONPATH": str(REPO)}
        self.log_path = Path(log_path)
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(_gunicorn_command(self.port), cwd=REPO, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self):
        deadline_s = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline_s and self.process.poll() is None:
            try:
                if requests.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"cloud did not start; its log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, *, crash=False):
        """Shut down (SIGINT: quick, SIGTERM would wait for keep-alive clients) or, with ``crash``, SIGKILL."""
        if self.process.poll() is None:
            if crash:
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._log.close()


@pytest.fixture(scope="module")
def clouds(tmp_path_factory, token):
    """Two cloud processes, started together: one serves the tests, one is there to be killed."""
    directory = tmp_path_factory.mktemp("clouds")
    servers = [CloudProcess(directory / f"state{i}", directory / f"cloud{i}.log", token) for i in range(2)]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def cloud(clouds):
    return clouds[0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    spec = zoo_spec("b-lenet")
    net = EarlyExitNet(spec).eval()
    weights_bytes = weights_to_bytes(net)
    return {"net": net, "spec": spec, "spec_bytes": json.dumps(spec).encode(), "weights_bytes": weights_bytes,
            "model_id": compute_model_id(spec, weights_bytes)}


@pytest.fixture(scope="module")
def registered(cloud, model, token):
    with CloudClient(cloud.url, token=token) as client:
        if not client.has_model(model["model_id"], timeout_s=10):
            client.put_model(model["model_id"], _files(model), timeout_s=30)
    return model


def _payload(model, split=1, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(1, *model["net"].input_shape)
    with torch.inference_mode():
        h = model["net"].run_stages(x, stop=split)
        expected_label = int(model["net"](x)[-1].argmax(dim=1))
    return encode_offload(h, model_id=model["model_id"], split=split, request_id=f"req-{seed}"), expected_label


@pytest.mark.slow
def test_put_has_and_infer(cloud, model, token):
    with CloudClient(cloud.url, token=token) as client:
        assert client.health(timeout_s=5)
        registration = client.put_model(model["model_id"], _files(model), timeout_s=30)
        assert registration.model_id == model["model_id"] and registration.n_stages == 3
        again = client.put_model(model["model_id"], _files(model), timeout_s=30)
        assert not again.created
        assert client.has_model(model["model_id"], timeout_s=5)
        assert not client.has_model("f" * 64, timeout_s=5)
        for split in range(3):
            payload, expected_label = _payload(model, split, seed=split)
            result = client.infer(payload, timeout_s=10)
            assert isinstance(result, CloudInference)
            assert result.label == expected_label and result.n_bytes == len(payload)
            assert result.round_trip_ms >= result.cloud_ms > 0
            assert result.transfer_ms == pytest.approx(result.round_trip_ms - result.cloud_ms)


@pytest.mark.slow
def test_profile_and_probe(cloud, registered, token):
    with CloudClient(cloud.url, token=token) as client:
        stage_ms = client.profile(registered["model_id"], n_repeats=3, timeout_s=30)
        assert len(stage_ms) == 3 and all(ms > 0 for ms in stage_ms)
        probe = client.probe(50_000, timeout_s=10)
        assert isinstance(probe, ProbeResult)
        assert probe.n_bytes == 50_000 and probe.round_trip_ms >= probe.server_ms >= 0


@pytest.mark.slow
def test_rejections_carry_the_cloud_error(cloud, registered, token):
    with CloudClient(cloud.url, token=token) as client:
        with pytest.raises(CloudRejected) as info:
            client.infer(b"not a tensor", timeout_s=10)
        assert (info.value.status, info.value.code) == (400, "bad_tensor")
        with pytest.raises(CloudRejected) as info:
            client.put_model("0" * 64, _files(registered), timeout_s=30)
        assert info.value.code == "model_id_mismatch"
        with pytest.raises(CloudRejected) as info:
            client.profile("f" * 64, n_repeats=3, timeout_s=10)
        assert (info.value.status, info.value.code) == (404, "unknown_model")
    with CloudClient(cloud.url, token="wrong-token-000") as client:
        with pytest.raises(CloudRejected) as info:
            client.infer(_payload(registered)[0], timeout_s=10)
        assert (info.value.status, info.value.code) == (401, "unauthorized")


@pytest.mark.slow
def test_tiny_timeouts_raise_cloud_timeout(cloud, registered, token):
    with CloudClient(cloud.url, token=token) as client:
        with pytest.raises(CloudTimeout):
            client.profile(registered["model_id"], n_repeats=100, timeout_s=0.005)
        with pytest.raises(CloudTimeout):
            client.infer(_payload(registered)[0], timeout_s=1e-6)
        assert client.infer(_payload(registered)[0], timeout_s=10).label >= 0  # the client still works


@pytest.mark.slow
def test_emulated_link_counts_in_transfer_time(cloud, registered, token):
    payload, expected_label = _payload(registered)
    link = LinkEmulator(1.0, 20.0)  # 1 Mbit/s: ~4.9 kB take ~39 ms, plus 20 ms RTT
    emulated_ms = link.delay_ms(len(payload))
    with CloudClient(cloud.url, token=token, link=link) as client:
        result = client.infer(payload, timeout_s=10)
        assert result.label == expected_label
        assert result.transfer_ms >= emulated_ms - 1.0
        assert client.probe(1000, timeout_s=10).round_trip_ms >= link.serialisation_ms(1000) + link.rtt_ms - 1.0


@pytest.mark.slow
def test_emulated_link_beyond_the_budget_times_out_without_sending(cloud, registered, token):
    payload, _ = _payload(registered)
    link = LinkEmulator(0.1, 0.0)  # ~390 ms for the payload
    with CloudClient(cloud.url, token=token, link=link) as client:
        start_s = time.monotonic()
        with pytest.raises(CloudTimeout, match="emulated link"):
            client.infer(payload, timeout_s=0.05)
        assert time.monotonic() - start_s >= 0.04  # it waited out the budget, as a real link would
        assert link.delay_ms(len(payload)) == pytest.approx(link.serialisation_ms(len(payload)))  # nothing queued


@pytest.mark.slow
def test_stopped_cloud_is_unavailable(clouds, model, token):
    server = clouds[1]
    client = CloudClient(server.url, token=token)
    client.put_model(model["model_id"], _files(model), timeout_s=30)
    assert client.infer(_payload(model)[0], timeout_s=10).label >= 0  # a keep-alive connection is open now
    server.stop(crash=True)
    with pytest.raises(CloudUnavailable) as info:
        client.infer(_payload(model)[0], timeout_s=5)
    assert type(info.value) is CloudUnavailable
    with pytest.raises(CloudUnavailable):
        client.has_model(model["model_id"], timeout_s=5)
    assert client.health(timeout_s=2) is False
    client.close()


@pytest.mark.slow
def test_a_restarted_cloud_is_reached_on_a_fresh_connection(tmp_path, model, token):
    """The keep-alive socket of the data plane goes stale when the cloud restarts; one retry reconnects."""
    first = CloudProcess(tmp_path / "state", tmp_path / "first.log", token).wait_ready()
    client = CloudClient(first.url, token=token)
    try:
        client.put_model(model["model_id"], _files(model), timeout_s=30)
        payload, expected_label = _payload(model)
        assert client.infer(payload, timeout_s=10).label == expected_label
        first.stop()
        second = CloudProcess(tmp_path / "state", tmp_path / "second.log", token, port=first.port).wait_ready()
        try:
            assert client.infer(payload, timeout_s=10).label == expected_label  # models are on disk
            assert client.probe(1000, timeout_s=10).n_bytes == 1000
        finally:
            second.stop()
    finally:
        first.stop()
        client.close()


def test_a_cloud_that_never_answers_times_out_within_the_budget(token):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)  # accepts connections (the kernel does), never answers
        client = CloudClient(f"http://127.0.0.1:{server.getsockname()[1]}", token=token)
        start_s = time.monotonic()
        with pytest.raises(CloudTimeout):
            client.infer(b"payload", timeout_s=0.2)
        assert 0.15 <= time.monotonic() - start_s < 5
        client.close()


@pytest.mark.slow
def test_data_plane_sockets_do_not_wait_for_delayed_acks(cloud, registered, token):
    """Without TCP_NODELAY a body written after its headers waits for the server's delayed ACK (up to 40 ms):
    the uplink estimate on an 8 Mbit/s tbf link fell from 7.5 to 6.7 Mbit/s and R rose by 10 ms."""
    with CloudClient(cloud.url, token=token) as client:
        client.probe(10_000, timeout_s=10)
        connection = client._connections._local.connection  # this thread's keep-alive connection
        assert connection.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.slow
def test_threads_share_a_client(cloud, registered, token):
    payload, expected_label = _payload(registered)
    with CloudClient(cloud.url, token=token) as client:
        with ThreadPoolExecutor(4) as pool:
            labels = list(pool.map(lambda _: client.infer(payload, timeout_s=10).label, range(40)))
    assert labels == [expected_label] * 40


# -- retry policy, with a scripted session (no server) ---------------------------------


class ScriptedSession(requests.Session):
    """Answers each request with the next scripted exception or (status, json body)."""

    def __init__(self, script, token):
        super().__init__()
        self.token = token
        self.script = list(script)
        self.n_calls = 0

    def request(self, method, url, **kwargs):
        self.n_calls += 1
        assert kwargs["timeout"] > 0 and kwargs["headers"]["Authorization"] == f"Bearer {self.token}"
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        status, body = step
        response = requests.Response()
        response.status_code = status
        response._content = json.dumps(body).encode()
        return response


OK_INFER = (200, {"label": 3, "class_name": "c3", "confidence": 0.9, "cloud_ms": 1.5, "request_id": "r",
                  "model_id": "m"})


def test_one_retry_of_a_connection_error(token):
    session = ScriptedSession([requests.ConnectionError("reset"), OK_INFER], token)
    client = CloudClient("http://cloud.invalid", token=token, session=session)
    assert client.infer(b"payload", timeout_s=5).label == 3
    assert session.n_calls == 2
    session = ScriptedSession([requests.ConnectionError("refused")] * 3, token)
    client = CloudClient("http://cloud.invalid", token=token, session=session)
    with pytest.raises(CloudUnavailable) as info:
        client.infer(b"payload", timeout_s=5)
    assert session.n_calls == 2  # at most one retry
    assert type(info.value) is CloudUnavailable and isinstance(info.value.__cause__, requests.ConnectionError)


@pytest.mark.parametrize("step, error", [
    ((400, {"error": {"code": "bad_tensor", "message": "no"}}), CloudRejected),
    ((500, {"error": {"code": "internal_error", "message": "bug"}}), CloudUnavailable),
    ((200, {"unexpected": True}), CloudUnavailable),
    (requests.ReadTimeout("slow"), CloudTimeout),
    (requests.ConnectTimeout("slow"), CloudTimeout),
])
def test_no_retry_of_anything_else(step, error, token):
    session = ScriptedSession([step, OK_INFER], token)
    client = CloudClient("http://cloud.invalid", token=token, session=session)
    with pytest.raises(error) as info:
        client.infer(b"payload", timeout_s=5)
    assert isinstance(info.value, CloudError) and session.n_calls == 1
    if error is CloudRejected:
        assert (info.value.status, info.value.code, info.value.message) == (400, "bad_tensor", "no")


# -- the port ----------------------------------------------------------------------------


PORT_MEMBERS = ("infer", "probe", "has_model", "put_model", "profile", "health", "close")


def test_the_client_and_the_fake_are_cloud_ports_with_the_same_signatures(token):
    client = CloudClient("http://cloud.invalid", token=token)
    for port in (client, FakeCloud()):
        assert isinstance(port, CloudPort) and port.link is None
        for name in PORT_MEMBERS:
            assert inspect.signature(getattr(port, name)) == inspect.signature(getattr(CloudPort, name)).replace(
                parameters=list(inspect.signature(getattr(CloudPort, name)).parameters.values())[1:]), name
    client.close()


def test_an_object_missing_a_port_call_is_no_cloud_port():
    class ProbesOnly:
        link = None

        def probe(self, n_bytes, *, timeout_s):
            raise CloudTimeout("no")

    assert not isinstance(ProbesOnly(), CloudPort)
