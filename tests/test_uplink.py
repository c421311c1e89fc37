"""The uplink monitor: RTT, active probes, passive samples, sliding median, hysteresis, history."""

import csv
import math
import threading
import time

import pytest

from popex.edge.uplink import UplinkMonitor, uplink_mbps_from_timing
from popex.edge.uplink_history import UplinkHistory
from popex.decision.latency import Link
from popex.errors import ConfigError
from popex.edge.fake_cloud import FakeCloud
from popex.link.emulation import LinkEmulator

HTTP_OVERHEAD_MS = 0.5


class FakeClock:
    """A clock that only moves when something sleeps on it."""

    def __init__(self):
        self.now_s = 0.0

    def time(self):
        return self.now_s

    def sleep(self, seconds):
        self.now_s += max(0.0, seconds)


def _link_cloud(uplink_mbps=8.0, rtt_ms=20.0, *, emulated=False):
    """A FakeCloud whose probes cross a link of ``uplink_mbps`` / ``rtt_ms`` (emulated on a FakeClock, or computed)."""
    if not emulated:
        return FakeCloud(uplink=Link(uplink_mbps=uplink_mbps, rtt_ms=rtt_ms), probe_overhead_ms=HTTP_OVERHEAD_MS)
    clock = FakeClock()
    cloud = FakeCloud(link=LinkEmulator(uplink_mbps, rtt_ms, clock_s=clock.time, sleep_s=clock.sleep),
                      probe_overhead_ms=HTTP_OVERHEAD_MS)
    cloud.clock = clock
    return cloud


def _monitor(client, tmp_path=None, **options):
    """A monitor given every required option (the monitor has no defaults of its own)."""
    options = {"cloud_url": "http://127.0.0.1:8001", "initial_link": Link(uplink_mbps=100.0, rtt_ms=1.0),
               "rtt_method": "http", "probe_n_bytes": 100_000, "probe_interval_s": 5.0, "window_n": 9,
               "hysteresis_fraction": 0.2, "timeout_s": 30.0,
               "history_path": None if tmp_path is None else tmp_path / "uplink.csv", **options}
    return UplinkMonitor(client, **options)


def _reads_within(monitor, timeout_s=10.0):
    """Whether another thread reads the monitor's estimate and status within ``timeout_s`` (a bounded wait)."""
    done = threading.Event()

    def read():
        monitor.estimate()
        monitor.status()
        done.set()

    threading.Thread(target=read, daemon=True).start()
    return done.wait(timeout_s)


def test_rate_formula():
    assert uplink_mbps_from_timing(125_000, 110.0, 10.0) == pytest.approx(10.0)
    assert math.isnan(uplink_mbps_from_timing(1000, 10.0, 10.0))


def test_probe_and_rtt_give_the_link_rate(tmp_path):
    client = _link_cloud(uplink_mbps=8.0, rtt_ms=20.0)
    monitor = _monitor(client, tmp_path)
    estimate = monitor.measure_once()
    assert estimate.rtt_ms == pytest.approx(20.0 + HTTP_OVERHEAD_MS)
    # The probe's HTTP cost cancels against the HTTP-measured RTT.
    assert estimate.uplink_mbps == pytest.approx(8.0)
    assert estimate.source == "probe" and estimate.rtt_source == "http"
    assert estimate.n_samples == 1 and estimate.n_rtt_samples == 1


def test_probes_through_an_emulated_link_see_the_emulated_rate(tmp_path):
    client = _link_cloud(uplink_mbps=5.85, rtt_ms=50.0, emulated=True)
    monitor = _monitor(client, tmp_path, rtt_method="auto")
    assert monitor.rtt_source == "http" and "emulated" in monitor.rtt_note
    for _ in range(3):
        client.clock.sleep(10.0)  # let the emulated queue drain between rounds
        monitor.measure_once()
    assert monitor.estimate().uplink_mbps == pytest.approx(5.85)
    assert monitor.estimate().rtt_ms == pytest.approx(50.0 + HTTP_OVERHEAD_MS)


def test_the_estimate_is_the_median_of_the_window(tmp_path):
    monitor = _monitor(_link_cloud(), tmp_path, window_n=3, hysteresis_fraction=9.0)
    rtt_ms = monitor.estimate().rtt_ms
    for uplink_mbps in (10.0, 50.0, 20.0, 30.0):
        n_bytes = 100_000
        monitor.add_passive_sample(n_bytes, rtt_ms + 8.0 * n_bytes / (1000.0 * uplink_mbps))
    assert monitor.estimate().uplink_mbps == pytest.approx(30.0)  # median of 50, 20, 30
    assert monitor.estimate().source == "passive" and monitor.estimate().n_samples == 3


def test_passive_samples_below_timer_noise_are_ignored():
    monitor = _monitor(_link_cloud())
    rtt_ms = monitor.estimate().rtt_ms
    assert monitor.add_passive_sample(1000, rtt_ms + 0.2) is None
    assert monitor.add_passive_sample(1000, float("nan")) is None
    assert monitor.estimate().n_samples == 0 and monitor.estimate().source == "configured"


def test_a_change_beyond_the_band_replans_once(tmp_path):
    links = []
    monitor = _monitor(_link_cloud(uplink_mbps=8.0, rtt_ms=20.0), tmp_path, window_n=1,
                       hysteresis_fraction=0.2, on_change=links.append)
    monitor.measure_once()  # the RTT sample re-plans (1 -> 20.5 ms), then the probe (100 -> 8 Mbit/s)
    assert [link.uplink_mbps for link in links] == [100.0, pytest.approx(8.0)]
    assert monitor.planned_link == links[-1]
    rtt_ms = monitor.estimate().rtt_ms
    monitor.add_passive_sample(100_000, rtt_ms + 8.0 * 100_000 / (1000.0 * 9.0))  # +12 %: inside the band
    assert len(links) == 2
    # -50 %: the probe (8) and this offload (4), of one size, are weighed alike: outside the band
    monitor.add_passive_sample(100_000, rtt_ms + 8.0 * 100_000 / (1000.0 * 4.0))
    assert len(links) == 3 and 4.0 < links[-1].uplink_mbps < 8.0 * (1 - 0.2)
    assert monitor.n_replans == 3


def test_a_failing_replan_keeps_the_monitor_alive():
    def explode(link):
        raise RuntimeError("planner broke")

    monitor = _monitor(_link_cloud(), on_change=explode)
    monitor.measure_once()
    assert monitor.n_replans == 2 and monitor.estimate().n_samples == 1


def test_history_is_appended_to_csv_and_kept_in_memory(tmp_path):
    monitor = _monitor(_link_cloud(), tmp_path)
    monitor.measure_once()
    monitor.measure_once()
    with open(tmp_path / "uplink.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["time_s", "source", "uplink_mbps", "rtt_ms"]
    assert [row[1] for row in rows[1:]] == ["http", "probe", "http", "probe"]
    assert rows[1][2] == "" and float(rows[2][2]) == pytest.approx(8.0, rel=1e-3)
    status = monitor.status()
    assert [sample["source"] for sample in status["history"]] == ["http", "probe", "http", "probe"]
    assert {"uplink_mbps", "rtt_ms", "source", "n_samples", "history"} <= set(status)


def test_an_unreachable_cloud_adds_no_samples_and_warms_up_again():
    client = _link_cloud()
    monitor = _monitor(client)
    client.down = True
    estimate = monitor.measure_once()
    assert estimate.n_samples == 0 and estimate.n_rtt_samples == 0
    assert estimate.uplink_mbps == 100.0  # still the initial link
    client.down = False
    n_before = client.calls.count("probe")
    monitor.measure_once()
    # one unrecorded warm-up, then the RTT probe and the rate probe
    assert client.calls.count("probe") - n_before == 3 and monitor.estimate().n_rtt_samples == 1


def test_icmp_that_is_not_permitted_falls_back_to_http(monkeypatch):
    import ping3

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(ping3, "ping", refuse)
    monitor = _monitor(_link_cloud(), rtt_method="auto")
    assert monitor.rtt_source == "icmp"
    assert monitor.measure_rtt() == pytest.approx(20.0 + HTTP_OVERHEAD_MS)
    assert monitor.rtt_source == "http" and "not permitted" in monitor.rtt_note


def test_icmp_rtt_is_used_when_it_answers(monkeypatch):
    import ping3

    monkeypatch.setattr(ping3, "ping", lambda host, timeout, unit: 7.5)
    monitor = _monitor(_link_cloud(uplink_mbps=8.0, rtt_ms=20.0), rtt_method="icmp")
    assert monitor.measure_rtt() == 7.5
    estimate = monitor.measure_once()
    assert estimate.rtt_source == "icmp" and estimate.rtt_ms == 7.5
    # The rate compares the probe with a zero-byte probe, not with the ICMP RTT,
    # so the HTTP cost of a request does not pass for transfer time.
    assert estimate.uplink_mbps == pytest.approx(8.0)


def test_the_thread_starts_only_when_asked_and_stops():
    client = _link_cloud()
    n_threads = threading.active_count()
    monitor = _monitor(client, probe_interval_s=0.01)
    assert not monitor.running and threading.active_count() == n_threads
    monitor.start()
    try:
        deadline_s = time.monotonic() + 10.0
        while monitor.estimate().n_samples < 2 and time.monotonic() < deadline_s:
            time.sleep(0.01)
        assert monitor.estimate().n_samples >= 2
    finally:
        monitor.stop()
    assert not monitor.running


def test_the_history_is_written_with_the_lock_free(tmp_path, monkeypatch):
    writing, release = threading.Event(), threading.Event()
    write = UplinkHistory.write

    def blocked_write(self, samples):
        writing.set()
        assert release.wait(10.0), "the test never released the writer"
        write(self, samples)

    monkeypatch.setattr(UplinkHistory, "write", blocked_write)
    monitor = _monitor(_link_cloud(), tmp_path)
    adder = threading.Thread(target=monitor.measure_rtt, daemon=True)
    adder.start()
    try:
        assert writing.wait(10.0)
        # The writer is blocked mid-write: the estimate is readable, and already holds the sample.
        assert _reads_within(monitor)
        assert monitor.estimate().n_rtt_samples == 1
        # A sample added meanwhile is left to the writing thread: adding it does not wait for the disk.
        passive = threading.Thread(target=monitor.add_passive_sample, args=(100_000, 200.0), daemon=True)
        passive.start()
        passive.join(10.0)
        assert not passive.is_alive() and monitor.estimate().n_samples == 1
    finally:
        release.set()
        adder.join(10.0)
    with open(tmp_path / "uplink.csv", newline="") as handle:
        assert [row[1] for row in csv.reader(handle)] == ["source", "http", "passive"]  # in order, once each


def test_on_change_is_called_with_the_lock_free():
    read_in_callback = []

    def on_change(link):
        read_in_callback.append(_reads_within(monitor))

    monitor = _monitor(_link_cloud(), on_change=on_change)
    monitor.measure_once()
    assert read_in_callback == [True, True]


def test_the_monitor_has_no_defaults_of_its_own():
    # What EdgeConfig supplies must be given: a second default would drift from the config's.
    with pytest.raises(TypeError, match="timeout_s"):
        UplinkMonitor(_link_cloud(), cloud_url="http://127.0.0.1:8001",
                      initial_link=Link(uplink_mbps=1.0, rtt_ms=1.0), probe_interval_s=5.0, probe_n_bytes=1000, window_n=9, hysteresis_fraction=0.2,
                      history_path=None, rtt_method="http")


@pytest.mark.parametrize("options", [
    {"rtt_method": "smoke"},
    {"probe_interval_s": 0},
    {"probe_n_bytes": 1.5},
    {"window_n": 0},
    {"hysteresis_fraction": -0.1},
    {"cloud_url": "not a url"},
    {"timeout_s": 0},
    {"initial_link": (10.0, 20.0)},
])
def test_bad_options_are_refused(options):
    with pytest.raises(ConfigError):
        _monitor(_link_cloud(), **options)
