"""The token bucket, in exact integers: one implementation for the simulator and the live edge.

A bucket of rate r tokens per slot and depth b tokens is integerised as
r = q/p, b = m/p with the smallest denominator p <= 100 that minimises the
rounding error (then reduced by gcd(q, p, m)); the level n counts units of
1/p token, an offload costs p units, and after I slots n <- min(m, n + q*I).
Integers make the bound "offloads over T slots <= r*T + b" exact, not
approximately true after a million float additions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from popex.checks import check_finite
from popex.errors import ConfigError

__all__ = ["MAX_DENOMINATOR", "BucketParams", "TokenBucket", "integerise"]

#: The largest denominator p tried when integerising (r, b) (the seed's choice).
MAX_DENOMINATOR = 100


@dataclass(frozen=True)
class BucketParams:
    """An integerised bucket: ``q`` units per slot, ``p`` units per token (one offload), depth ``m`` units.

    Attributes
    ----------
    q, p, m : int
        r = q/p tokens per slot, b = m/p tokens, 1 <= q, 1 <= p <= m.
    """

    q: int
    p: int
    m: int

    def __post_init__(self) -> None:
        for name in ("q", "p", "m"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"bucket {name} must be a positive integer, got {value!r}")
        if self.m < self.p:
            raise ConfigError(f"bucket depth m={self.m} units is below one token (p={self.p}): depth b must be >= 1")

    @property
    def rate(self) -> float:
        """Tokens per slot, q/p."""
        return self.q / self.p

    @property
    def depth(self) -> float:
        """Tokens the bucket holds, m/p."""
        return self.m / self.p

    @property
    def n_levels(self) -> int:
        """Token levels 0..m."""
        return self.m + 1

    def to_dict(self) -> dict[str, int]:
        """``{"q", "p", "m"}`` for JSON."""
        return {"q": self.q, "p": self.p, "m": self.m}


def integerise(rate: float, depth: float, *, max_denominator: int = MAX_DENOMINATOR) -> BucketParams:
    """The exact integer bucket closest to rate ``r`` tokens per slot and depth ``b`` tokens.

    Parameters
    ----------
    rate : float
        r > 0, tokens per slot.
    depth : float
        b >= 1, tokens.
    max_denominator : int
        Largest p tried.

    Returns
    -------
    BucketParams

    Raises
    ------
    ConfigError
        If r <= 0, b < 1, or either is not finite.

    Examples
    --------
    >>> integerise(0.25, 2)
    BucketParams(q=1, p=4, m=8)
    >>> integerise(0.1, 5)
    BucketParams(q=1, p=10, m=50)
    """
    rate = check_finite(rate, name="rate r (tokens per slot)", low=0.0, low_open=True, allow_text=False)
    depth = check_finite(depth, name="depth b (tokens)", low=1.0, allow_text=False)
    best: tuple[float, int, int, int] | None = None
    for p in range(1, max_denominator + 1):
        q, m = max(1, round(rate * p)), max(p, round(depth * p))
        error = (abs(rate * p - q) + abs(depth * p - m)) / p
        if best is None or error < best[0] - 1e-12:  # ties: the smallest p
            best = (error, q, p, m)
    _, q, p, m = best
    divisor = math.gcd(q, p, m)
    return BucketParams(q=q // divisor, p=p // divisor, m=m // divisor)


class TokenBucket:
    """The bucket's state: starts full; ``try_take`` spends a token, ``advance`` adds slots.

    Not thread-safe by itself: the live edge holds its own lock around a
    decision (the live edge); the simulator is one thread.

    Parameters
    ----------
    params : BucketParams

    Examples
    --------
    >>> bucket = TokenBucket(integerise(0.5, 1))
    >>> bucket.try_take(), bucket.try_take()
    (True, False)
    >>> bucket.advance(2); bucket.level
    2
    """

    __slots__ = ("q", "p", "m", "level")

    def __init__(self, params: BucketParams) -> None:
        self.q, self.p, self.m = params.q, params.p, params.m
        self.level = params.m

    @property
    def tokens(self) -> float:
        """Tokens held now (level / p)."""
        return self.level / self.p

    def can_take(self) -> bool:
        """Whether one offload is allowed now (at least p units)."""
        return self.level >= self.p

    def try_take(self) -> bool:
        """Spend one token if there is one; whether it was spent."""
        if self.level >= self.p:
            self.level -= self.p
            return True
        return False

    def advance(self, n_slots: int) -> None:
        """``n_slots`` slots passed: n <- min(m, n + q * n_slots)."""
        if n_slots > 0:
            self.level = min(self.m, self.level + self.q * n_slots)
