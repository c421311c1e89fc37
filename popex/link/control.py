"""Change the edge -> cloud link of a running edge: tc on an interface, or the client's emulated link.

This is what the edge's ``PUT /api/v1/admin/link`` calls. Two ways to put a
link in force, picked once from the edge's configuration:

- **tc** (``shaping_interface`` set; Docker, or a host with CAP_NET_ADMIN):
  :func:`popex.link.shaping.apply_shaping` on that interface's egress
  (argv lists, never a shell string), only towards the cloud's IPv4 address
  when it is known. Where the kernel has no netem the RTT cannot be added by
  tc; then the client's link emulator adds it (its rate set so high that it
  adds nothing else), and without an emulator the request is refused before
  anything changes.
- **emulation** (no interface, the edge started with ``emulate_link``): the
  emulator's rate and RTT are replaced (:meth:`LinkEmulator.set_link`).

The plans are not touched: the uplink monitor notices the new link, as it
would notice a real change. Values are checked here (finite, within the
bounds of :mod:`popex.link.profiles`), before anything is applied.
"""

from __future__ import annotations

import ipaddress
import math
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlparse

from popex.errors import ConfigError, PopexError
from popex.link.profiles import MAX_RTT_MS, MAX_UPLINK_MBPS, MIN_UPLINK_MBPS, LinkProfile
from popex.link.emulation import EMULATED_RATE_MBPS
from popex.link.shaping import Shaping, ShapingError, apply_shaping, netem_available

__all__ = ["LinkNotAdjustable", "LinkSetting", "LinkController", "check_link_numbers", "resolve_cloud_ipv4"]



def _number(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ConfigError(f"{name} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


class LinkNotAdjustable(PopexError):
    """The link cannot be changed here: nothing to shape or emulate, no netem for the RTT, or tc failed."""

    code = "link_not_adjustable"
    http_status = 409


@dataclass(frozen=True)
class LinkSetting:
    """The link in force, as far as this edge set it.

    Attributes
    ----------
    mode : {"tc", "emulation", "none"}
        How links are applied on this edge.
    uplink_mbps, rtt_ms : float or None
        The link last put in force (Mbit/s, ms); None in tc mode before the
        first change (the shaping then is whatever the deployment set up).
    profile : str or None
        The profile of ``configs/links.yaml`` it came from, if any.
    interface : str or None
        The shaped interface (tc mode).
    dst_ip : str or None
        Only traffic to this address is shaped (tc mode); None: all egress.
    rtt_by : {"netem", "emulation"} or None
        Who adds the RTT.
    changed_at_s : float or None
        Unix time of the last change through :class:`LinkController`.
    """

    mode: str
    uplink_mbps: float | None
    rtt_ms: float | None
    profile: str | None = None
    interface: str | None = None
    dst_ip: str | None = None
    rtt_by: str | None = None
    changed_at_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def check_link_numbers(uplink_mbps: object, rtt_ms: object) -> tuple[float, float]:
    """Check a rate and an RTT strictly: numbers (not bools), finite, within the profile bounds.

    Parameters
    ----------
    uplink_mbps : object
        Mbit/s in [0.01, 100000].
    rtt_ms : object
        ms in [0, 60000].

    Returns
    -------
    tuple of float
        ``(uplink_mbps, rtt_ms)``.

    Raises
    ------
    ConfigError
        Naming the bad value.

    Examples
    --------
    >>> check_link_numbers(5.85, 50)
    (5.85, 50.0)
    """
    return (_number("uplink_mbps", uplink_mbps, MIN_UPLINK_MBPS, MAX_UPLINK_MBPS),
            _number("rtt_ms", rtt_ms, 0.0, MAX_RTT_MS))


def resolve_cloud_ipv4(cloud_url: str) -> str | None:
    """The cloud's IPv4 address from its URL (a literal, or the first IPv4 the name resolves to).

    Returns None when there is none (IPv6 literal, unresolvable name): the
    caller then shapes all egress.

    Examples
    --------
    >>> resolve_cloud_ipv4("http://10.231.0.2:8001")
    '10.231.0.2'
    """
    host = urlparse(cloud_url).hostname
    if not host:
        return None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None


class LinkController:
    """Applies link changes for one edge; thread-safe (one change at a time).

    Parameters
    ----------
    profiles : mapping of str to LinkProfile
        The named links :meth:`set_profile` knows (``configs/links.yaml``,
        read once by whoever builds the controller).
    interface : str or None
        Interface to shape with tc; None: use the emulator.
    emulator : LinkEmulator or None
        The cloud client's emulated link (``client.link``).
    dst_ip : str or None
        Shape only traffic to this IPv4 address (tc mode).
    apply : callable, optional
        Replaces :func:`apply_shaping` (tests on machines without tc).
    has_netem : callable, optional
        Replaces :func:`netem_available`.
    """

    def __init__(self, *, profiles: Mapping[str, LinkProfile], interface: str | None, emulator: Any | None,
                 dst_ip: str | None = None, apply: Callable[..., Shaping] = apply_shaping,
                 has_netem: Callable[[], bool] = netem_available) -> None:
        self.profiles = dict(profiles)
        self.interface = interface
        self.emulator = emulator
        self.dst_ip = dst_ip
        self._apply = apply
        self._has_netem = has_netem
        self._lock = threading.Lock()
        mode = "tc" if interface is not None else "emulation" if emulator is not None else "none"
        if mode == "emulation":
            self._setting = LinkSetting(mode=mode, uplink_mbps=float(emulator.uplink_mbps),
                                        rtt_ms=float(emulator.rtt_ms), rtt_by="emulation")
        else:
            self._setting = LinkSetting(mode=mode, uplink_mbps=None, rtt_ms=None, interface=interface,
                                        dst_ip=dst_ip if mode == "tc" else None)

    def current(self) -> LinkSetting:
        """The link in force."""
        with self._lock:
            return self._setting

    def set_profile(self, name: object) -> LinkSetting:
        """Put one of the known profiles in force (see :meth:`set_link`).

        Raises
        ------
        ConfigError
            On an unknown profile (the message lists the known ones).
        LinkNotAdjustable
        """
        profiles = self.profiles
        if not isinstance(name, str) or name not in profiles:
            raise ConfigError(f"unknown link profile {name!r}; known: {', '.join(profiles)}")
        profile = profiles[name]
        return self.set_link(profile.uplink_mbps, profile.rtt_ms, profile=name)

    def set_link(self, uplink_mbps: object, rtt_ms: object, *, profile: str | None = None) -> LinkSetting:
        """Put a link in force and return it.

        Parameters
        ----------
        uplink_mbps : float
            Edge -> cloud rate, Mbit/s, [0.01, 100000].
        rtt_ms : float
            Round-trip time, ms, [0, 60000].
        profile : str, optional
            The profile name, for the record.

        Returns
        -------
        LinkSetting

        Raises
        ------
        ConfigError
            On a bad number (nothing is applied).
        LinkNotAdjustable
            Nothing to shape or emulate; no netem and no emulator for the
            RTT; or tc failed (the previous setting stays recorded).
        """
        uplink_mbps, rtt_ms = check_link_numbers(uplink_mbps, rtt_ms)
        with self._lock:
            mode = self._setting.mode
            if mode == "none":
                raise LinkNotAdjustable("this edge neither shapes an interface (shaping_interface) nor emulates "
                                        "its link (emulate_link): there is no link to change")
            if mode == "emulation":
                self.emulator.set_link(uplink_mbps, rtt_ms)
                rtt_by = "emulation"
            else:
                rtt_by = self._shape(uplink_mbps, rtt_ms)
            self._setting = LinkSetting(mode=mode, uplink_mbps=uplink_mbps, rtt_ms=rtt_ms, profile=profile,
                                        interface=self.interface, dst_ip=self.dst_ip if mode == "tc" else None,
                                        rtt_by=rtt_by, changed_at_s=time.time())
            return self._setting

    def _shape(self, uplink_mbps: float, rtt_ms: float) -> str:
        netem = bool(self._has_netem())
        if rtt_ms > 0 and not netem and self.emulator is None:
            raise LinkNotAdjustable("this kernel has no netem and the edge emulates no link, so the RTT cannot "
                                    "be added; start the edge with emulate_link (the RTT part is used)")
        try:
            shaping = self._apply(self.interface, uplink_mbps=uplink_mbps, rtt_ms=rtt_ms, netem=netem,
                                  dst_ip=self.dst_ip)
        except ShapingError as err:
            raise LinkNotAdjustable(f"cannot shape {self.interface}: {err}") from err
        if self.emulator is not None:
            # The emulator only adds what tc could not: the RTT without netem, else nothing.
            self.emulator.set_link(EMULATED_RATE_MBPS, 0.0 if shaping.rtt_in_kernel else rtt_ms)
        return "netem" if shaping.rtt_in_kernel else "emulation"
