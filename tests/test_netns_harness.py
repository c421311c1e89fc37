"""The network-namespace harness: a tbf-shaped veth link, and the real services across it.

These tests need root (namespaces, veth, tc); without it they skip with the
harness's message. Each is bounded in time, kills what it started and
removes its namespace. Throughput is checked as a rate (within 15 %), never
as a latency.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from popex.errors import ConfigError
from popex.testbed.netns import EMULATED_RATE_MBPS, HarnessUnavailable, cleanup_stale_namespaces, shaped_link, \
    wait_until_listening
from popex.testbed.services import service_environ

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
RATE_TOLERANCE_FRACTION = 0.15
SINK_PORT = 9000
CLOUD_PORT = 8001
TOKEN = "netns-harness-test-token"
PROBE_N_BYTES = 524_288
N_PROBES = 9  # the monitor's default window: the estimate is their median

# A 20-line upload sink: reads the body, answers with the number of bytes read.
SINK_SOURCE = r"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        left = n_bytes = int(self.headers.get("Content-Length", "0"))
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                break
            left -= len(chunk)
        body = str(n_bytes - left).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Sink).serve_forever()
"""


class _Skipping:
    """``with _Skipping(uplink_mbps=..., rtt_ms=...) as link``: a shaped link, or a skip with the reason."""

    def __init__(self, **kwargs):
        self._context = shaped_link(**kwargs)

    def __enter__(self):
        try:
            return self._context.__enter__()
        except HarnessUnavailable as err:
            pytest.skip(f"network-namespace harness unavailable: {err}")

    def __exit__(self, *exc_info):
        return self._context.__exit__(*exc_info)


def _upload_mbps(host: str, port: int, n_bytes: int, *, timeout_s: float) -> float:
    body = bytes(n_bytes)
    started_s = time.perf_counter()
    connection = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        connection.request("POST", "/", body=body)
        response = connection.getresponse()
        received = int(response.read())
    finally:
        connection.close()
    elapsed_s = time.perf_counter() - started_s
    assert received == n_bytes
    return 8.0 * n_bytes / (elapsed_s * 1e6)


def _namespace_exists(name: str) -> bool:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False)
    return any(line.split()[0] == name for line in result.stdout.splitlines() if line.strip())


def test_without_root_the_harness_says_why(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(HarnessUnavailable, match="needs root"):
        with shaped_link(uplink_mbps=4.0, rtt_ms=0):
            pass


def test_values_are_checked_before_anything_is_created():
    with pytest.raises(ConfigError, match="uplink_mbps"):
        with shaped_link(uplink_mbps=0, rtt_ms=0):
            pass
    with pytest.raises(ConfigError, match="name_prefix"):
        with shaped_link(uplink_mbps=1, rtt_ms=0, name_prefix="Bad;prefix"):
            pass


def test_tbf_shapes_uploads_to_the_rate():
    """~1 MB uploads through a 4 Mbit/s tbf arrive at 4 Mbit/s (within 15 %)."""
    uplink_mbps = 4.0
    with _Skipping(uplink_mbps=uplink_mbps, rtt_ms=0) as link:
        sink = link.run_in_cloud_ns([sys.executable, "-c", SINK_SOURCE, link.cloud_ip, str(SINK_PORT)])
        assert wait_until_listening(link.cloud_ip, SINK_PORT, timeout_s=10, process=sink), "the sink did not start"
        rates_mbps = []
        while len(rates_mbps) < 5 and not any(abs(rate - uplink_mbps) <= RATE_TOLERANCE_FRACTION * uplink_mbps
                                              for rate in rates_mbps):
            rates_mbps.append(_upload_mbps(link.cloud_ip, SINK_PORT, 1_000_000, timeout_s=10))
        netns = link.netns
    print(f"tbf {uplink_mbps} Mbit/s: uploads at {', '.join(f'{rate:.3f}' for rate in rates_mbps)} Mbit/s")
    # The link's capacity is what the best upload reaches: on a loaded machine one
    # upload can lose a tail segment to the queue and sit out a 200 ms TCP timeout.
    assert max(rates_mbps) == pytest.approx(uplink_mbps, rel=RATE_TOLERANCE_FRACTION)
    assert not _namespace_exists(netns)
    assert sink.poll() is not None


def test_link_is_removed_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with _Skipping(uplink_mbps=2.0, rtt_ms=30) as link:
            sleeper = link.run_in_cloud_ns([sys.executable, "-c", "import time; time.sleep(60)"])
            netns, edge_iface = link.netns, link.edge_iface
            assert _namespace_exists(netns)
            raise RuntimeError("boom")
    assert not _namespace_exists(netns)
    assert not Path("/sys/class/net", edge_iface).exists()
    assert sleeper.poll() is not None


def test_rtt_goes_to_netem_or_to_the_edge_emulation():
    with _Skipping(uplink_mbps=8.0, rtt_ms=40) as link:
        if link.rtt_via_emulation:
            assert link.edge_emulate_link_arg == f"{EMULATED_RATE_MBPS},40"
            assert len(link.shaping) == 1
        else:
            assert link.edge_emulate_link_arg is None
            assert link.shaping[1].rtt_in_kernel
        assert link.shaping[0].commands[0][-6:] == ("rate", "8000kbit", "burst", "4000", "latency", "100ms")
    with _Skipping(uplink_mbps=8.0, rtt_ms=0) as link:
        assert not link.rtt_via_emulation and link.edge_emulate_link_arg is None


def test_stale_namespaces_of_dead_runs_are_removed():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and ip (iproute2) to create namespaces")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale, live = f"pxtest-{dead.pid}-1", f"pxtest-{os.getpid()}-2"
    for name in (stale, live):
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        assert cleanup_stale_namespaces("pxtest") == [stale]
        assert not _namespace_exists(stale) and _namespace_exists(live)
    finally:
        for name in (stale, live):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _get_json(url: str, *, timeout_s: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.load(response)


def _free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def test_edge_status_reports_the_shaped_uplink(tmp_path):
    """Acceptance (issue 4): real cloud behind a tbf link, real edge; /api/v1/status within 15 % of the rate."""
    run_cloud, run_edge = REPO_ROOT / "run_cloud.sh", REPO_ROOT / "run_edge.sh"
    for script in (run_cloud, run_edge):
        if not os.access(script, os.X_OK):
            pytest.skip(f"{script.name} does not exist yet (or is not executable)")
    uplink_mbps, rtt_ms = 8.0, 20.0
    # Only the settings this test needs: probe often; 512 KiB probes (0.5 s
    # at 8 Mbit/s), because the RTT subtracted from each probe is an HTTP round
    # trip whose jitter on a busy 2-core machine is several ms (the default
    # 64 KiB probes scatter by +-15 % here, 256 KiB ones still by up to -30 %
    # under load); no default model (its upload would share the uplink).
    config_path = tmp_path / "edge.yaml"
    config_path.write_text(f"probe_interval_s: 0.5\nprobe_n_bytes: {PROBE_N_BYTES}\n"
                           f"default_model_dir: {tmp_path / 'no-model'}\n")
    # Only what this test sets: a developer's POPEX_* settings must not reach the services.
    env = service_environ({"POPEX_TOKEN": TOKEN, "POPEX_ADMIN_TOKEN": secrets.token_hex(16),
                           "POPEX_EDGE_CONFIG": str(config_path),
                           "POPEX_CLOUD_CONFIG": str(REPO_ROOT / "configs" / "cloud.yaml")})
    deadline_s = time.monotonic() + 80
    with _Skipping(uplink_mbps=uplink_mbps, rtt_ms=rtt_ms) as link, \
            open(tmp_path / "cloud.log", "wb") as cloud_log, open(tmp_path / "edge.log", "wb") as edge_log:
        cloud = link.run_in_cloud_ns([str(run_cloud), "--host", link.cloud_ip, "--port", str(CLOUD_PORT),
                                      "--state-dir", str(tmp_path / "cloud")],
                                     env=env, stdout=cloud_log, stderr=subprocess.STDOUT)
        assert wait_until_listening(link.cloud_ip, CLOUD_PORT, timeout_s=30, process=cloud), \
            (tmp_path / "cloud.log").read_text()[-2000:]
        edge_port = _free_local_port()
        edge_argv = [str(run_edge), "--host", "127.0.0.1", "--port", str(edge_port),
                     "--cloud-url", f"http://{link.cloud_ip}:{CLOUD_PORT}", "--state-dir", str(tmp_path / "edge")]
        if link.rtt_via_emulation:
            edge_argv += ["--emulate-link", link.edge_emulate_link_arg]
        edge = subprocess.Popen(edge_argv, env=env, stdout=edge_log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            assert wait_until_listening("127.0.0.1", edge_port, timeout_s=30, process=edge), \
                (tmp_path / "edge.log").read_text()[-2000:]
            uplink, estimates_mbps = {}, []
            # Once a full window of probes is in, the estimate must come within the
            # tolerance; it gets until the deadline to do so, because a burst of load
            # from elsewhere on this shared 2-core VM slows some probes (one CI run saw
            # probes of 2-6.8 Mbit/s and an RTT of 31 ms instead of 23 for a while).
            # A monitor that is wrong stays outside the band the whole time.
            while time.monotonic() < deadline_s:
                try:  # the worker may still be importing torch: gunicorn listens before the app is built
                    uplink = _get_json(f"http://127.0.0.1:{edge_port}/api/v1/status", timeout_s=10)["uplink"]
                except OSError:
                    if edge.poll() is not None:
                        pytest.fail("the edge exited: " + (tmp_path / "edge.log").read_text()[-2000:])
                    continue
                if uplink.get("source") == "probe" and uplink.get("n_samples", 0) >= N_PROBES:
                    estimates_mbps.append(round(uplink["uplink_mbps"], 2))
                    if abs(uplink["uplink_mbps"] - uplink_mbps) <= RATE_TOLERANCE_FRACTION * uplink_mbps:
                        break
                time.sleep(1.0)
            else:
                if not estimates_mbps:
                    pytest.fail(f"no uplink estimate from {N_PROBES} probes within the time limit: {uplink}")
        finally:
            _stop(edge)  # the cloud is stopped by the harness
    rates_mbps = [sample["uplink_mbps"] for sample in uplink.get("history", []) if sample.get("source") == "probe"]
    print(f"tbf {uplink_mbps} Mbit/s, RTT {rtt_ms} ms ({'edge emulation' if link.rtt_via_emulation else 'netem'}): "
          f"/api/v1/status uplink_mbps={uplink['uplink_mbps']:.3f}, rtt_ms={uplink['rtt_ms']:.1f}, "
          f"probes {[round(rate, 2) for rate in rates_mbps]}, estimates after a full window {estimates_mbps}")
    assert uplink["uplink_mbps"] == pytest.approx(uplink_mbps, rel=RATE_TOLERANCE_FRACTION)
