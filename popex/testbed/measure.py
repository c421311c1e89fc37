"""Summaries of measured requests: latency percentiles, accuracy, shares, the strategy used.

The records are :meth:`popex.testbed.harness.Testbed.classify`'s dicts.
A fallback (the cloud was late or unreachable and the edge answered) is
counted with its real latency and answer, and also reported as a share.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from popex.errors import ConfigError

__all__ = ["Measured", "summarise"]


@dataclass(frozen=True)
class Measured:
    """What a batch of requests measured.

    Attributes
    ----------
    n_requests : int
    mean_latency_ms, p50_latency_ms, p95_latency_ms, p99_latency_ms, max_latency_ms : float
        Edge arrival to answer, ms.
    accuracy : float
        Share of correct answers.
    within_share : float
        Share of requests with latency <= the requirement.
    offload_share : float
        Share answered by the cloud.
    fallback_share : float
        Share answered by the edge after the cloud failed or was late.
    strategy : str
        The strategy most requests used ("…(mostly)" if not all).
    n_strategies : int
        Distinct strategies used.
    edge_predicted_ms : float
        Mean of the edge's own prediction (its plan, its link estimate), ms.
    """

    n_requests: int
    mean_latency_ms: float
    p50_latency_ms: float
    p95_latency_ms: float
    p99_latency_ms: float
    max_latency_ms: float
    accuracy: float
    within_share: float
    offload_share: float
    fallback_share: float
    strategy: str
    n_strategies: int
    edge_predicted_ms: float


def summarise(records: Sequence[dict[str, Any]], *, deadline_ms: float) -> Measured:
    """Summarise requests against the requirement ``deadline_ms``.

    Raises
    ------
    ConfigError
        If there are no records.

    Examples
    --------
    >>> records = [{"latency_ms": 10.0, "correct": True, "where": "edge", "fallback": False,
    ...             "strategy": "s=6 θ=[off]", "edge_predicted_ms": 9.0}] * 3
    >>> m = summarise(records, deadline_ms=12.0)
    >>> m.mean_latency_ms, m.within_share, m.strategy
    (10.0, 1.0, 's=6 θ=[off]')
    """
    if not records:
        raise ConfigError("no requests to summarise")
    latency_ms = np.array([r["latency_ms"] for r in records], dtype=np.float64)
    counts = Counter(r["strategy"] for r in records)
    strategy, n_most = counts.most_common(1)[0]
    return Measured(
        n_requests=len(records),
        mean_latency_ms=float(latency_ms.mean()),
        p50_latency_ms=float(np.percentile(latency_ms, 50)),
        p95_latency_ms=float(np.percentile(latency_ms, 95)),
        p99_latency_ms=float(np.percentile(latency_ms, 99)),
        max_latency_ms=float(latency_ms.max()),
        accuracy=float(np.mean([bool(r["correct"]) for r in records])),
        within_share=float(np.mean(latency_ms <= deadline_ms)),
        offload_share=float(np.mean([r["where"] == "cloud" for r in records])),
        fallback_share=float(np.mean([bool(r["fallback"]) for r in records])),
        strategy=strategy if n_most == len(records) else f"{strategy} (mostly)",
        n_strategies=len(counts),
        edge_predicted_ms=float(np.mean([r["edge_predicted_ms"] for r in records])),
    )
