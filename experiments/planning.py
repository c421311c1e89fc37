"""Predicted latency and accuracy of every policy, without services: the latency model offline.

:class:`Predictor` sweeps a model's calibration with the edge's threshold
grid (:func:`popex.decision.policies.edge_threshold_grids`) and plans with a
profile, so its rows are the rows the edge chooses from; it answers what a
policy picks for a link and a requirement, and what any strategy the edge
used is predicted to cost on a given link.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from popex.decision import Link, Planner, Profile, load_calibration, sweep_exit_stats
from popex.decision.calibration import Calibration
from popex.decision.policies import POLICIES, PolicyBook, check_headroom, edge_threshold_grids
from popex.decision.precision_aware import precision_aware_thresholds
from popex.decision.table import StrategyTable
from popex.errors import ConfigError
from popex.testbed.harness import strategy_text

__all__ = ["Prediction", "Predictor", "test_split_calibration"]

_CALIBRATION_FILE = "calibration.npz"


def _key(split: int, thresholds: Any) -> tuple[int, tuple[float | None, ...]]:
    return int(split), tuple(None if t is None or (isinstance(t, float) and math.isnan(t)) else float(t)
                             for t in thresholds)


@dataclass(frozen=True)
class Prediction:
    """One strategy's predicted figures on one link.

    Attributes
    ----------
    policy : str
        The policy that picked it ("" for a strategy looked up directly).
    row : int
    split : int
    thresholds : tuple of (float or None)
    strategy : str
        :func:`~popex.testbed.harness.strategy_text`.
    expected_latency_ms : float
        E[T], ms.
    worst_latency_ms : float
        Per-sample worst case, ms.
    accuracy : float
        On the calibration data.
    offload_prob : float
    feasible : bool
        Whether the policy's row meets the requirement (True for a direct lookup).
    exit_probs : tuple of float
        Share of the samples leaving at each branch (the rest reach the final exit).
    """

    policy: str
    row: int
    split: int
    thresholds: tuple[float | None, ...]
    strategy: str
    expected_latency_ms: float
    worst_latency_ms: float
    accuracy: float
    offload_prob: float
    feasible: bool
    exit_probs: tuple[float, ...] = ()

    def latency_ms(self, objective: str) -> float:
        """E[T] for "mean", the worst case for "tail"."""
        return self.expected_latency_ms if objective == "mean" else self.worst_latency_ms


class Predictor:
    """The latency model of one model and profile, for any link.

    Parameters
    ----------
    calibration : Calibration
    profile : Profile
        E.g. the profile the edge measured (``Testbed.profile()``).

    Examples
    --------
    >>> from popex.decision.calibration import Calibration
    >>> cal = Calibration(confidence=np.array([[0.9, 1.0], [0.2, 1.0]]), predicted=np.array([[0, 0], [0, 1]]),
    ...     correct=np.array([[True, True], [False, True]]), labels=np.array([0, 1]), temperature=np.ones(2))
    >>> profile = Profile(stage_names=("a", "b"), stage_edge_ms=[5.0, 5.0], stage_cloud_ms=[1.0, 1.0],
    ...     branch_after_stage=(1,), branch_edge_ms=[1.0], split_bytes=[1000, 1000, 40], offload_overhead_ms=1.0)
    >>> Predictor(cal, profile).policy("cloud-only", link=Link(uplink_mbps=8.0, rtt_ms=1.0),
    ...     deadline_ms=50.0).split
    0
    """

    def __init__(self, calibration: Calibration, profile: Profile, *, headroom_fraction: float = 0.0) -> None:
        if not isinstance(calibration, Calibration) or not isinstance(profile, Profile):
            raise ConfigError("Predictor expects (Calibration, Profile), got "
                              f"({type(calibration).__name__}, {type(profile).__name__})")
        self.profile = profile
        self.calibration = calibration
        grids = edge_threshold_grids(len(profile.branch_after_stage))
        stats = sweep_exit_stats(calibration, branch_after_stage=profile.branch_after_stage, thresholds=grids)
        self._precision = (precision_aware_thresholds(calibration, grids=grids).thresholds,
                           profile.branch_after_stage)
        self.stats = stats
        self._planner = Planner(stats, profile)
        self.headroom_fraction = check_headroom(headroom_fraction)
        self._books: dict[tuple[float, float], PolicyBook] = {}
        first = self._planner.table(Link(uplink_mbps=1.0, rtt_ms=0.0))
        self._rows = {_key(first.split[i], first.thresholds[i]): i for i in range(len(first))}

    @classmethod
    def from_model_dir(cls, model_dir: Path, profile: Profile, *, headroom_fraction: float = 0.0) -> Predictor:
        """Calibration from ``model_dir/calibration.npz``, with ``profile``."""
        return cls(load_calibration(Path(model_dir) / _CALIBRATION_FILE), profile, headroom_fraction=headroom_fraction)

    def book(self, link: Link) -> PolicyBook:
        """The policy book for ``link`` (cached per rate and RTT)."""
        key = (link.uplink_mbps, link.rtt_ms)
        book = self._books.get(key)
        if book is None:
            book = self._books[key] = PolicyBook.build(self._planner.table(link),
                                                       headroom_fraction=self.headroom_fraction,
                                                       precision_aware=self._precision)
        return book

    def table(self, link: Link) -> StrategyTable:
        """The strategy table for ``link``."""
        return self.book(link).table

    def _prediction(self, table: StrategyTable, row: int, *, policy: str, feasible: bool) -> Prediction:
        data = table.row(row)
        return Prediction(policy=policy, row=row, split=data["split"], thresholds=tuple(data["thresholds"]),
                          strategy=strategy_text(data["split"], data["thresholds"]),
                          expected_latency_ms=data["expected_latency_ms"],
                          worst_latency_ms=data["worst_latency_ms"], accuracy=data["accuracy"],
                          offload_prob=data["offload_prob"], feasible=feasible,
                          exit_probs=tuple(float(p) for p in data["exit_probs"]))

    def policy(self, policy: str, *, link: Link, deadline_ms: float, objective: str = "mean") -> Prediction:
        """What ``policy`` picks for ``deadline_ms`` on ``link``, and its predicted figures.

        Raises
        ------
        ConfigError
            On an unknown policy or objective, or a bad deadline.
        """
        if policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {policy!r}")
        book = self.book(link)
        decision = book.decide(policy, deadline_ms=deadline_ms, objective=objective)
        return self._prediction(book.table, decision.row, policy=policy, feasible=decision.feasible)

    def strategy(self, split: int, thresholds: Any, *, link: Link) -> Prediction:
        """Predicted figures of the strategy ``(split, thresholds)`` (None or NaN = off) on ``link``.

        Raises
        ------
        ConfigError
            If the strategy is not a row of the table (another threshold grid).
        """
        key = _key(split, thresholds)
        row = self._rows.get(key)
        if row is None:
            raise ConfigError(f"strategy {strategy_text(*key)} is not in the table of this grid")
        return self._prediction(self.table(link), row, policy="", feasible=True)

    def accuracy_front(self, *, link: Link, deadlines_ms: np.ndarray, objective: str = "mean"
                       ) -> dict[str, list[Prediction]]:
        """Every policy's prediction at each deadline (for accuracy-vs-requirement curves)."""
        return {policy: [self.policy(policy, link=link, deadline_ms=float(d), objective=objective)
                         for d in deadlines_ms] for policy in POLICIES}


def test_split_calibration(model_dir: Path) -> tuple[Calibration, str]:
    """Per-exit confidence and correctness of the model on the whole test split, with its calibration temperatures.

    What a strategy scores on the test images (as opposed to the held-out
    validation split of ``calibration.npz``): a :class:`Predictor` built on it
    gives the test accuracy of any strategy, with the same exit rule as the
    runtime. Used to compare policies on 10,000 images instead of the few
    hundred streamed through the services.

    Returns
    -------
    calibration : Calibration
    source : str
        Which test images ("full test split" or the shipped subset).
    """
    from popex.data import default_test_set
    from popex.data.preprocess import Preprocessing, preprocess
    from popex.nets.io import load_model
    from popex.nets.train import calibrate

    model_dir = Path(model_dir)
    reference = load_calibration(model_dir / _CALIBRATION_FILE)
    model = load_model(model_dir)
    test = default_test_set()
    inputs = preprocess(test.dataset.images, Preprocessing.from_spec_dict(model.net.spec), is_batch=True)
    calibration = calibrate(model.net, inputs, test.dataset.labels, method=reference.confidence_method,
                            temperature=np.asarray(reference.temperature))
    source = "full test split" if test.source == "debian" else "shipped 1,000-image test subset"
    return calibration, source
