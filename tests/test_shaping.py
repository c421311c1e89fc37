"""popex.link.shaping: validated tc argv lists, and applying them inside a throwaway namespace."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess

import pytest
from hypothesis import given, strategies as st

from popex.errors import ConfigError
from popex.link.shaping import ShapingError, apply_shaping, clear_shaping, netem_available, \
    tbf_burst_bytes, tc_commands

SAFE_WORD = re.compile(r"^[A-Za-z0-9:./_-]+$")


def test_netem_with_rate_and_full_rtt():
    assert tc_commands("eth0", uplink_mbps=60.0, rtt_ms=216, netem=True) == [
        ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "216000us", "rate", "60000kbit",
         "limit", "2160"]]  # twice the bandwidth-delay product in 1500-byte packets


def test_netem_delay_only():
    assert tc_commands("veth1", uplink_mbps=None, rtt_ms=0.5, netem=True) == [
        ["tc", "qdisc", "replace", "dev", "veth1", "root", "netem", "delay", "500us", "limit", "10000"]]


def test_tbf_without_netem_ignores_the_rtt():
    assert tc_commands("eth0", uplink_mbps=1.1, rtt_ms=100, netem=False) == [
        ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", "1100kbit", "burst", "1600",
         "latency", "477ms"]]  # the queue holds 64 KiB even at 1.1 Mbit/s


def test_destination_filter_uses_htb_and_u32():
    commands = tc_commands("eth0", uplink_mbps=5.85, rtt_ms=50, netem=True, dst_ip="172.18.0.2")
    assert [argv[:3] for argv in commands] == [["tc", "qdisc", "replace"], ["tc", "class", "add"],
                                               ["tc", "qdisc", "add"], ["tc", "filter", "add"]]
    assert commands[1][-4:] == ["rate", "5850kbit", "ceil", "5850kbit"]
    assert commands[2][-4:] == ["delay", "50000us", "limit", "1000"]
    assert "172.18.0.2/32" in commands[3]
    without_netem = tc_commands("eth0", uplink_mbps=5.85, rtt_ms=50, netem=False, dst_ip="172.18.0.2")
    assert "netem" not in [word for argv in without_netem for word in argv]


def test_burst_is_one_frame_or_4_ms_of_the_rate():
    assert tbf_burst_bytes(0.01) == 1600
    assert tbf_burst_bytes(8) == 4000  # 1 MB/s x 4 ms
    assert tbf_burst_bytes(100_000) == 50_000_000


@pytest.mark.parametrize("iface", ["", "eth0;reboot", "a b", "$(id)", "x" * 16, "eth0\n", None, 3, "é"])
def test_bad_interface_names(iface):
    with pytest.raises(ConfigError, match="interface"):
        tc_commands(iface, uplink_mbps=1, rtt_ms=1, netem=True)


@pytest.mark.parametrize("kwargs, message", [
    ({"uplink_mbps": 0}, "uplink_mbps"),
    ({"uplink_mbps": math.nan}, "uplink_mbps"),
    ({"uplink_mbps": "8"}, "uplink_mbps"),
    ({"uplink_mbps": True}, "uplink_mbps"),
    ({"uplink_mbps": 200_000}, "uplink_mbps"),
    ({"rtt_ms": -1}, "rtt_ms"),
    ({"rtt_ms": math.inf}, "rtt_ms"),
    ({"rtt_ms": "1;id"}, "rtt_ms"),
    ({"netem": "yes"}, "netem"),
    ({"dst_ip": "1.2.3.4;id"}, "dst_ip"),
    ({"dst_ip": "::1"}, "IPv4"),
    ({"dst_ip": "010.0.0.1"}, "dst_ip"),
    ({"uplink_mbps": None, "netem": False}, "uplink_mbps is required"),
    ({"uplink_mbps": None, "dst_ip": "10.0.0.1"}, "uplink_mbps is required"),
])
def test_bad_values_are_refused(kwargs, message):
    arguments = {"uplink_mbps": 8.0, "rtt_ms": 20.0, "netem": True, **kwargs}
    with pytest.raises(ConfigError, match=message):
        tc_commands("eth0", **arguments)


@given(uplink_mbps=st.floats(0.01, 100_000), rtt_ms=st.floats(0, 60_000), netem=st.booleans(),
       dst=st.sampled_from([None, "10.0.0.2"]))
def test_every_word_is_a_plain_token(uplink_mbps, rtt_ms, netem, dst):
    for argv in tc_commands("eth0", uplink_mbps=uplink_mbps, rtt_ms=rtt_ms, netem=netem, dst_ip=dst):
        assert all(isinstance(word, str) and SAFE_WORD.match(word) for word in argv), argv


def test_netem_available_is_a_cached_bool():
    first = netem_available()
    assert isinstance(first, bool)
    assert netem_available() is first


@pytest.fixture()
def netns():
    """A throwaway network namespace (root only); its lo is the interface to shape."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a network namespace")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        pytest.skip("ip/tc not found: install iproute2")
    name = f"pxshape-{os.getpid()}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _qdiscs(netns: str) -> str:
    return subprocess.run(["ip", "netns", "exec", netns, "tc", "qdisc", "show", "dev", "lo"],
                          capture_output=True, text=True, check=True).stdout


def test_apply_and_clear_tbf(netns):
    shaping = apply_shaping("lo", uplink_mbps=8, rtt_ms=20, netem=False, netns=netns)
    assert not shaping.rtt_in_kernel and shaping.netns == netns
    assert "tbf" in _qdiscs(netns) and "8Mbit" in _qdiscs(netns)
    again = apply_shaping("lo", uplink_mbps=2, rtt_ms=0, netem=False, netns=netns)  # replaces
    assert again.rtt_in_kernel and "2Mbit" in _qdiscs(netns)
    assert clear_shaping("lo", netns=netns) is True
    assert "tbf" not in _qdiscs(netns)
    assert clear_shaping("lo", netns=netns) is False


def test_apply_with_destination_filter(netns):
    apply_shaping("lo", uplink_mbps=8, rtt_ms=0, netem=False, dst_ip="10.9.9.9", netns=netns)
    assert "htb" in _qdiscs(netns)
    filters = subprocess.run(["ip", "netns", "exec", netns, "tc", "filter", "show", "dev", "lo"],
                             capture_output=True, text=True, check=True).stdout
    assert "u32" in filters
    apply_shaping("lo", uplink_mbps=4, rtt_ms=0, netem=False, dst_ip="10.9.9.8", netns=netns)  # re-applies
    assert clear_shaping("lo", netns=netns) is True


def test_netem_on_a_kernel_without_it_fails_clearly(netns):
    if netem_available():
        shaping = apply_shaping("lo", uplink_mbps=8, rtt_ms=20, netem=True, netns=netns)
        assert shaping.rtt_in_kernel and "netem" in _qdiscs(netns)
        return
    with pytest.raises(ShapingError, match="netem"):
        apply_shaping("lo", uplink_mbps=8, rtt_ms=20, netem=True, netns=netns)


def test_missing_interface_fails_clearly(netns):
    with pytest.raises(ShapingError, match="nosuchdev"):
        apply_shaping("nosuchdev", uplink_mbps=8, rtt_ms=0, netem=False, netns=netns)
    with pytest.raises(ShapingError):
        clear_shaping("nosuchdev", netns=netns)
