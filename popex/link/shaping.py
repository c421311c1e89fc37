"""Kernel traffic shaping with tc: the commands, checked, and running them safely.

Everything that turns a link profile into ``tc`` calls goes through
:func:`tc_commands`, which validates every value and formats the numbers
itself, so a command is always a list of fixed words and canonical numbers
(``93600kbit``, ``10000us``), never a shell string built from input. The
edge's run-time profile change and the network-namespace harness call
:func:`apply_shaping`; ``docker/apply_link.sh`` builds the same commands in
bash (a test checks that both agree).

What is shaped: the **egress** of one interface (tc shapes only what leaves
an interface). On the edge's egress the rate limits the uplink, and the
whole RTT is added as delay there: each request crosses the edge's egress
once, its answer comes back unshaped, so a round trip sees the delay once.

Layouts
-------
``netem=True`` (kernels with sch_netem, e.g. Docker hosts)
    ``root netem delay <RTT> rate <RATE> limit <N>``.
``netem=False`` (kernels without it, like this project's CI machine)
    ``root tbf rate <RATE> burst <B> latency <L>``; the RTT is *not* applied
    in the kernel and must come from elsewhere (the edge's ``--emulate-link``).
``dst_ip`` given
    Only traffic to that IPv4 address is shaped, so that the edge's answers
    to its own clients stay fast: ``root htb`` (unclassified traffic bypasses
    it), one class at the rate, a u32 filter for the destination, and with
    netem a ``netem delay`` leaf under the class.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass

from popex.errors import ConfigError, PopexError
from popex.link.profiles import MAX_RTT_MS, MAX_UPLINK_MBPS, MIN_UPLINK_MBPS

__all__ = [
    "IFACE_PATTERN",
    "ShapingError",
    "Shaping",
    "tc_commands",
    "tbf_burst_bytes",
    "apply_shaping",
    "clear_shaping",
    "netem_available",
]

_log = logging.getLogger(__name__)

#: Linux interface names: at most 15 characters (IFNAMSIZ - 1); we allow only these.
IFACE_PATTERN = re.compile(r"^[a-zA-Z0-9_.-]{1,15}$")
_NETNS_PATTERN = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")
_MIN_BURST_BYTES = 1600  # one full Ethernet frame (1514 bytes) must fit, or tbf never sends it
_MIN_TBF_LATENCY_MS = 100
_TBF_QUEUE_BYTES = 65536  # the queue holds at least one 64 KiB TCP burst, also on slow links
_MIN_NETEM_LIMIT_PACKETS = 1000  # netem's default
_DELAY_ONLY_NETEM_LIMIT_PACKETS = 10_000
_PACKET_BYTES = 1500
_DEFAULT_TIMEOUT_S = 10.0
# Messages of `tc qdisc del ... root` when there is nothing to delete.
_NOTHING_TO_DELETE = ("handle of zero", "no such file or directory", "invalid handle")


def _check_iface(iface: object) -> str:
    if not isinstance(iface, str) or not IFACE_PATTERN.fullmatch(iface):
        raise ConfigError(f"interface name must match {IFACE_PATTERN.pattern}, got {iface!r}")
    return iface


def _check_netns(netns: object) -> str | None:
    if netns is not None and (not isinstance(netns, str) or not _NETNS_PATTERN.fullmatch(netns)):
        raise ConfigError(f"network namespace name must match {_NETNS_PATTERN.pattern}, got {netns!r}")
    return netns


def _check_float(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _check_dst_ip(dst_ip: object) -> str | None:
    if dst_ip is None:
        return None
    try:
        return str(ipaddress.IPv4Address(dst_ip))
    except (ipaddress.AddressValueError, ValueError, TypeError) as err:
        raise ConfigError(f"dst_ip must be an IPv4 address (the cloud's), got {dst_ip!r}") from err


def _kbit(uplink_mbps: float) -> int:
    return max(1, round(uplink_mbps * 1000))


def _netem_limit_packets(rate_kbit: int | None, delay_us: int) -> int:
    # netem holds every packet for the delay: the queue must fit twice the
    # bandwidth-delay product, or it drops and the rate falls below the profile
    # (Paris: 60 Mbit/s x 216 ms is ~1080 full packets, beyond the default 1000).
    if rate_kbit is None:
        return _DELAY_ONLY_NETEM_LIMIT_PACKETS
    bdp2_packets = -(-2 * rate_kbit * delay_us // 12_000_000)  # ceil(2 * kbit*1000/8 * us/1e6 / 1500)
    return max(_MIN_NETEM_LIMIT_PACKETS, bdp2_packets)


def _burst_bytes(rate_kbit: int) -> int:
    return max(_MIN_BURST_BYTES, -(-rate_kbit * 125 * 4 // 1000))  # ceil(bytes/s * 4 ms)


def _tbf_args(rate_kbit: int) -> list[str]:
    burst_bytes = _burst_bytes(rate_kbit)
    # Queue at least 100 ms, and at least 64 KiB on slow links, so that TCP's
    # bursts queue instead of being dropped.
    latency_ms = max(_MIN_TBF_LATENCY_MS, -(-8 * _TBF_QUEUE_BYTES // rate_kbit))
    return ["tbf", "rate", f"{rate_kbit}kbit", "burst", str(burst_bytes), "latency", f"{latency_ms}ms"]


def _in_netns(argv: list[str], netns: str | None) -> list[str]:
    return argv if netns is None else ["ip", "netns", "exec", netns, *argv]


def _run(argv: list[str], *, timeout_s: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=timeout_s)
    except FileNotFoundError as err:
        raise ShapingError(f"{argv[0]!r} not found: install iproute2 (it provides ip and tc)") from err
    except subprocess.TimeoutExpired as err:
        raise ShapingError(f"`{shlex.join(argv)}` did not finish within {timeout_s:g} s") from err
    except subprocess.CalledProcessError as err:
        detail = (err.stderr or err.stdout or "").strip()
        hint = " (shaping needs root or CAP_NET_ADMIN)" if "peration not permitted" in detail else ""
        raise ShapingError(f"`{shlex.join(argv)}` failed with exit status {err.returncode}: {detail}{hint}") from err


def _probe_netem(run_in: list[str], iface: str) -> bool:
    result = subprocess.run([*run_in, "tc", "qdisc", "add", "dev", iface, "root", "netem", "delay", "1ms"],
                            capture_output=True, text=True, timeout=_DEFAULT_TIMEOUT_S)
    if result.returncode != 0:
        _log.info("netem is not available: %s", result.stderr.strip())
    return result.returncode == 0


class ShapingError(PopexError):
    """A tc command failed (no permission, no such interface, qdisc missing in the kernel)."""

    code = "shaping_failed"


@dataclass(frozen=True)
class Shaping:
    """What :func:`apply_shaping` installed.

    Attributes
    ----------
    iface : str
        Interface whose egress is shaped.
    uplink_mbps : float or None
        Rate limit in Mbit/s; None: no rate limit (delay only).
    rtt_ms : float
        The RTT asked for, ms.
    rtt_in_kernel : bool
        Whether the RTT is applied by netem. False when netem is missing and
        ``rtt_ms > 0``: the caller must add the RTT itself (e.g. the edge's
        link emulation) or the link is faster than the profile.
    dst_ip : str or None
        Only traffic to this address is shaped; None: all egress.
    netns : str or None
        Network namespace the commands ran in; None: the current one.
    commands : tuple of tuple of str
        The argv of every tc call, in order.
    """

    iface: str
    uplink_mbps: float | None
    rtt_ms: float
    rtt_in_kernel: bool
    dst_ip: str | None
    netns: str | None
    commands: tuple[tuple[str, ...], ...]


def tbf_burst_bytes(uplink_mbps: float) -> int:
    """Bucket size for tbf at ``uplink_mbps``: max(1600, bytes the rate delivers in 4 ms).

    Why: the bucket must hold one full frame (else tbf never sends it), and
    what the rate delivers per 4 ms timer tick (else a HZ=250 kernel cannot
    reach the rate). Anything larger lets that many bytes through at line
    speed, which biases a short probe upwards, so no more.

    Parameters
    ----------
    uplink_mbps : float
        Rate in Mbit/s.

    Returns
    -------
    int
        Bytes.

    Examples
    --------
    >>> tbf_burst_bytes(8.0), tbf_burst_bytes(1.1), tbf_burst_bytes(93.6)
    (4000, 1600, 46800)
    """
    return _burst_bytes(_kbit(_check_float("uplink_mbps", uplink_mbps, MIN_UPLINK_MBPS, MAX_UPLINK_MBPS)))


def tc_commands(iface: str, *, uplink_mbps: float | None, rtt_ms: float, netem: bool,
                dst_ip: str | None = None) -> list[list[str]]:
    """The tc calls that shape the egress of ``iface`` (from a clean root qdisc).

    Parameters
    ----------
    iface : str
        Interface name, matching ``^[a-zA-Z0-9_.-]{1,15}$``.
    uplink_mbps : float or None
        Rate in Mbit/s in [0.01, 100000], rounded to 1 kbit/s. None: no rate
        limit (only with ``netem=True`` and no ``dst_ip``: a pure delay).
    rtt_ms : float
        RTT in ms in [0, 60000], rounded to 1 us; applied as netem delay on
        this egress. Ignored when ``netem`` is False (see :class:`Shaping`).
    netem : bool
        Whether the kernel has netem (see :func:`netem_available`).
    dst_ip : str, optional
        Shape only traffic to this IPv4 address.

    Returns
    -------
    list of list of str
        argv lists; the first one replaces the root qdisc.

    Raises
    ------
    ConfigError
        On a bad interface name, a number out of range or not finite, a bad
        address, or no rate where one is needed.

    Examples
    --------
    >>> tc_commands("eth0", uplink_mbps=5.85, rtt_ms=50, netem=True)
    [['tc', 'qdisc', 'replace', 'dev', 'eth0', 'root', 'netem', 'delay', '50000us', 'rate', '5850kbit', 'limit', '1000']]
    >>> tc_commands("veth0", uplink_mbps=8, rtt_ms=0, netem=False)
    [['tc', 'qdisc', 'replace', 'dev', 'veth0', 'root', 'tbf', 'rate', '8000kbit', 'burst', '4000', 'latency', '100ms']]
    """
    iface = _check_iface(iface)
    if not isinstance(netem, bool):
        raise ConfigError(f"netem must be True or False, got {netem!r}")
    delay_us = round(_check_float("rtt_ms", rtt_ms, 0.0, MAX_RTT_MS) * 1000)
    dst_ip = _check_dst_ip(dst_ip)
    if uplink_mbps is None:
        if not netem or dst_ip is not None:
            raise ConfigError("uplink_mbps is required unless netem adds a pure delay to all egress")
        rate_kbit = None
    else:
        rate_kbit = _kbit(_check_float("uplink_mbps", uplink_mbps, MIN_UPLINK_MBPS, MAX_UPLINK_MBPS))
    limit = str(_netem_limit_packets(rate_kbit, delay_us))
    dev = ["dev", iface]
    if dst_ip is None:
        if not netem:
            return [["tc", "qdisc", "replace", *dev, "root", *_tbf_args(rate_kbit)]]
        rate = [] if rate_kbit is None else ["rate", f"{rate_kbit}kbit"]
        return [["tc", "qdisc", "replace", *dev, "root", "netem", "delay", f"{delay_us}us", *rate, "limit", limit]]
    commands = [
        ["tc", "qdisc", "replace", *dev, "root", "handle", "1:", "htb"],
        ["tc", "class", "add", *dev, "parent", "1:", "classid", "1:10", "htb",
         "rate", f"{rate_kbit}kbit", "ceil", f"{rate_kbit}kbit"],
    ]
    if netem:
        commands.append(["tc", "qdisc", "add", *dev, "parent", "1:10", "handle", "10:", "netem",
                         "delay", f"{delay_us}us", "limit", limit])
    commands.append(["tc", "filter", "add", *dev, "parent", "1:", "protocol", "ip", "prio", "1", "u32",
                     "match", "ip", "dst", f"{dst_ip}/32", "flowid", "1:10"])
    return commands


def clear_shaping(iface: str, *, netns: str | None = None, timeout_s: float = _DEFAULT_TIMEOUT_S) -> bool:
    """Remove the root qdisc of ``iface`` (back to the kernel's default).

    Parameters
    ----------
    iface : str
        Interface name.
    netns : str, optional
        Run inside this network namespace.
    timeout_s : float
        Limit for the tc call.

    Returns
    -------
    bool
        True if a qdisc was removed, False if there was none.

    Raises
    ------
    ConfigError
        On a bad interface or namespace name.
    ShapingError
        If tc fails for another reason (no permission, no such interface).
    """
    argv = _in_netns(["tc", "qdisc", "del", "dev", _check_iface(iface), "root"], _check_netns(netns))
    try:
        _run(argv, timeout_s=timeout_s)
    except ShapingError as err:
        if any(text in str(err).lower() for text in _NOTHING_TO_DELETE):
            return False
        raise
    return True


def apply_shaping(iface: str, *, uplink_mbps: float | None, rtt_ms: float, netem: bool | None = None,
                  dst_ip: str | None = None, netns: str | None = None,
                  timeout_s: float = _DEFAULT_TIMEOUT_S) -> Shaping:
    """Shape the egress of ``iface`` (replacing any earlier shaping); see :func:`tc_commands`.

    Parameters
    ----------
    iface : str
        Interface name.
    uplink_mbps : float or None
        Rate in Mbit/s; None only for a pure netem delay.
    rtt_ms : float
        RTT in ms, added as netem delay when netem is used.
    netem : bool, optional
        Use netem; default: whether the kernel has it (:func:`netem_available`).
    dst_ip : str, optional
        Shape only traffic to this IPv4 address.
    netns : str, optional
        Run the tc calls inside this network namespace (``ip netns exec``).
    timeout_s : float
        Limit for each tc call.

    Returns
    -------
    Shaping
        What was installed; ``rtt_in_kernel`` says whether the RTT was.

    Raises
    ------
    ConfigError
        On invalid arguments (nothing is run).
    ShapingError
        If a tc call fails; the root qdisc is then removed again (best effort).
    """
    if netem is None:
        netem = netem_available()
    commands = tc_commands(iface, uplink_mbps=uplink_mbps, rtt_ms=rtt_ms, netem=netem, dst_ip=dst_ip)
    netns = _check_netns(netns)
    if len(commands) > 1:  # children are added, not replaced: start from a clean root
        clear_shaping(iface, netns=netns, timeout_s=timeout_s)
    try:
        for argv in commands:
            _run(_in_netns(argv, netns), timeout_s=timeout_s)
    except ShapingError:
        if len(commands) > 1:
            try:
                clear_shaping(iface, netns=netns, timeout_s=timeout_s)
            except ShapingError:
                _log.warning("could not remove partial shaping of %s", iface)
        raise
    return Shaping(iface=iface, uplink_mbps=None if uplink_mbps is None else float(uplink_mbps),
                   rtt_ms=float(rtt_ms), rtt_in_kernel=netem or rtt_ms == 0, dst_ip=_check_dst_ip(dst_ip),
                   netns=netns, commands=tuple(tuple(argv) for argv in commands))


@functools.lru_cache(maxsize=1)
def netem_available() -> bool:
    """Whether this kernel has the netem qdisc (probed once, then cached).

    The probe adds a netem qdisc to a throwaway interface: the loopback of
    a temporary network namespace, or where namespaces cannot be created
    (a container without CAP_SYS_ADMIN) a temporary veth pair in the
    current one. Without root or CAP_NET_ADMIN, or without ip/tc, the answer
    is False.

    Returns
    -------
    bool
    """
    if os.path.isdir("/sys/module/sch_netem"):
        return True
    if shutil.which("tc") is None or shutil.which("ip") is None:
        return False
    tag = f"{os.getpid() % 100000}"
    netns = f"popex-netem-probe-{tag}"
    try:
        created = subprocess.run(["ip", "netns", "add", netns], capture_output=True, timeout=_DEFAULT_TIMEOUT_S)
        if created.returncode == 0:
            try:
                return _probe_netem(["ip", "netns", "exec", netns], "lo")
            finally:
                subprocess.run(["ip", "netns", "del", netns], capture_output=True, timeout=_DEFAULT_TIMEOUT_S)
        veth = f"pxnp{tag}"
        if subprocess.run(["ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}b"],
                          capture_output=True, timeout=_DEFAULT_TIMEOUT_S).returncode != 0:
            _log.info("netem probe impossible here (no permission to create a namespace or a veth pair)")
            return False
        try:
            return _probe_netem([], veth)
        finally:
            subprocess.run(["ip", "link", "del", veth], capture_output=True, timeout=_DEFAULT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        _log.info("netem probe failed: %s", err)
        return False
