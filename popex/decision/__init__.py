"""popex.decision: latency model, exit-statistics sweep, strategy table, decision.

Typical use::

    stats = sweep_exit_stats(calibration, branch_after_stage=profile.branch_after_stage)
    planner = Planner(stats, profile)              # once per calibration and profile
    table = planner.table(Link(uplink_mbps=20.0, rtt_ms=15.0))   # per link estimate
    decision = DecisionIndex(table, objective="mean").lookup(50.0)
"""

from popex.decision.calibration import (
    CONFIDENCE_METHODS,
    Calibration,
    load_calibration,
    save_calibration,
)
from popex.decision.decide import Decision, DecisionIndex, decide
from popex.decision.formulas import expected_latency_ms, worst_latency_ms
from popex.decision.latency import Link, Profile
from popex.decision.sweep import DEFAULT_THRESHOLDS, ExitLevel, ExitStats, sweep_exit_stats
from popex.decision.table import OBJECTIVES, Planner, StrategyTable

__all__ = [
    "CONFIDENCE_METHODS",
    "Calibration",
    "load_calibration",
    "save_calibration",
    "Profile",
    "Link",
    "expected_latency_ms",
    "worst_latency_ms",
    "DEFAULT_THRESHOLDS",
    "ExitLevel",
    "ExitStats",
    "sweep_exit_stats",
    "OBJECTIVES",
    "Planner",
    "StrategyTable",
    "Decision",
    "DecisionIndex",
    "decide",
]
