"""Seeded image orders and arrival processes of the rate-limit study.

Image orders index the test split: i.i.d. sampling, or *location-reset*
(correlated difficulty, the seed's model): the images are sorted by metric,
the image at step t is ``order[(loc + delta) mod N]`` with delta uniform in
0..spread*N, and loc jumps to a uniform new place with probability
``reset_prob`` per step. Arrivals are inter-arrival times in slots: periodic
(I = 1) or a two-state Markov-modulated process (I = 1 slot in state 0,
3 slots in state 1; leaving state 0 with probability 0.001 and state 1 with
0.0005 per arrival).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from popex.checks import check_finite, check_int
from popex.errors import ConfigError

__all__ = ["SEQUENCES", "ARRIVALS", "LocationReset", "Mmpp", "Periodic", "image_sequences", "make_arrivals"]

SEQUENCES = ("iid", "locreset")
ARRIVALS = ("periodic", "mmpp")


@dataclass(frozen=True)
class LocationReset:
    """Options of the location-reset order: ``spread`` (fraction of N) and ``reset_prob`` per step."""

    spread: float = 0.1
    reset_prob: float = 0.01

    def __post_init__(self) -> None:
        check_finite(self.spread, name="spread", low=0.0, high=1.0, allow_text=False)
        check_finite(self.reset_prob, name="reset_prob", low=0.0, high=1.0, allow_text=False)


@dataclass(frozen=True)
class Periodic:
    """One arrival per slot."""

    def interval_probs(self) -> dict[int, float]:
        """The per-arrival distribution of inter-arrival times, slots -> probability."""
        return {1: 1.0}

    def sample(self, n_seq: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        """(n_seq, seq_len) inter-arrival times: all 1."""
        return np.ones((n_seq, seq_len), dtype=np.int64)


@dataclass(frozen=True)
class Mmpp:
    """Two-state Markov-modulated periodic arrivals (per-arrival state changes)."""

    interval_slots: tuple[int, int] = (1, 3)
    leave_prob: tuple[float, float] = (0.001, 0.0005)

    def __post_init__(self) -> None:
        for i in (0, 1):
            check_int(self.interval_slots[i], name=f"interval_slots[{i}]", low=1, high=10_000)
            check_finite(self.leave_prob[i], name=f"leave_prob[{i}]", low=0.0, high=1.0, low_open=True,
                         allow_text=False)

    def stationary(self) -> tuple[float, float]:
        """Fraction of arrivals in each state."""
        leave0, leave1 = self.leave_prob
        return leave1 / (leave0 + leave1), leave0 / (leave0 + leave1)

    def interval_probs(self) -> dict[int, float]:
        """The per-arrival (stationary) distribution of inter-arrival times, slots -> probability."""
        probs: dict[int, float] = {}
        for interval, share in zip(self.interval_slots, self.stationary()):
            probs[interval] = probs.get(interval, 0.0) + share
        return probs

    def sample(self, n_seq: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
        """(n_seq, seq_len) inter-arrival times; each sequence starts in the stationary distribution."""
        out = np.empty((n_seq, seq_len), dtype=np.int64)
        for row in range(n_seq):
            state, filled = int(rng.random() >= self.stationary()[0]), 0
            while filled < seq_len:
                run = int(rng.geometric(self.leave_prob[state]))
                out[row, filled:filled + run] = self.interval_slots[state]
                filled += run
                state = 1 - state
        return out


def make_arrivals(name: str) -> Periodic | Mmpp:
    """The arrival model called ``name`` ("periodic" or "mmpp"), with the seed's parameters."""
    if name == "periodic":
        return Periodic()
    if name == "mmpp":
        return Mmpp()
    raise ConfigError(f"arrivals must be one of {list(ARRIVALS)}, got {name!r}")


def image_sequences(metric: np.ndarray, *, kind: str, n_seq: int, seq_len: int, rng: np.random.Generator,
                    location_reset: LocationReset = LocationReset()) -> np.ndarray:
    """(n_seq, seq_len) indices into ``metric`` (the test split), i.i.d. or location-reset.

    Parameters
    ----------
    metric : np.ndarray, shape (n_images,)
        Sorts the images for the location-reset order.
    kind : {"iid", "locreset"}
    n_seq, seq_len : int
    rng : np.random.Generator
    location_reset : LocationReset

    Returns
    -------
    np.ndarray of int64

    Examples
    --------
    >>> seq = image_sequences(np.arange(100.0), kind="locreset", n_seq=1, seq_len=50,
    ...                       rng=np.random.default_rng(0), location_reset=LocationReset(0.05, 0.0))
    >>> int(np.ptp(seq)) <= 100 and len(np.unique(seq)) <= 6 + 1 + 94  # a window of 5% around one place
    True
    """
    n_images = len(metric)
    n_seq = check_int(n_seq, name="n_seq", low=1, high=10_000)
    seq_len = check_int(seq_len, name="seq_len", low=1, high=100_000_000)
    if kind == "iid":
        return rng.integers(0, n_images, (n_seq, seq_len))
    if kind != "locreset":
        raise ConfigError(f"sequence must be one of {list(SEQUENCES)}, got {kind!r}")
    order = np.argsort(metric, kind="stable")
    delta = rng.integers(0, int(location_reset.spread * n_images) + 1, (n_seq, seq_len))
    jumps = np.zeros((n_seq, seq_len), dtype=np.int64)
    jumps[:, 0] = rng.integers(0, n_images, n_seq)
    reset = rng.random((n_seq, seq_len - 1)) < location_reset.reset_prob
    jumps[:, 1:][reset] = rng.integers(0, n_images, int(reset.sum()))
    is_reset = np.ones((n_seq, seq_len), dtype=bool)
    is_reset[:, 1:] = reset
    # the location at step t is the one drawn at the last reset at or before t
    last_reset = np.maximum.accumulate(np.where(is_reset, np.arange(seq_len)[None, :], 0), axis=1)
    location = np.take_along_axis(jumps, last_reset, axis=1)
    return order[(location + delta) % n_images]
