"""A bandwidth trace: holds and ramps of the uplink rate, as the changes a shaper applies over time.

The adaptation experiment replays one on the shaped link (``tc`` tbf in the
testbed's namespace) while images stream, and judges how the edge follows
each change; the trace itself knows nothing of the edge.
"""

from __future__ import annotations

from dataclasses import dataclass

from popex.errors import ConfigError

__all__ = ["TraceStep", "build_trace"]


@dataclass(frozen=True)
class TraceStep:
    """The rate from ``start_s`` (seconds into the trace) on; ``kind`` is "step" or "ramp"."""

    start_s: float
    uplink_mbps: float
    kind: str = "step"


def build_trace(segments: tuple[tuple[str, float, float, float], ...], *, ramp_step_s: float = 1.0
                ) -> tuple[list[TraceStep], float]:
    """Turn segments into rate changes.

    Parameters
    ----------
    segments : tuple of (kind, duration_s, from_mbps, to_mbps)
        ``("hold", d, r, r)`` holds a rate; ``("ramp", d, a, b)`` moves
        linearly from ``a`` to ``b`` in steps of ``ramp_step_s``.
    ramp_step_s : float
        Time between two changes of a ramp, s.

    Returns
    -------
    steps : list of TraceStep
    duration_s : float

    Raises
    ------
    ConfigError
        On an unknown kind or a non-positive duration.

    Examples
    --------
    >>> steps, duration_s = build_trace((("hold", 5, 20, 20), ("ramp", 2, 2, 10)))
    >>> [(s.start_s, s.uplink_mbps, s.kind) for s in steps], duration_s
    ([(0.0, 20.0, 'step'), (5.0, 2.0, 'ramp'), (6.0, 6.0, 'ramp'), (7.0, 10.0, 'ramp')], 7.0)
    """
    steps: list[TraceStep] = []
    now_s = 0.0
    for kind, duration_s, from_mbps, to_mbps in segments:
        if duration_s <= 0:
            raise ConfigError(f"segment durations must be > 0, got {duration_s!r}")
        if kind == "hold":
            steps.append(TraceStep(now_s, float(from_mbps), "step"))
        elif kind == "ramp":
            n_changes = max(1, int(round(duration_s / ramp_step_s)))
            for i in range(n_changes + 1):
                rate = from_mbps + (to_mbps - from_mbps) * i / n_changes
                steps.append(TraceStep(now_s + i * duration_s / n_changes, float(rate), "ramp"))
        else:
            raise ConfigError(f"segment kind must be 'hold' or 'ramp', got {kind!r}")
        now_s += duration_s
    # Where a segment starts as the previous one ends, the later change wins;
    # a "change" to the rate already in force is none.
    merged: list[TraceStep] = []
    for step in steps:
        if merged and merged[-1].start_s == step.start_s:
            merged.pop()
        if not merged or merged[-1].uplink_mbps != step.uplink_mbps:
            merged.append(step)
    return merged, now_s
