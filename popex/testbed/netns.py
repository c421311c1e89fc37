"""A kernel-shaped edge -> cloud link on one machine: the cloud in its own network namespace.

::

    root namespace (the edge)                       namespace <prefix>-<pid>-<i> (the cloud)
    veth <prefix><i>e  10.231.a.b+1/30  <------>  veth <prefix><i>c  10.231.a.b+2/30, lo
      egress: tbf rate = uplink_mbps                 egress: netem delay = rtt_ms (if the kernel has netem)

- **Rate**: tbf on the edge side's egress, so edge -> cloud is shaped and the
  answers are not. The bucket is :func:`~popex.link.shaping.tbf_burst_bytes`:
  one frame or 4 ms of the rate, whichever is larger, so that a short probe
  does not see many bytes at line speed.
- **RTT**: netem delay on the cloud side's egress (answers and ACKs): every
  round trip crosses it once. Kernels without netem (this project's CI
  machine) cannot delay in the kernel; then ``rtt_via_emulation`` is True
  and ``edge_emulate_link_arg`` is the value for the edge's
  ``--emulate-link`` that adds only the RTT: ``"100000,<rtt_ms>"``. The
  emulator needs a rate too; at 100 Gbit/s its serialisation time is
  nanoseconds, so the kernel's tbf remains the only rate limit.

Addresses come from 10.231.0.0/16, a /30 per run picked at random (and
checked against the addresses in use), so concurrent runs do not collide.
Everything is removed on exit, also after an exception; namespaces that an
earlier, dead run left behind (the pid in the name is gone) are removed first.

Needs root. Without it, or where namespaces cannot be created,
:func:`shaped_link` raises :class:`HarnessUnavailable`, which tests turn
into a skip.

Run as a module for manual use (needs ``POPEX_TOKEN``)::

    sudo -E .venv/bin/python -m popex.testbed.netns --profile lte
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from popex.errors import ConfigError, PopexError
from popex.link.emulation import EMULATED_RATE_MBPS
from popex.link.profiles import DEFAULT_LINKS_PATH, find_link_profile, format_number, load_link_profiles
from popex.link.shaping import Shaping, ShapingError, apply_shaping, netem_available, tbf_burst_bytes, \
    tc_commands

__all__ = [
    "HarnessUnavailable",
    "ShapedLink",
    "shaped_link",
    "cleanup_stale_namespaces",
    "wait_until_listening",
    "main",
]

_log = logging.getLogger(__name__)

_PREFIX_PATTERN = re.compile(r"^[a-z][a-z0-9]{0,5}$")  # + 5 digits + 1 letter <= 15 (IFNAMSIZ - 1)
_N_SUBNETS = 16384  # /30s in 10.231.0.0/16
_N_PICK_TRIES = 32
_COMMAND_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_REPO_ROOT = Path(__file__).resolve().parents[2]


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    # Started in its own session, the process leads its own group: signalling
    # the group reaches gunicorn's workers too, and nothing else. A caller who
    # turned start_new_session off gets the process alone signalled.
    if process.poll() is not None:
        return
    try:
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)
    except ProcessLookupError:
        pass


def _ip(*args: str, timeout_s: float = _COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout_s)


def _ip_checked(*args: str) -> None:
    result = _ip(*args)
    if result.returncode != 0:
        raise HarnessUnavailable(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _namespaces() -> list[str]:
    result = _ip("netns", "list")
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _addresses_in_use() -> set[str]:
    result = _ip("-o", "-4", "addr", "show")
    return set(re.findall(r"inet (\d+\.\d+\.\d+\.\d+)/", result.stdout))


def _pick_index(name_prefix: str) -> int:
    in_use = _addresses_in_use()
    namespaces = set(_namespaces())
    for _ in range(_N_PICK_TRIES):
        index = random.randrange(_N_SUBNETS)
        base = (index % 64) * 4
        ips = {f"10.231.{index // 64}.{base + host}" for host in (1, 2)}
        names_free = not any(Path("/sys/class/net", f"{name_prefix}{index}{end}").exists() for end in "ec")
        if names_free and not ips & in_use and not any(ns.endswith(f"-{index}") for ns in namespaces):
            return index
    raise HarnessUnavailable(f"no free 10.231.x.y/30 subnet after {_N_PICK_TRIES} tries")


def _check_root() -> None:
    if os.geteuid() != 0:
        raise HarnessUnavailable("the network-namespace harness needs root (it creates namespaces, "
                                 "veth pairs and tc qdiscs); run the tests as root to include it")
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise HarnessUnavailable(f"{' and '.join(missing)} not found: install iproute2")


class HarnessUnavailable(PopexError):
    """The harness cannot run here: not root, or namespaces/veth/tbf missing. Tests skip on it."""

    code = "harness_unavailable"


@dataclass
class ShapedLink:
    """A live shaped link; valid inside the ``with shaped_link(...)`` block only.

    Attributes
    ----------
    netns : str
        Name of the cloud's network namespace.
    edge_iface, cloud_iface : str
        The veth ends: in the root namespace, and in ``netns``.
    edge_ip, cloud_ip : str
        IPv4 addresses of the two ends (a private /30).
    uplink_mbps : float
        The tbf rate on edge -> cloud traffic, Mbit/s.
    rtt_ms : float
        The RTT the link should have, ms.
    burst_bytes : int
        The tbf bucket size.
    rtt_via_emulation : bool
        True when the kernel has no netem and ``rtt_ms > 0``: the RTT is not
        in the kernel, start the edge with ``--emulate-link edge_emulate_link_arg``.
    edge_emulate_link_arg : str or None
        ``"100000,<rtt_ms>"`` when ``rtt_via_emulation``, else None.
    shaping : tuple of Shaping
        The tc setups installed.
    """

    netns: str
    edge_iface: str
    cloud_iface: str
    edge_ip: str
    cloud_ip: str
    uplink_mbps: float
    rtt_ms: float
    burst_bytes: int
    rtt_via_emulation: bool
    edge_emulate_link_arg: str | None
    shaping: tuple[Shaping, ...]
    _processes: list[subprocess.Popen] = field(default_factory=list, repr=False, compare=False)

    def run_in_cloud_ns(self, argv: Sequence[str], **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the cloud's namespace (``ip netns exec``), in its own process group.

        The process (and its group) is stopped when the link is torn down.

        Parameters
        ----------
        argv : sequence of str
            The command; no shell is involved.
        **popen_kwargs
            Passed to :class:`subprocess.Popen` (``env``, ``cwd``, ``stdout``...).

        Returns
        -------
        subprocess.Popen
        """
        if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(arg, str) for arg in argv):
            raise ConfigError(f"argv must be a non-empty list of strings, got {argv!r}")
        popen_kwargs.setdefault("start_new_session", True)
        process = subprocess.Popen(["ip", "netns", "exec", self.netns, *argv], **popen_kwargs)
        self._processes.append(process)
        return process

    def set_rate(self, uplink_mbps: float) -> Shaping:
        """Change the tbf rate of edge -> cloud traffic now (a step of a bandwidth trace).

        The root tbf is replaced in place by one with the new rate and its
        bucket (``tc qdisc replace``, one tc call of a few ms); the RTT is
        left as it is.

        Parameters
        ----------
        uplink_mbps : float
            New rate in Mbit/s, [0.01, 100000].

        Returns
        -------
        Shaping
            What was installed.

        Raises
        ------
        ConfigError
            On a rate out of range (nothing changes).
        ShapingError
            If tc fails.
        """
        shaping = apply_shaping(self.edge_iface, uplink_mbps=uplink_mbps, rtt_ms=0, netem=False)
        self.uplink_mbps = float(uplink_mbps)
        self.burst_bytes = tbf_burst_bytes(uplink_mbps)
        self.shaping = (shaping, *self.shaping[1:])
        return shaping

    def stop_processes(self, *, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Stop every process started by :meth:`run_in_cloud_ns`: SIGTERM, then SIGKILL after ``timeout_s``."""
        for process in self._processes:
            _signal_group(process, signal.SIGTERM)
        deadline_s = time.monotonic() + timeout_s
        for process in self._processes:
            try:
                process.wait(max(0.0, deadline_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait(_STOP_TIMEOUT_S)
        self._processes.clear()


def cleanup_stale_namespaces(name_prefix: str = "popex") -> list[str]:
    """Delete namespaces ``<name_prefix>-<pid>-<i>`` whose creating process is gone.

    Namespaces of live runs (a concurrent test session) are left alone.

    Parameters
    ----------
    name_prefix : str
        The prefix given to :func:`shaped_link`.

    Returns
    -------
    list of str
        The namespaces deleted.
    """
    pattern = re.compile(rf"^{re.escape(name_prefix)}-(\d+)-(\d+)$")
    deleted = []
    for name in _namespaces():
        match = pattern.fullmatch(name)
        if match and not _pid_alive(int(match.group(1))):
            if _ip("netns", "del", name).returncode == 0:
                _log.info("removed stale network namespace %s", name)
                deleted.append(name)
    return deleted


@contextlib.contextmanager
def shaped_link(*, uplink_mbps: float, rtt_ms: float, name_prefix: str = "popex") -> Iterator[ShapedLink]:
    """Create a shaped edge -> cloud link for the duration of a ``with`` block.

    Parameters
    ----------
    uplink_mbps : float
        Rate of edge -> cloud traffic in Mbit/s, [0.01, 100000].
    rtt_ms : float
        Round-trip time in ms, [0, 60000] (see the module doc for how).
    name_prefix : str
        Lowercase letter then up to 5 lowercase letters/digits; names the
        namespace and the veth ends.

    Yields
    ------
    ShapedLink

    Raises
    ------
    ConfigError
        On a value out of range (before anything is created).
    HarnessUnavailable
        Not root, or the namespace, the veth pair or the qdisc cannot be
        created here.
    """
    if not isinstance(name_prefix, str) or not _PREFIX_PATTERN.fullmatch(name_prefix):
        raise ConfigError(f"name_prefix must match {_PREFIX_PATTERN.pattern}, got {name_prefix!r}")
    # Validate every number before creating anything.
    tc_commands("lo", uplink_mbps=uplink_mbps, rtt_ms=rtt_ms, netem=False)
    _check_root()
    cleanup_stale_namespaces(name_prefix)
    index = _pick_index(name_prefix)
    netns = f"{name_prefix}-{os.getpid()}-{index}"
    edge_iface, cloud_iface = f"{name_prefix}{index}e", f"{name_prefix}{index}c"
    base = (index % 64) * 4
    edge_ip, cloud_ip = f"10.231.{index // 64}.{base + 1}", f"10.231.{index // 64}.{base + 2}"
    _ip_checked("netns", "add", netns)
    link: ShapedLink | None = None
    try:
        _ip_checked("link", "add", edge_iface, "type", "veth", "peer", "name", cloud_iface, "netns", netns)
        _ip_checked("addr", "add", f"{edge_ip}/30", "dev", edge_iface)
        _ip_checked("link", "set", edge_iface, "up")
        _ip_checked("-n", netns, "addr", "add", f"{cloud_ip}/30", "dev", cloud_iface)
        _ip_checked("-n", netns, "link", "set", cloud_iface, "up")
        _ip_checked("-n", netns, "link", "set", "lo", "up")
        try:
            shaping = [apply_shaping(edge_iface, uplink_mbps=uplink_mbps, rtt_ms=0, netem=False)]
            rtt_via_emulation = rtt_ms > 0 and not netem_available()
            if rtt_ms > 0 and not rtt_via_emulation:
                shaping.append(apply_shaping(cloud_iface, uplink_mbps=None, rtt_ms=rtt_ms, netem=True, netns=netns))
        except ShapingError as err:
            raise HarnessUnavailable(f"cannot shape the veth pair: {err}") from err
        link = ShapedLink(
            netns=netns, edge_iface=edge_iface, cloud_iface=cloud_iface, edge_ip=edge_ip, cloud_ip=cloud_ip,
            uplink_mbps=float(uplink_mbps), rtt_ms=float(rtt_ms), burst_bytes=tbf_burst_bytes(uplink_mbps),
            rtt_via_emulation=rtt_via_emulation,
            edge_emulate_link_arg=f"{EMULATED_RATE_MBPS},{format_number(rtt_ms)}" if rtt_via_emulation else None,
            shaping=tuple(shaping))
        if rtt_via_emulation:
            _log.info("this kernel has no netem: the %g ms RTT must be added by the edge "
                      "(--emulate-link %s)", rtt_ms, link.edge_emulate_link_arg)
        yield link
    finally:
        if link is not None:
            link.stop_processes()
        # Deleting the namespace destroys the veth end inside it, and with it the peer.
        _ip("netns", "del", netns)
        if Path("/sys/class/net", edge_iface).exists():
            _ip("link", "del", edge_iface)


def wait_until_listening(host: str, port: int, *, timeout_s: float,
                         process: subprocess.Popen | None = None) -> bool:
    """Poll until a TCP connection to ``host:port`` succeeds, for at most ``timeout_s`` seconds.

    Parameters
    ----------
    host : str
    port : int
    timeout_s : float
        Total time to wait.
    process : subprocess.Popen, optional
        The server process; waiting stops early if it exits.

    Returns
    -------
    bool
        Whether the port accepted a connection in time.
    """
    deadline_s = time.monotonic() + timeout_s
    while time.monotonic() < deadline_s:
        if process is not None and process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Start a cloud service behind a shaped link and keep it up until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m popex.testbed.netns",
                                     description="Run the POPEX cloud in a network namespace behind a shaped link "
                                                 "(needs root and POPEX_TOKEN).")
    parser.add_argument("--profile", help="a profile of configs/links.yaml")
    parser.add_argument("--uplink-mbps", type=float, help="rate, Mbit/s (instead of --profile)")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time, ms (with --uplink-mbps)")
    parser.add_argument("--port", type=int, default=8001, help="the cloud's port inside the namespace")
    args = parser.parse_args(argv)
    try:
        if args.profile is not None:
            profile = find_link_profile(load_link_profiles(DEFAULT_LINKS_PATH), args.profile)
            uplink_mbps, rtt_ms = profile.uplink_mbps, profile.rtt_ms
        elif args.uplink_mbps is not None:
            uplink_mbps, rtt_ms = args.uplink_mbps, args.rtt_ms
        else:
            parser.error("give --profile NAME or --uplink-mbps R [--rtt-ms D]")
        if not os.environ.get("POPEX_TOKEN"):
            raise ConfigError("set POPEX_TOKEN (the cloud refuses to start without it)")
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with shaped_link(uplink_mbps=uplink_mbps, rtt_ms=rtt_ms) as link:
            cloud = link.run_in_cloud_ns([str(_REPO_ROOT / "run_cloud.sh"), "--host", link.cloud_ip,
                                          "--port", str(args.port)])
            emulate = f" --emulate-link {link.edge_emulate_link_arg}" if link.rtt_via_emulation else ""
            print(f"cloud: http://{link.cloud_ip}:{args.port} in namespace {link.netns}, "
                  f"uplink {uplink_mbps:g} Mbit/s (tbf), RTT {rtt_ms:g} ms "
                  f"({'edge emulation: no netem here' if link.rtt_via_emulation else 'netem'})\n"
                  f"start the edge with:\n  ./run_edge.sh --cloud-url http://{link.cloud_ip}:{args.port}{emulate}\n"
                  "Ctrl-C stops the cloud and removes the namespace.", flush=True)
            try:
                while not stop.is_set() and cloud.poll() is None:
                    stop.wait(0.5)
            except KeyboardInterrupt:
                pass
            if cloud.poll() is not None:
                print(f"the cloud exited with status {cloud.returncode}", file=sys.stderr)
                return 1
        return 0
    except PopexError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
