"""The emulated uplink: exact delays on a fake clock, loose wall-clock checks on the real one."""

import threading
import time

import pytest

from popex.errors import ConfigError
from popex.link.emulation import LinkEmulator, parse_link


class FakeClock:
    """A clock that only moves when someone sleeps on it."""

    def __init__(self):
        self.now_s = 100.0
        self.slept_s = []

    def clock(self):
        return self.now_s

    def sleep(self, seconds):
        self.slept_s.append(seconds)


def _fake_link(uplink_mbps, rtt_ms):
    clock = FakeClock()
    return LinkEmulator(uplink_mbps, rtt_ms, clock_s=clock.clock, sleep_s=clock.sleep), clock


def test_single_transmission_is_serialisation_plus_rtt():
    link, clock = _fake_link(8.0, 50.0)  # 8 Mbit/s: 1000 bytes take 1 ms
    assert link.delay_ms(1000) == pytest.approx(51.0)
    assert link.transmit(1000) == pytest.approx(51.0)
    assert clock.slept_s == [pytest.approx(0.051)]
    assert link.transmit(0) == pytest.approx(50.0 + 1.0)  # queued behind the first kilobyte, clock did not move


def test_senders_queue_behind_each_other():
    link, clock = _fake_link(8.0, 10.0)
    delays_ms = [link.transmit(4000) for _ in range(3)]  # 4 ms each, all "at the same instant"
    assert delays_ms == [pytest.approx(14.0), pytest.approx(18.0), pytest.approx(22.0)]
    clock.now_s += 0.006  # 6 ms later two transmissions (8 ms) are still queued: 6 ms left
    assert link.delay_ms(4000) == pytest.approx(6.0 + 4.0 + 10.0)
    clock.now_s += 1.0  # the link drained
    assert link.transmit(4000) == pytest.approx(14.0)


def test_real_clock_blocks_at_least_the_delay():
    link = LinkEmulator(1.0, 5.0)  # 1 Mbit/s: 1250 bytes take 10 ms
    start_s = time.monotonic()
    delay_ms = link.transmit(1250)
    elapsed_ms = (time.monotonic() - start_s) * 1000
    assert delay_ms == pytest.approx(15.0, abs=0.5)
    assert elapsed_ms >= delay_ms - 1.0


def test_concurrent_senders_share_the_link():
    link = LinkEmulator(1.0, 0.0)  # 10 ms per 1250 bytes
    n_threads = 4
    delays_ms = []
    lock = threading.Lock()
    barrier = threading.Barrier(n_threads)

    def send():
        barrier.wait()
        delay_ms = link.transmit(1250)
        with lock:
            delays_ms.append(delay_ms)

    start_s = time.monotonic()
    threads = [threading.Thread(target=send) for _ in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    elapsed_ms = (time.monotonic() - start_s) * 1000
    assert len(delays_ms) == n_threads
    # the last sender waited for everybody: about n_threads serialisation times
    assert max(delays_ms) >= n_threads * 10.0 - 5.0
    assert elapsed_ms >= max(delays_ms) - 1.0


@pytest.mark.parametrize("text, uplink_mbps, rtt_ms", [("5.85,50", 5.85, 50.0), (" 100 , 0 ", 100.0, 0.0)])
def test_parse_link(text, uplink_mbps, rtt_ms):
    link = parse_link(text)
    assert (link.uplink_mbps, link.rtt_ms) == (uplink_mbps, rtt_ms)


@pytest.mark.parametrize("text", ["", "5.85", "5.85,50,1", "fast,50", "0,50", "-1,50", "5,-3", "nan,1", "inf,1",
                                  "5,1e9"])
def test_parse_link_rejects_bad_input(text):
    with pytest.raises(ConfigError, match="RATE_MBPS,RTT_MS|uplink_mbps|rtt_ms"):
        parse_link(text)


def test_bad_arguments():
    with pytest.raises(ConfigError):
        LinkEmulator(True, 1.0)
    link = LinkEmulator(1.0, 1.0)
    for n_bytes in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="n_bytes"):
            link.transmit(n_bytes)
