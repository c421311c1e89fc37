"""A tier's own timings of a registered model as a ``popex-benchmark/1`` object (what the services serve).

The edge has profiled every model it prepared (stage and branch times, the
bytes at each split, :class:`popex.decision.latency.Profile`); the cloud
times its stages on request. Both answer ``GET
/api/v1/models/<id>/benchmark`` with this object, so that ``popex predict``
reads a running tier exactly as it reads a file from ``popex benchmark``.
FLOPs and parameters are null here: they are ``popex benchmark``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

from popex.tiers.benchmark_file import (Block, BranchBenchmark, ModelBenchmark, SystemBenchmark, benchmark_to_dict,
                                        parse_benchmark)

__all__ = ["tier_benchmark"]


def tier_benchmark(*, tier: str, system: str, model_name: str, stage_names: Sequence[str],
                   stage_ms: Sequence[float], split_bytes: Sequence[int], branch_after_stage: Sequence[int] = (),
                   branch_ms: Sequence[float] = (), note: str | None = None) -> dict[str, Any]:
    """One model's stages on one tier as a checked ``popex-benchmark/1`` object.

    Parameters
    ----------
    tier, system : str
        The tier and this system's name.
    model_name : str
        The key under ``models`` (the services use the model id).
    stage_names : sequence of str, length N
    stage_ms : sequence of float, length N
        Median time of each stage on this tier.
    split_bytes : sequence of int, length N + 1
        Bytes of the tensor at each split (0: the preprocessed input).
    branch_after_stage, branch_ms : sequences of length B
        Where each branch sits (1-based stage) and its time on this tier.
    note : str, optional

    Returns
    -------
    dict
        Read back by :func:`popex.tiers.benchmark_file.parse_benchmark` first.

    Examples
    --------
    >>> body = tier_benchmark(tier="edge", system="e1", model_name="m", stage_names=["a", "b"], stage_ms=[1.0, 2.0],
    ...                       split_bytes=[12, 8, 4], branch_after_stage=[1], branch_ms=[0.5])
    >>> [(b["input_layer"], b["output_bytes"]) for b in body["models"]["m"]["blocks"]], body["models"]["m"]["branches"][0]["after_block"]
    ([(0, 8), (1, 4)], 0)
    """
    blocks = tuple(Block(input_layer=i, output_layer=i, time_ms=float(ms), output_bytes=int(split_bytes[i + 1]),
                         name=name) for i, (name, ms) in enumerate(zip(stage_names, stage_ms)))
    branches = tuple(BranchBenchmark(after_block=int(k) - 1, time_ms=float(ms))
                     for k, ms in zip(branch_after_stage, branch_ms))
    model = ModelBenchmark(blocks=blocks, input_bytes=int(split_bytes[0]), branches=branches)
    body = benchmark_to_dict(SystemBenchmark(tier=tier, system=system, models=MappingProxyType({model_name: model}),
                                             note=note))
    import json

    parse_benchmark(json.dumps(body).encode(), source=f"{tier} {system}")  # the same checks as a file's
    return body
