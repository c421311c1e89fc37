"""The uplink rate from timed transfers: one rate for the link, one fixed cost per source of samples.

Every rate sample is a transfer of ``n_bytes`` whose round trip exceeded a
zero-byte probe's (RTT plus one request's HTTP cost) by ``excess_ms``, the
cloud's compute already taken off. That excess is ``n_bytes / rate`` plus a
fixed cost that has nothing to do with the rate: an offload's route costs
more than the probe's (its reply, the edge's own work), and a token-bucket
shaper lets its bucket through at line speed. Dividing bytes by the whole
excess, as one sample alone must, reads that fixed cost as a slow link: 16 KB
offloads with a millisecond of fixed cost made a 100 Mbit/s link look like
9 Mbit/s. So the estimate is a fit of ``excess = n · s + c_source``:

- the slope ``s`` (ms per byte, shared: it is the link) comes from pairs of
  transfers of one source whose sizes differ by at least half, where the
  fixed cost cancels; each pair weighs its difference in bytes, and pairs
  whose difference in time is within the RTT jitter are left out, since
  they carry the timer's noise and not the link's;
- each source's fixed cost ``c`` is the median of ``excess − n · s`` over its
  samples (small payloads, useless for the rate, pin it best);
- without a usable pair (every sample the same size) each informative
  sample gives ``n / (excess − c)`` with the source's last known ``c``.

Both sources enter the same fit, so an active probe and a passive sample
that disagree make the fixed cost of one of them larger, not the rate a vote
of whichever source sent more samples. The slope is a byte-weighted median,
not a mean: one transfer that met a burst of cross traffic must not move it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["SOURCES", "JITTER_FACTOR", "Transfer", "RateFit", "fit_rate", "jitter_ms"]

#: The sources of rate samples: timed uploads to the probe route, and real offloads.
SOURCES = ("probe", "passive")
# A pair whose sizes differ by less than this factor cancels its fixed cost into noise.
_MIN_SIZE_RATIO = 1.5
#: A transfer (or a pair's difference) within this many jitters of zero carries no rate.
JITTER_FACTOR = 2.0
# Below this, round trips are timer resolution and scheduling, whatever their spread, ms.
_MIN_JITTER_MS = 0.1
# 1.4826 · MAD estimates the standard deviation of Gaussian noise; two of them cover ~95 %.
_MAD_TO_JITTER = 2.0 * 1.4826


@dataclass(frozen=True)
class Transfer:
    """One timed transfer.

    Attributes
    ----------
    source : {"probe", "passive"}
    n_bytes : int
        Bytes on the wire.
    excess_ms : float
        Round trip beyond a zero-byte probe's, the cloud's compute removed, ms.
    """

    source: str
    n_bytes: int
    excess_ms: float


@dataclass(frozen=True)
class RateFit:
    """What :func:`fit_rate` found.

    Attributes
    ----------
    ms_per_byte : float or None
        The slope; None when no transfer carried the rate.
    fixed_ms : dict of str to float
        Each source's fixed cost beyond a zero-byte probe, ms (>= 0).
    n_used : int
        Transfers (or pairs) that carried the rate.
    """

    ms_per_byte: float | None
    fixed_ms: dict[str, float] = field(default_factory=dict)
    n_used: int = 0

    @property
    def uplink_mbps(self) -> float | None:
        """The rate, Mbit/s (None without a slope)."""
        return None if self.ms_per_byte is None else 8.0 / (1000.0 * self.ms_per_byte)


def _weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    """The value at half the total weight (the mean of the two around it at an exact tie)."""
    order = sorted(range(len(values)), key=values.__getitem__)
    half = 0.5 * sum(weights)
    cumulative = 0.0
    for position, index in enumerate(order):
        cumulative += weights[index]
        if cumulative > half:
            return values[index]
        if cumulative == half and position + 1 < len(order):
            return 0.5 * (values[index] + values[order[position + 1]])
    return values[order[-1]]


def _pair_slopes(transfers: Sequence[Transfer], noise_ms: float) -> tuple[list[float], list[float]]:
    slopes: list[float] = []
    weights: list[float] = []
    for i, small in enumerate(transfers):
        for large in transfers[i + 1:]:
            if small.n_bytes > large.n_bytes:
                small, large = large, small
            d_bytes = large.n_bytes - small.n_bytes
            d_ms = large.excess_ms - small.excess_ms
            if large.n_bytes < _MIN_SIZE_RATIO * small.n_bytes or d_ms < noise_ms:
                continue
            slopes.append(d_ms / d_bytes)
            weights.append(float(d_bytes))
    return slopes, weights


def jitter_ms(round_trips_ms: Iterable[float]) -> float:
    """The RTT jitter: about two standard deviations of zero-byte round trips, from their MAD.

    Parameters
    ----------
    round_trips_ms : iterable of float
        Recent zero-byte round trips, ms.

    Returns
    -------
    float
        ms, at least 0.1 (timer and scheduling noise).

    Examples
    --------
    >>> round(jitter_ms([10.0, 10.5, 9.5, 10.0, 10.2]), 3)
    0.593
    >>> jitter_ms([])
    0.1
    """
    values = list(round_trips_ms)
    if len(values) < 2:
        return _MIN_JITTER_MS
    centre = statistics.median(values)
    mad_ms = statistics.median(abs(value - centre) for value in values)
    return max(_MIN_JITTER_MS, _MAD_TO_JITTER * mad_ms)


def fit_rate(transfers: Iterable[Transfer], *, jitter_ms: float,
             prior_fixed_ms: Mapping[str, float] | None = None) -> RateFit:
    """Fit ``excess = n · s + c_source`` to the transfers (see the module's docstring).

    Parameters
    ----------
    transfers : iterable of Transfer
        Recent transfers of both sources.
    jitter_ms : float
        The RTT jitter (:func:`jitter_ms`); smaller differences carry no rate.
    prior_fixed_ms : mapping of str to float, optional
        Each source's fixed cost from the last fit, used when no pair of
        sizes gives the slope (default 0).

    Returns
    -------
    RateFit

    Examples
    --------
    >>> # a 1 ms fixed cost on 8 Mbit/s (1 µs per byte): 10 kB take 11 ms, 20 kB 21 ms
    >>> fit = fit_rate([Transfer("passive", 10_000, 11.0), Transfer("passive", 20_000, 21.0)], jitter_ms=0.1)
    >>> round(fit.uplink_mbps, 6), round(fit.fixed_ms["passive"], 6)
    (8.0, 1.0)
    """
    by_source = {source: [t for t in transfers if t.source == source] for source in SOURCES}
    prior = dict(prior_fixed_ms or {})
    noise_ms = JITTER_FACTOR * jitter_ms
    slopes: list[float] = []
    weights: list[float] = []
    for samples in by_source.values():
        pair_slopes, pair_weights = _pair_slopes(samples, noise_ms)
        slopes += pair_slopes
        weights += pair_weights
    if not slopes:  # one size per source: each informative transfer alone, its source's fixed cost off
        for source, samples in by_source.items():
            for transfer in samples:
                serialisation_ms = transfer.excess_ms - prior.get(source, 0.0)
                if serialisation_ms >= noise_ms:
                    slopes.append(serialisation_ms / transfer.n_bytes)
                    weights.append(float(transfer.n_bytes))
    if not slopes:
        return RateFit(ms_per_byte=None, fixed_ms={source: prior.get(source, 0.0) for source in SOURCES})
    slope = _weighted_median(slopes, weights)
    fixed_ms = {source: max(0.0, statistics.median(t.excess_ms - t.n_bytes * slope for t in samples))
                if samples else prior.get(source, 0.0) for source, samples in by_source.items()}
    return RateFit(ms_per_byte=slope, fixed_ms=fixed_ms, n_used=len(slopes))
