"""Timed round trips to the cloud: the raw measurements behind the uplink estimate.

Two ways to measure the RTT. An ICMP echo sees the network alone; but when
the cloud port emulates the link (``client.link`` is set), ICMP would
measure the real, fast network, and ``/healthz`` is control traffic that the
client sends around the emulated link, so only a zero-byte probe waits for
the emulated link like an offload does. ICMP may also be refused (no raw
sockets in a container): the prober then falls back to HTTP for good and
says why in ``rtt_note``.

A zero-byte probe comes before every active probe because its round trip is
RTT plus the HTTP cost of one request: subtracted from the active probe's
round trip, it cancels the HTTP cost (a few ms, which on a fast link dwarfs
the bytes) out of the rate, :func:`uplink_mbps_from_timing`.
"""

from __future__ import annotations

import logging
import math
import sys
from urllib.parse import urlparse

from popex.checks import check_choice, check_finite, check_int
from popex.edge.cloud_port import CloudPort, ProbeResult
from popex.errors import ConfigError

__all__ = ["RTT_METHODS", "UplinkProber", "uplink_mbps_from_timing"]

_log = logging.getLogger(__name__)

#: How the RTT is measured: "auto" (ICMP unless the link is emulated or ICMP
#: is refused, then HTTP), "icmp" or "http".
RTT_METHODS = ("auto", "icmp", "http")
_MAX_PING_TIMEOUT_S = 2.0  # an unanswered ping must not stall the round for long


def _host_of(url: str) -> str:
    host = urlparse(url).hostname
    if not host:
        raise ConfigError(f"cloud URL {url!r} has no host name")
    return host


class UplinkProber:
    """Measure round trips and timed uploads to the cloud, through its port.

    The prober only measures; :class:`~popex.edge.uplink.UplinkMonitor`
    turns the timings into samples. It remembers whether the cloud answered
    last (``warm``), because after a start or a failure the first round trip
    carries connection setup, or a cloud still booting, and must not pass for RTT.

    Parameters
    ----------
    client : CloudPort
        Probed with ``probe``; when ``client.link`` is an emulated uplink,
        "auto" measures the RTT over HTTP, through that link.
    cloud_url : str
        The cloud's base URL; its host is pinged.
    probe_n_bytes : int
        The most bytes one active probe uploads.
    rtt_method : {"auto", "icmp", "http"}
        How the RTT is measured (see :data:`RTT_METHODS`).
    timeout_s : float
        Timeout of one ping or probe, s.

    Raises
    ------
    ConfigError
        On an out-of-range parameter or a URL without a host.
    """

    def __init__(self, client: CloudPort, *, cloud_url: str, probe_n_bytes: int, rtt_method: str,
                 timeout_s: float) -> None:
        check_choice(rtt_method, name="rtt_method", choices=RTT_METHODS)
        self.client = client
        self.host = _host_of(cloud_url)
        self.probe_n_bytes = check_int(probe_n_bytes, name="probe_n_bytes", low=1, high=sys.maxsize)
        self.timeout_s = check_finite(timeout_s, name="timeout_s", low=0.0, low_open=True, allow_text=False)
        self.emulated = getattr(client, "link", None) is not None
        if rtt_method == "auto" and self.emulated:
            self._rtt_method, self.rtt_note = (
                "http", "zero-byte probe round trip: the link is emulated in the client and ICMP would bypass it")
        elif rtt_method == "auto":
            self._rtt_method, self.rtt_note = "icmp", "ICMP echo to the cloud host"
        else:
            self._rtt_method, self.rtt_note = rtt_method, f"configured rtt_method={rtt_method}"
        self._warm = False  # whether the last call reached the cloud

    @property
    def rtt_method(self) -> str:
        """How the RTT is measured now: "icmp" or "http" (ICMP falls back to HTTP when refused)."""
        return self._rtt_method

    def warm_up(self) -> bool:
        """After a start or a failed call, send one unrecorded zero-byte probe.

        Returns
        -------
        bool
            Whether the cloud answers (at once when the last call reached it).
        """
        if not self._warm:
            self._warm = self.zero_probe_ms() is not None
        return self._warm

    def zero_probe_ms(self) -> float | None:
        """The round trip of a zero-byte probe: RTT plus the HTTP cost of one request.

        A probe rather than ``/healthz``: the client sends health checks as
        control traffic, around the emulated link, while probes wait for it
        like offloads do.

        Returns
        -------
        float or None
            ms, or None when the cloud did not answer (a normal state for the monitor).
        """
        try:
            return float(self.client.probe(0, timeout_s=self.timeout_s).round_trip_ms)
        except Exception as err:  # an unreachable cloud is a normal state for the monitor
            _log.debug("zero-byte probe failed: %s", err)
            self._warm = False
            return None

    def upload(self, n_bytes: int | None = None) -> ProbeResult | None:
        """Upload ``n_bytes`` (default ``probe_n_bytes``) to the cloud once, timed (the active probe).

        Parameters
        ----------
        n_bytes : int, optional
            The monitor's size for this probe.

        Returns
        -------
        ProbeResult or None
            The timings, or None when the cloud was unreachable or late (no sample this round).
        """
        try:
            return self.client.probe(self.probe_n_bytes if n_bytes is None else int(n_bytes),
                                     timeout_s=self.timeout_s)
        except Exception as err:  # unreachable or late cloud: no sample this round
            _log.debug("uplink probe failed: %s", err)
            self._warm = False
            return None

    def ping_ms(self) -> float | None:
        """One ICMP echo to the cloud host; a refused or failing ICMP switches to HTTP for good.

        Returns
        -------
        float or None
            RTT in ms, or None when ICMP gave no answer (timed out, refused or failed).
        """
        import ping3  # only the monitor needs it

        try:
            result = ping3.ping(self.host, timeout=min(self.timeout_s, _MAX_PING_TIMEOUT_S), unit="ms")
        except (PermissionError, OSError) as err:
            self._rtt_method = "http"
            self.rtt_note = f"ICMP not permitted here ({err}); using the HTTP round trip of a zero-byte probe"
            _log.info("uplink monitor: %s", self.rtt_note)
            return None
        if result is False:  # ping3: an error such as an unknown host
            self._rtt_method = "http"
            self.rtt_note = "ICMP echo failed; using the HTTP round trip of a zero-byte probe"
            return None
        if result is None:  # timeout: maybe filtered, maybe the host is down
            return None
        return float(result)


def uplink_mbps_from_timing(n_bytes: int, round_trip_ms: float, rtt_ms: float) -> float:
    """Uplink rate from one timed upload: ``8·n_bytes / (1000·(round_trip_ms − rtt_ms))``.

    Parameters
    ----------
    n_bytes : int
        Bytes uploaded.
    round_trip_ms : float
        Time from the first byte sent to the answer, ms.
    rtt_ms : float
        Round-trip time of the link, ms.

    Returns
    -------
    float
        Mbit/s; ``nan`` when ``round_trip_ms <= rtt_ms`` (no information).

    Examples
    --------
    >>> uplink_mbps_from_timing(125_000, 110.0, 10.0)  # 1 Mbit in 100 ms
    10.0
    """
    serialisation_ms = round_trip_ms - rtt_ms
    if not serialisation_ms > 0:
        return math.nan
    return 8.0 * n_bytes / (1000.0 * serialisation_ms)
