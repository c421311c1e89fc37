"""The live edge's rate limiter: the token bucket in real time, the MDP thresholds for the measured arrivals.

Time is cut into slots of 1/(100 r) s, so the bucket of r tokens/s and depth
b is the exact integer bucket ``integerise(0.01, b)`` of
:mod:`popex.ratelimit.bucket`, the one the simulator runs (q = 1, p = 100).
A request whose strategy would offload *consults* the limiter with the
metric of its best local exit; it may offload iff a token is there and the
policy says so at the current level:

- ``mdp``: the thresholds of :func:`popex.ratelimit.mdp.solve_mdp` for
  r_arrival = r x (measured mean time between consultations), b tokens,
  periodic arrivals; the level is mapped onto that MDP's levels;
- ``baseline``: the (1 - r_arrival) quantile of the training metrics.

The metric of a request is E[R | confidence] of its most confident evaluated
branch (R = final correct - branch correct on the calibration, top-1 cost;
a :class:`popex.ratelimit.metric.KernelTable` per branch): the confidence is
what a running edge has, the calibration's logits are not kept. The
policies are fitted on the calibration samples the request's strategy would
offload (no active branch reached its threshold): those are the arrivals. Fitting the
tables and solving the MDP happen on the limiter's own thread (``start``),
never on a request: it re-solves when the measured rate moves by more than
10%. Until a model's tables are ready its requests take any token there is.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from popex.checks import check_choice, check_finite
from popex.ratelimit.bucket import TokenBucket, integerise
from popex.ratelimit.mdp import solve_mdp
from popex.ratelimit.metric import KernelTable
from popex.ratelimit.policies import baseline_threshold

__all__ = ["LIVE_POLICIES", "LiveDecision", "RateLimiter", "StrategyPrediction"]

LIVE_POLICIES = ("mdp", "baseline")
#: Slots per token: the live bucket's p.
_UNITS_PER_TOKEN = 100
_RESOLVE_BAND = 0.10
_EWMA_WEIGHT = 0.05


class LiveDecision(NamedTuple):
    """One consultation: granted or not, the metric and the tokens left (a tuple: a request makes one)."""

    granted: bool
    metric: float
    tokens: float


class StrategyPrediction(NamedTuple):
    """The Decision Maker's prediction for a request's strategy and the latency of its two paths, ms.

    A refused offload is answered on the edge, so under the bucket the
    expected latency mixes the two paths by the refused fraction, as the
    accuracy mixes the final exit and the local one.
    """

    accuracy: float
    offload_prob: float
    latency_ms: float = 0.0
    #: An offloaded request's latency: past every active branch, then the cloud (the strategy's worst case).
    offload_path_ms: float = 0.0
    #: A refused one's: the same edge part, answered at its best evaluated branch (or the rest run on the edge).
    refused_path_ms: float = 0.0


@dataclass(frozen=True)
class _ModelTables:
    tables: tuple[KernelTable, ...]
    metric_tr: np.ndarray
    #: On the calibration samples that reach the bucket: accuracy offloaded (final exit) and refused (local).
    accuracy_offloaded: float = 0.0
    accuracy_refused: float = 0.0

    def lookup(self, branch: int, confidence: float) -> float:
        """The table at ``confidence``, in plain Python (a request's one value: numpy would cost more)."""
        table = self.tables[branch]
        values = table.values_list
        index = int((confidence - table.low) / (table.high - table.low) * len(values))
        return values[min(len(values) - 1, max(0, index))]


@dataclass(frozen=True)
class _Thresholds:
    rate_per_arrival: float
    mdp_p: int
    values: tuple[float, ...]  # per MDP level (mdp) or one value (baseline)
    refused_fraction: float = 0.0  # expected, of the arrivals, at this rate (the simulator on the calibration)


def _fit_tables(calibration: object, gate: tuple[tuple[int, float], ...]) -> _ModelTables:
    """Per-branch tables, and the metrics of the calibration samples the strategy ``gate`` would offload."""
    correct = np.asarray(calibration.correct, dtype=np.float64)
    confidence = np.asarray(calibration.confidence, dtype=np.float64)
    tables = tuple(KernelTable.fit(confidence[:, b], correct[:, -1] - correct[:, b])
                   for b in range(correct.shape[1] - 1))
    if not gate:  # refused, it runs the rest of the network on the edge: the final exit either way
        # no branch ran, so its requests' metric is +inf (they take any token): the policies and the expected
        # refused fraction are solved for arrivals that all want one (a zero metric would predict all refused)
        final = float(correct[:, -1].mean())
        return _ModelTables(tables=tables, metric_tr=np.ones(1), accuracy_offloaded=final, accuracy_refused=final)
    branches = [b for b, _ in gate]
    reaches = np.all([confidence[:, b] < t for b, t in gate], axis=0)  # no active branch let it exit
    if not np.any(reaches):
        reaches = np.ones(len(confidence), dtype=bool)
    best = np.asarray(branches)[np.argmax(confidence[reaches][:, branches], axis=1)]
    metric_tr = np.array([tables[b](c) for b, c in zip(best, confidence[reaches, best])], dtype=np.float64)
    return _ModelTables(tables=tables, metric_tr=metric_tr,
                        accuracy_offloaded=float(correct[reaches, -1].mean()),
                        accuracy_refused=float(correct[np.flatnonzero(reaches), best].mean()))


def _expected_refused_fraction(metric_tr: np.ndarray, thresholds: np.ndarray, rate_per_arrival: float,
                               depth: float, *, n_steps: int = 20_000) -> float:
    """Fraction of arrivals refused by ``thresholds`` at this rate and depth: the simulator on i.i.d. draws.

    The bucket and the loop are the simulator's (:func:`popex.ratelimit.simulate.run_plan`), so the
    prediction and the offline study count alike; seeded, on the limiter's thread only.
    """
    from popex.ratelimit.policies import Plan
    from popex.ratelimit.simulate import run_plan

    params = integerise(min(rate_per_arrival, 1e6), depth)
    metric = np.random.default_rng(0).choice(metric_tr, n_steps)
    levels = np.asarray(thresholds, dtype=np.float64)
    levels = np.broadcast_to(levels if len(levels) == params.m + 1 else levels[:1], (params.m + 1,)).copy()
    levels[:params.p] = np.inf
    offloaded = run_plan(Plan(thresholds=levels), metric, np.ones(n_steps, dtype=np.int64), params)
    return 1.0 - float(offloaded.mean())


class RateLimiter:
    """The edge's bucket of ``rate_per_s`` tokens/s and ``depth`` tokens, with a policy.

    Parameters
    ----------
    rate_per_s : float
        r > 0 offloads per second.
    depth : float
        b >= 1 tokens.
    policy : {"mdp", "baseline"}
    clock : callable, optional
        Seconds, monotonic (default ``time.monotonic``); tests pass their own.

    Raises
    ------
    ConfigError
        On r <= 0, b < 1 or an unknown policy.
    """

    def __init__(self, *, rate_per_s: float, depth: float, policy: str = "mdp", clock=time.monotonic) -> None:
        self.rate_per_s = check_finite(rate_per_s, name="offload_rate_per_s", low=0.0, low_open=True)
        self.depth = check_finite(depth, name="offload_bucket_depth", low=1.0)
        self.policy = check_choice(policy, name="offload_policy", choices=LIVE_POLICIES)
        self.params = integerise(1.0 / _UNITS_PER_TOKEN, self.depth)
        self._slot_s = self.params.rate / self.rate_per_s
        self._clock = clock
        self._bucket = TokenBucket(self.params)
        self._lock = threading.Lock()
        self._last_s = clock()
        self._last_arrival_s: float | None = None
        self._mean_gap_s: float | None = None
        self._tables: dict[str, _ModelTables] = {}
        self._thresholds: dict[str, _Thresholds] = {}
        self._calibrations: dict[str, object] = {}
        self._strategy_predictions: dict[object, StrategyPrediction] = {}
        self._n_granted = self._n_refused = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- request path -------------------------------------------------------------

    def metric(self, key: object, branch: int | None, confidence: float) -> float:
        """E[R | confidence] at ``branch`` (+inf when the tables are not ready or no branch ran)."""
        tables = self._tables.get(key)
        if tables is None or branch is None or branch >= len(tables.tables):
            return float("inf")
        return tables.lookup(branch, confidence)

    def consult(self, model_id: str, calibration: object, branch: int | None, confidence: float, *,
                gate: tuple[tuple[int, float], ...] = (),
                strategy_prediction: StrategyPrediction | None = None) -> LiveDecision:
        """One request would offload: may it? Spends the token when granted.

        Parameters
        ----------
        model_id : str
        calibration : Calibration
            The model's (the limiter's thread fits its tables from it once per gate).
        branch : int or None
            The most confident evaluated branch, None if none ran.
        confidence : float
            Its confidence.
        gate : tuple of (branch, threshold)
            The strategy's active branches and thresholds: which samples reach the bucket.
        strategy_prediction : StrategyPrediction, optional
            The Decision Maker's for the request's strategy, kept for the status's corrected prediction.

        Returns
        -------
        LiveDecision
        """
        key = (model_id, tuple(gate))
        if strategy_prediction is not None:
            self._strategy_predictions[key] = strategy_prediction
        if key not in self._calibrations:
            self._calibrations[key] = calibration
            self._wake.set()
        metric = self.metric(key, branch, confidence)
        thresholds = self._thresholds.get(key)
        with self._lock:
            now = self._clock()
            n_slots = int((now - self._last_s) / self._slot_s)
            self._bucket.advance(n_slots)
            self._last_s += n_slots * self._slot_s
            if self._last_arrival_s is not None:
                gap = now - self._last_arrival_s
                self._mean_gap_s = gap if self._mean_gap_s is None else (
                    (1 - _EWMA_WEIGHT) * self._mean_gap_s + _EWMA_WEIGHT * gap)
            self._last_arrival_s = now
            wants = self._wants(metric, thresholds)
            granted = wants and self._bucket.try_take()
            if granted:
                self._n_granted += 1
            else:
                self._n_refused += 1
            tokens = self._bucket.tokens
        if thresholds is None or self._moved(thresholds):
            self._wake.set()  # the limiter's thread re-solves; this request used what was there
        return LiveDecision(granted=granted, metric=metric, tokens=tokens)

    def _wants(self, metric: float, thresholds: _Thresholds | None) -> bool:
        if thresholds is None:
            return True
        if self.policy == "baseline":
            return metric >= thresholds.values[0]
        level = min(len(thresholds.values) - 1, self._bucket.level * thresholds.mdp_p // self.params.p)
        return metric > thresholds.values[level]

    def _moved(self, thresholds: _Thresholds) -> bool:
        rate = self._rate_per_arrival()
        return rate is not None and abs(rate - thresholds.rate_per_arrival) > _RESOLVE_BAND * thresholds.rate_per_arrival

    def _rate_per_arrival(self) -> float | None:
        gap = self._mean_gap_s
        return None if gap is None or gap <= 0 else self.rate_per_s * gap

    # -- background -----------------------------------------------------------------

    def resolve(self) -> None:
        """Fit missing tables and (re-)solve thresholds for the measured rate (the limiter thread's work)."""
        rate = self._rate_per_arrival()
        for key, calibration in list(self._calibrations.items()):
            if key not in self._tables:
                self._tables[key] = _fit_tables(calibration, key[1])
            current = self._thresholds.get(key)
            if rate is None or (current is not None and not self._moved(current)):
                continue
            metric_tr = self._tables[key].metric_tr
            if self.policy == "baseline":
                values = np.array([np.nextafter(baseline_threshold(metric_tr, rate, 1.0), -np.inf)])
                new = _Thresholds(rate, 1, (float(values[0]),))
            else:
                params = integerise(min(rate, 1e6), self.depth)
                values = np.asarray(solve_mdp(params, metric_tr).thresholds, dtype=np.float64)
                new = _Thresholds(rate, params.p, tuple(float(t) for t in values))
            refused = _expected_refused_fraction(metric_tr, np.where(np.isfinite(values), values, np.inf), rate,
                                                 self.depth)
            new = _Thresholds(new.rate_per_arrival, new.mdp_p, new.values, refused)
            self._thresholds[key] = new  # one reference swap: a request reads old or new, whole

    def predicted(self, model_id: str, gate: tuple[tuple[int, float], ...],
                  prediction: StrategyPrediction) -> dict[str, float] | None:
        """A strategy's predicted accuracy and latency once the bucket refuses its share of the offloads.

        Of the ``offload_prob`` of requests that reach the bucket, the expected
        refused fraction (at the measured rate) is answered at the most
        confident active branch instead of the final exit: accuracy falls by
        offload_prob x refused x (accuracy offloaded - accuracy refused), both
        measured on the calibration samples that reach the bucket, and the
        expected latency by offload_prob x refused x (offload path - refused
        path): a refused request skips the uplink and the cloud.

        Parameters
        ----------
        model_id : str
        gate : tuple of (branch, threshold)
        prediction : StrategyPrediction
            The Decision Maker's, without the bucket.

        Returns
        -------
        dict or None
            ``expected_refused_fraction``, ``accuracy``, ``offload_prob``, ``latency_ms`` and the
            uncorrected ``accuracy_without_bucket``, ``latency_ms_without_bucket``; None until the
            limiter's thread has solved this strategy.
        """
        key = (model_id, tuple(gate))
        tables, thresholds = self._tables.get(key), self._thresholds.get(key)
        if tables is None or thresholds is None:
            return None
        refused = thresholds.refused_fraction
        accuracy, offload_prob, latency_ms = prediction.accuracy, prediction.offload_prob, prediction.latency_ms
        drop = offload_prob * refused * (tables.accuracy_offloaded - tables.accuracy_refused)
        saved_ms = offload_prob * refused * (prediction.offload_path_ms - prediction.refused_path_ms)
        return {"expected_refused_fraction": refused, "accuracy": accuracy - drop,
                "offload_prob": offload_prob * (1.0 - refused), "accuracy_without_bucket": accuracy,
                "latency_ms": latency_ms - saved_ms, "latency_ms_without_bucket": latency_ms}

    def start(self) -> None:
        """Start the limiter's thread (fits tables, re-solves)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="popex-rate-limit", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if not self._stop.is_set():
                self.resolve()

    def status(self) -> dict[str, object]:
        """The ``rate_limit`` block of ``/api/v1/status``."""
        with self._lock:
            tokens, granted, refused = self._bucket.tokens, self._n_granted, self._n_refused
        rate = self._rate_per_arrival()
        return {"offload_rate_per_s": self.rate_per_s, "offload_bucket_depth": self.depth, "policy": self.policy,
                "tokens": tokens, "n_granted": granted, "n_refused": refused,
                "refused_fraction": refused / (granted + refused) if granted + refused else 0.0,
                "tokens_per_arrival": rate,
                "thresholds_ready": sorted({model_id for model_id, _ in self._thresholds}),
                "expected": [{"model_id": model_id, "gate": [list(g) for g in gate],
                              "expected_refused_fraction": t.refused_fraction,
                              "solved_for_tokens_per_arrival": t.rate_per_arrival,
                              "accuracy_offloaded": self._tables[(model_id, gate)].accuracy_offloaded,
                              "accuracy_refused": self._tables[(model_id, gate)].accuracy_refused,
                              "strategy": self._corrected(model_id, gate)}
                             for (model_id, gate), t in list(self._thresholds.items())]}

    def _corrected(self, model_id: str, gate: tuple[tuple[int, float], ...]) -> dict[str, float] | None:
        last = self._strategy_predictions.get((model_id, gate))
        return None if last is None else self.predicted(model_id, gate, last)
