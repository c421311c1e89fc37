"""Scission's network files: ping and bandwidth of every ordered pair of system names.

The header is ``source,destination,ping(ms),bandwidth(mbps)``; fields may
carry leading (and trailing) spaces, as Scission's own files do. Bandwidth is
in Mbit/s, 1 Mbit = 125,000 bytes, and a transfer of ``n`` bytes over a hop
costs ``ping + n / bytes_per_s`` (no return trip), exactly as Scission counts
it. A pair that a query needs and the file lacks is an error naming the pair,
raised by :meth:`Network.hop`.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from popex.checks import pickled_kind
from popex.errors import BenchmarkError

__all__ = ["NETWORK_HEADER", "BYTES_PER_MBIT", "Hop", "Network", "parse_network_csv", "load_network_csv"]

NETWORK_HEADER = ("source", "destination", "ping(ms)", "bandwidth(mbps)")
#: Scission's conversion (decimal megabits): 1 Mbit/s = 125,000 bytes/s.
BYTES_PER_MBIT = 125_000


@dataclass(frozen=True)
class Hop:
    """One directed link: its ping and bandwidth."""

    ping_ms: float
    bandwidth_mbps: float

    @property
    def bytes_per_s(self) -> int:
        """Bandwidth in bytes/s, rounded to an integer as Scission does (``round(mbps * 125000)``)."""
        return round(self.bandwidth_mbps * BYTES_PER_MBIT)

    def transfer_s(self, n_bytes: float) -> float:
        """Seconds to send ``n_bytes`` over this hop: ping + bytes / bandwidth.

        Parameters
        ----------
        n_bytes : float

        Returns
        -------
        float

        Examples
        --------
        >>> Hop(ping_ms=66.7, bandwidth_mbps=1.6).transfer_s(200_000)
        1.0667
        """
        return self.ping_ms / 1000 + n_bytes / self.bytes_per_s


@dataclass(frozen=True)
class Network:
    """The hops of a network file by (source, destination) system name."""

    hops: Mapping[tuple[str, str], Hop]
    source: str = "<memory>"

    def hop(self, source: str, destination: str) -> Hop:
        """The hop from ``source`` to ``destination``.

        Parameters
        ----------
        source, destination : str
            System names, as in the benchmark files.

        Returns
        -------
        Hop

        Raises
        ------
        BenchmarkError
            The file has no row for this ordered pair.
        """
        try:
            return self.hops[(source, destination)]
        except KeyError:
            raise BenchmarkError(f"{self.source} has no row for {source} -> {destination}, which this query needs "
                                 f"(add a line '{source},{destination},PING_MS,BANDWIDTH_MBPS')") from None


def parse_network_csv(text: str, *, source: str = "<memory>") -> Network:
    """Parse a network file.

    Parameters
    ----------
    text : str
        The file's content.
    source : str
        Its name, for messages.

    Returns
    -------
    Network

    Raises
    ------
    BenchmarkError
        A wrong header, a row without four fields, a ping < 0, a bandwidth
        <= 0 or a non-number (the line is named), or a pair given twice.

    Examples
    --------
    >>> net = parse_network_csv("source,destination,ping(ms),bandwidth(mbps)\\nraspi4,vm2Core,   66.7,  1.6\\n")
    >>> net.hop("raspi4", "vm2Core")
    Hop(ping_ms=66.7, bandwidth_mbps=1.6)
    """
    rows = list(csv.reader(io.StringIO(text), skipinitialspace=True))
    if not rows or tuple(field.strip() for field in rows[0]) != NETWORK_HEADER:
        found = ",".join(rows[0]) if rows else "(empty file)"
        raise BenchmarkError(f"{source}: the header must be {','.join(NETWORK_HEADER)}, got {found!r}")
    hops: dict[tuple[str, str], Hop] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row or all(not field.strip() for field in row):
            continue
        if len(row) != 4:
            raise BenchmarkError(f"{source}: line {number} must have 4 fields, got {len(row)}: {','.join(row)!r}")
        src, dst = row[0].strip(), row[1].strip()
        try:
            ping_ms, bandwidth_mbps = float(row[2]), float(row[3])
        except ValueError as err:
            raise BenchmarkError(f"{source}: line {number}: ping and bandwidth must be numbers, got "
                                 f"{row[2].strip()!r}, {row[3].strip()!r}") from err
        if not (math.isfinite(ping_ms) and ping_ms >= 0) or not (math.isfinite(bandwidth_mbps) and bandwidth_mbps > 0):
            raise BenchmarkError(f"{source}: line {number}: ping must be >= 0 ms and bandwidth > 0 Mbit/s, got "
                                 f"{ping_ms:g} ms, {bandwidth_mbps:g} Mbit/s")
        if not src or not dst:
            raise BenchmarkError(f"{source}: line {number}: source and destination must be named")
        if (src, dst) in hops:
            raise BenchmarkError(f"{source}: line {number}: the pair {src} -> {dst} is given twice")
        hops[(src, dst)] = Hop(ping_ms=ping_ms, bandwidth_mbps=bandwidth_mbps)
    return Network(hops=MappingProxyType(hops), source=source)


def load_network_csv(path: str | os.PathLike[str]) -> Network:
    """Read and check a network file.

    Parameters
    ----------
    path : str or path-like

    Returns
    -------
    Network

    Raises
    ------
    BenchmarkError
        Unreadable, a pickle, or malformed (see :func:`parse_network_csv`).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BenchmarkError(f"cannot read network file {str(path)!r}: {err.strerror or err}") from err
    kind = pickled_kind(data)
    if kind:
        raise BenchmarkError(f"{path.name}: is {kind}: refused, never unpickled")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise BenchmarkError(f"{path.name}: is not a UTF-8 CSV file") from err
    return parse_network_csv(text, source=path.name)
