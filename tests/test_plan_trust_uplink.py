"""A plan small payloads cannot mislead (issue 15, item 8): the uplink estimate's rate fit and probe sizes.

Reproduces the audit's findings on the monitor itself: offloads of 5-33 KB
with a fixed cost dragged a 100 Mbit/s estimate to ~9 Mbit/s; 16 KB probes on
a 73 Mbit/s / 180 ms link gave 0.9 to 608 Mbit/s.
"""

import random

import pytest

from popex.decision.latency import Link
from popex.edge.cloud_types import ProbeResult
from popex.edge.uplink import UplinkMonitor
from popex.edge.uplink_fit import Transfer, fit_rate, jitter_ms
from popex.edge.uplink_window import UplinkSample, UplinkWindow

HTTP_MS = 0.5


class ShapedCloud:
    """A cloud port whose probes cross a link of ``uplink_mbps`` / ``rtt_ms`` with a token bucket
    of ``burst_n_bytes`` let through at line speed (as tc tbf does) and Gaussian jitter."""

    link = None

    def __init__(self, uplink_mbps, rtt_ms, *, burst_n_bytes=0, jitter_sd_ms=0.0, seed=0):
        self.uplink_mbps, self.rtt_ms, self.burst_n_bytes = uplink_mbps, rtt_ms, burst_n_bytes
        self.jitter_sd_ms = jitter_sd_ms
        self.random = random.Random(seed)
        self.probe_sizes = []

    def link_ms(self, n_bytes):
        shaped_n_bytes = max(0, n_bytes - self.burst_n_bytes)
        noise_ms = abs(self.random.gauss(0.0, self.jitter_sd_ms)) if self.jitter_sd_ms else 0.0
        return self.rtt_ms + HTTP_MS + 8.0 * shaped_n_bytes / (1000.0 * self.uplink_mbps) + noise_ms

    def probe(self, n_bytes, *, timeout_s):
        self.probe_sizes.append(n_bytes)
        return ProbeResult(n_bytes=n_bytes, round_trip_ms=self.link_ms(n_bytes), server_ms=0.1)


def _monitor(client, **options):
    options = {"cloud_url": "http://127.0.0.1:8001", "initial_link": Link(uplink_mbps=10.0, rtt_ms=5.0),
               "rtt_method": "http", "probe_n_bytes": 4 * 2**20, "probe_interval_s": 1.0, "window_n": 9,
               "hysteresis_fraction": 0.2, "timeout_s": 30.0, "history_path": None, **options}
    return UplinkMonitor(client, **options)


def test_small_offloads_with_a_fixed_cost_do_not_drag_the_rate_down():
    cloud = ShapedCloud(100.0, 1.0)
    monitor = _monitor(cloud)
    for _ in range(4):
        monitor.measure_once()
    assert monitor.estimate().uplink_mbps == pytest.approx(100.0, rel=0.05)
    fixed_ms = 1.5  # the offload route's cost beyond a zero-byte probe
    rng = random.Random(1)
    for _ in range(60):
        n_bytes = rng.randint(5_000, 33_000)
        monitor.add_passive_sample(n_bytes, cloud.link_ms(n_bytes) + fixed_ms)
    estimate = monitor.estimate()
    # Taken whole, a 16 KB sample reads 8·16000/(1000·(1.28 + 1.5)) = 46 Mbit/s.
    assert estimate.uplink_mbps == pytest.approx(100.0, rel=0.2)
    assert estimate.fixed_ms["passive"] == pytest.approx(fixed_ms, abs=0.3)


def test_offloads_alone_at_several_cuts_give_the_rate_and_their_fixed_cost():
    fit = fit_rate([Transfer("passive", n_bytes, 2.0 + 8.0 * n_bytes / (1000.0 * 50.0))
                    for n_bytes in (2_300, 5_000, 12_800, 2_300, 12_800)], jitter_ms=0.1)
    assert fit.uplink_mbps == pytest.approx(50.0)
    assert fit.fixed_ms["passive"] == pytest.approx(2.0)


def test_a_token_bucket_is_cancelled_by_probes_of_two_sizes():
    # 1 Mbit/s with tbf's smallest bucket (1600 B = 12.8 ms at line speed): one probe size reads it too fast
    cloud = ShapedCloud(1.0, 20.0, burst_n_bytes=1600)
    monitor = _monitor(cloud, initial_link=Link(uplink_mbps=1.0, rtt_ms=20.0))
    for _ in range(6):
        monitor.measure_once()
    sizes = [n for n in cloud.probe_sizes if n]
    assert min(sizes) < 0.6 * max(sizes)  # every other probe is half the size
    assert monitor.estimate().uplink_mbps == pytest.approx(1.0, rel=0.02)
    single = sizes[-1]
    biased_mbps = 8.0 * single / (1000.0 * (cloud.link_ms(single) - cloud.link_ms(0)))
    assert biased_mbps > 1.1  # what a single size would have said


def test_probes_are_sized_from_the_rtt_and_the_estimate():
    # the audit's 73 Mbit/s / 180 ms link: half the RTT of bytes, not 16 KB (1.8 ms, within the jitter)
    cloud = ShapedCloud(73.0, 180.0, jitter_sd_ms=1.0, seed=3)
    monitor = _monitor(cloud, initial_link=Link(uplink_mbps=73.0, rtt_ms=180.0), probe_interval_s=2.0)
    rates = [monitor.measure_once().uplink_mbps for _ in range(9)]
    assert min(n for n in cloud.probe_sizes if n) >= 73.0 * 125.0 * 40.0  # >= 40 ms of bytes (half the RTT, or half that)
    assert all(rate == pytest.approx(73.0, rel=0.2) for rate in rates[2:])
    # a slow link keeps its time for the offloads: at most a tenth of it between two rounds
    slow = ShapedCloud(1.0, 180.0)
    slow_monitor = _monitor(slow, initial_link=Link(uplink_mbps=1.0, rtt_ms=180.0), probe_interval_s=1.0)
    for _ in range(3):
        slow_monitor.measure_once()
    assert max(slow.probe_sizes) <= 1.0 * 125.0 * 100.0


def test_the_configured_size_caps_the_probe():
    cloud = ShapedCloud(100.0, 50.0)
    monitor = _monitor(cloud, probe_n_bytes=20_000)
    monitor.measure_once()
    assert cloud.probe_sizes == [0, 0, 20_000]  # warm-up, base, the probe


def test_offloads_within_the_rtt_jitter_carry_no_rate():
    window = UplinkWindow(initial_link=Link(uplink_mbps=100.0, rtt_ms=10.0), window_n=9, hysteresis_fraction=0.2)
    for base_ms in (10.0, 11.0, 9.0, 10.5, 9.5, 10.0):
        window.add_base_ms(base_ms)
    jitter = window.jitter_ms()
    assert jitter == pytest.approx(jitter_ms([10.0, 11.0, 9.0, 10.5, 9.5, 10.0])) and jitter > 1.0
    within = UplinkSample(0.0, "passive", None, 10.0, n_bytes=8_000, excess_ms=1.5 * jitter)
    beyond = UplinkSample(0.0, "passive", None, 10.0, n_bytes=800_000, excess_ms=64.0)
    assert window.serialisation_ms(within) is None
    assert window.add(within) is None and window.estimate(rtt_method="http").source == "configured"
    assert window.serialisation_ms(beyond) == pytest.approx(64.0 - window.estimate(rtt_method="http")
                                                            .fixed_ms["passive"])


def test_one_stalled_transfer_does_not_move_the_rate():
    transfers = [Transfer("probe", n, 8.0 * n / (1000.0 * 20.0)) for n in (50_000, 100_000) * 4]
    transfers.append(Transfer("probe", 100_000, 400.0))  # a GC pause
    assert fit_rate(transfers, jitter_ms=0.2).uplink_mbps == pytest.approx(20.0, rel=0.01)


def test_the_status_shows_the_jitter_and_the_fixed_costs():
    monitor = _monitor(ShapedCloud(20.0, 10.0))
    monitor.measure_once()
    status = monitor.status()
    assert status["jitter_ms"] > 0 and set(status["fixed_ms"]) == {"probe", "passive"}
