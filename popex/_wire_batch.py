"""(private) The per-sample metadata of a batched wire payload: request ids and budgets, as strings.

safetensors metadata maps strings to strings, so a batch's lists travel
comma-separated: ``request_ids`` (one id per sample, in batch order) and
``budgets_ms`` (the time left to each sample when it was sent, ms), and a
one-sample payload may carry its own ``budget_ms``. :func:`popex.wire.decode_offload`
checks that the lists are as long as the batch dimension, so a payload whose
metadata disagrees with its tensor never reaches a model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from popex._wire_errors import WireError

__all__ = ["BATCH_METADATA", "batch_metadata", "parse_batch_metadata"]

BATCH_METADATA = ("budget_ms", "request_ids", "budgets_ms")
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_MAX_BUDGET_MS = 3_600_000.0


def _budget(text: str, name: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise WireError(f"{name} must be numbers of milliseconds, got {text[:40]!r}") from err
    if not math.isfinite(value) or not -_MAX_BUDGET_MS <= value <= _MAX_BUDGET_MS:
        raise WireError(f"{name} must be finite and within ±{_MAX_BUDGET_MS:g} ms, got {text[:40]!r}")
    return value


def batch_metadata(*, budget_ms: float | None, request_ids: Sequence[str] | None,
                   budgets_ms: Sequence[float] | None, n_batch: int) -> dict[str, str]:
    """The metadata strings for a payload's budget, or a batch's ids and budgets.

    Raises
    ------
    WireError
        If an id is not ``[A-Za-z0-9_.:-]{1,128}``, a list's length is not ``n_batch``, or a budget is
        not finite.
    """
    metadata: dict[str, str] = {}
    if budget_ms is not None:
        metadata["budget_ms"] = repr(_budget(repr(float(budget_ms)), "budget_ms"))
    if request_ids is not None:
        ids = [str(request_id) for request_id in request_ids]
        bad = [request_id for request_id in ids if not _ID_RE.fullmatch(request_id)]
        if bad or len(ids) != n_batch:
            raise WireError(f"request_ids must be {n_batch} ids of [A-Za-z0-9_.:-]{{1,128}}, got {len(ids)} "
                            f"{bad[:1]}")
        metadata["request_ids"] = ",".join(ids)
    if budgets_ms is not None:
        if request_ids is None or len(budgets_ms) != len(request_ids):
            raise WireError("budgets_ms needs request_ids of the same length")
        metadata["budgets_ms"] = ",".join(repr(_budget(repr(float(b)), "budgets_ms")) for b in budgets_ms)
    return metadata


def parse_batch_metadata(metadata: Mapping[str, str], *, n_batch: int) -> dict[str, object]:
    """``budget_ms``, ``request_ids`` and ``budgets_ms`` of a received payload, checked against its batch size.

    Raises
    ------
    WireError
        If a list's length is not the batch dimension ``n_batch``, an id or budget is malformed,
        or a one-sample ``budget_ms`` comes with a batch.
    """
    budget_ms = _budget(metadata["budget_ms"], "budget_ms") if "budget_ms" in metadata else None
    request_ids = budgets_ms = None
    if "request_ids" in metadata:
        request_ids = tuple(metadata["request_ids"].split(","))
        if len(request_ids) != n_batch:
            raise WireError(f"the batch dimension is {n_batch} but the metadata names {len(request_ids)} "
                            "request_ids: they must agree")
        if not all(_ID_RE.fullmatch(request_id) for request_id in request_ids):
            raise WireError("request_ids must be comma-separated ids of [A-Za-z0-9_.:-]{1,128}")
    if "budgets_ms" in metadata:
        budgets_ms = tuple(_budget(text, "budgets_ms") for text in metadata["budgets_ms"].split(","))
        if request_ids is None or len(budgets_ms) != n_batch:
            raise WireError(f"the batch dimension is {n_batch} but budgets_ms has {len(budgets_ms)} values "
                            "(and needs request_ids): they must agree")
    return {"budget_ms": budget_ms, "request_ids": request_ids, "budgets_ms": budgets_ms}
