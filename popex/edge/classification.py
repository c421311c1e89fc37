"""The answer to one classify request, and where its time went.

These are the pipeline's only output; ``to_dict`` is the JSON body of
``POST /api/v1/classify`` (DESIGN.md §6), so a key renamed here is an API change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from popex.runtime.onnx_model import PRISTINE_HEAD

__all__ = ["LatencyBreakdown", "Classification"]


@dataclass(frozen=True)
class LatencyBreakdown:
    """Where the time of one request went, ms.

    ``transfer_ms`` is the cloud call's round trip minus the cloud's compute
    time (for a failed call: the time spent waiting); ``edge_ms`` is the rest.
    """

    edge_ms: float
    transfer_ms: float
    cloud_ms: float
    total_ms: float

    def to_dict(self) -> dict[str, float]:
        """JSON form with the API's key names.

        Returns
        -------
        dict of str to float
            ``edge``, ``transfer``, ``cloud``, ``total``.
        """
        return {"edge": self.edge_ms, "transfer": self.transfer_ms, "cloud": self.cloud_ms, "total": self.total_ms}


@dataclass(frozen=True)
class Classification:
    """The answer to one request.

    Attributes
    ----------
    label : int
    class_name : str
    confidence : float
        Of the exit that answered (temperature-scaled).
    exit : int or str
        Branch index, or "final".
    where : str
        "edge" or "cloud".
    split : int
        The strategy's split.
    thresholds : tuple of (float or None)
        The strategy's thresholds (None = off).
    fallback : bool
        True when the cloud failed and the edge answered instead.
    fallback_reason : str or None
    latency : LatencyBreakdown
    predicted_latency_ms : float
        The strategy's expected latency.
    model_id : str
    feasible : bool
        Whether the strategy meets the deadline by the model's prediction.
    deadline_ms : float
    request_id : str
    policy : str
        The policy that chose the strategy ("adaptive" is POPEX).
    expert : str
        The head set that answered: "pristine" (also for models without
        experts or requests that are not distortion-aware) or an expert
        such as "blur" or "noise".
    expert_confidence : float or None
        The distortion classifier's confidence in its choice; None when it did not run.
    """

    label: int
    class_name: str
    confidence: float
    exit: int | str
    where: str
    split: int
    thresholds: tuple[float | None, ...]
    fallback: bool
    fallback_reason: str | None
    latency: LatencyBreakdown
    predicted_latency_ms: float
    model_id: str
    feasible: bool
    deadline_ms: float
    request_id: str
    policy: str = "adaptive"
    expert: str = PRISTINE_HEAD
    expert_confidence: float | None = None

    @property
    def outcome(self) -> str:
        """How it was answered, as the edge counts it: "fallback", "cloud", "edge_final" or "edge_branch"."""
        if self.fallback:
            return "fallback"
        if self.where == "cloud":
            return "cloud"
        return "edge_final" if self.exit == "final" else "edge_branch"

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``POST /api/v1/classify`` (``expert_confidence`` only when the classifier ran).

        Returns
        -------
        dict of str to object
        """
        body = {
            "label": self.label,
            "class_name": self.class_name,
            "confidence": self.confidence,
            "exit": self.exit,
            "where": self.where,
            "split": self.split,
            "thresholds": list(self.thresholds),
            "fallback": self.fallback,
            "fallback_reason": self.fallback_reason,
            "latency_ms": self.latency.to_dict(),
            "predicted_latency_ms": self.predicted_latency_ms,
            "model": self.model_id,
            "feasible": self.feasible,
            "deadline_ms": self.deadline_ms,
            "request_id": self.request_id,
            "policy": self.policy,
            "expert": self.expert,
        }
        if self.expert_confidence is not None:
            body["expert_confidence"] = self.expert_confidence
        return body
