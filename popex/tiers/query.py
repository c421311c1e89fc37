"""A Scission query: per-tier criteria, upload and time limits, the input size and the result count.

The criteria strings are Scission's (``-d/-e/-c``), comma-separated:

==========  ==========================================================
``N``       layer N must run on this tier
``!N``      layer N must not run on this tier
``-1``      this tier runs nothing
``!-1``     this tier must run something
``NAME``    this tier must run, on system NAME (several: any of them)
``!NAME``   this tier must run, not on system NAME
==========  ==========================================================

Time limits are seconds (``2.5``) or a share of the configuration's total
compute time (``40%``), as in Scission's ``--device-time``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from popex.errors import BenchmarkError

__all__ = ["DEFAULT_INPUT_MB", "TierCriteria", "Query", "parse_criteria", "parse_time_limit"]

#: Scission's default input size (``-i``), in decimal MB.
DEFAULT_INPUT_MB = 0.15


@dataclass(frozen=True)
class TierCriteria:
    """What one tier must satisfy; empty means anything goes."""

    layers_in: tuple[int, ...] = ()
    layers_out: tuple[int, ...] = ()
    systems_in: tuple[str, ...] = ()
    systems_out: tuple[str, ...] = ()
    time_limit_s: float | None = None
    time_limit_percent: float | None = None
    upload_limit_bytes: float | None = None


@dataclass(frozen=True)
class Query:
    """One prediction request: the model, the criteria of each tier, the input bytes and how many answers."""

    model: str
    device: TierCriteria = TierCriteria()
    edge: TierCriteria = TierCriteria()
    cloud: TierCriteria = TierCriteria()
    input_bytes: float | None = None  # None: the model's recorded input_bytes, else DEFAULT_INPUT_MB
    n_results: int = 5


def _layer(text: str) -> int | None:
    """A layer number (``-1`` included), or None when the text names a system."""
    if text == "-1" or (text.isascii() and text.isdigit()):
        return int(text)
    return None


def parse_criteria(text: str | None, *, tier: str) -> TierCriteria:
    """Parse one ``-d/-e/-c`` string.

    Parameters
    ----------
    text : str or None
        Comma-separated criteria (None or empty: no criteria).
    tier : str
        The tier's name, for messages.

    Returns
    -------
    TierCriteria

    Raises
    ------
    BenchmarkError
        An empty item, or a bare ``!``.

    Examples
    --------
    >>> parse_criteria("!-1, 10, !vm2Core", tier="edge")
    TierCriteria(layers_in=(10,), layers_out=(-1,), systems_in=(), systems_out=('vm2Core',), time_limit_s=None, \
time_limit_percent=None, upload_limit_bytes=None)
    """
    layers_in, layers_out, systems_in, systems_out = [], [], [], []
    for raw in (text or "").split(",") if (text or "").strip() else []:
        item = raw.strip()
        negated = item.startswith("!")
        body = item[1:].strip() if negated else item
        if not body:
            raise BenchmarkError(f"{tier} criteria {text!r}: empty criterion (expected N, !N, -1, !-1, NAME or !NAME)")
        layer = _layer(body)
        if layer is not None:
            (layers_out if negated else layers_in).append(layer)
        else:
            (systems_out if negated else systems_in).append(body)
    return TierCriteria(layers_in=tuple(layers_in), layers_out=tuple(layers_out), systems_in=tuple(systems_in),
                        systems_out=tuple(systems_out))


def parse_time_limit(text: str | None, *, name: str) -> tuple[float | None, float | None]:
    """A time limit: ``(seconds, None)``, ``(None, percent)`` or ``(None, None)``.

    Parameters
    ----------
    text : str or None
        ``"2.5"`` (seconds) or ``"40%"`` (of the total compute time).
    name : str
        The option, for messages.

    Returns
    -------
    tuple of (float or None, float or None)

    Raises
    ------
    BenchmarkError
        Not a finite non-negative number.

    Examples
    --------
    >>> parse_time_limit("40%", name="--edge-time"), parse_time_limit("2.5", name="--edge-time")
    ((None, 40.0), (2.5, None))
    """
    if text is None:
        return None, None
    body = text.strip()
    percent = body.endswith("%")
    try:
        value = float(body[:-1] if percent else body)
    except ValueError as err:
        raise BenchmarkError(f"{name} must be seconds (e.g. 2.5) or a percentage (e.g. 40%), got {text!r}") from err
    if not math.isfinite(value) or value < 0:
        raise BenchmarkError(f"{name} must be finite and >= 0, got {text!r}")
    return (None, value) if percent else (value, None)
