"""The three-lane graph of DESIGN §4: device, edge and cloud lanes, cut edges only forward.

For one threshold configuration each lane is a chain of stage vertices
(and, after stage k_b, a vertex per active branch) weighted by reach
probability as in :mod:`popex.decision.graph`. A cut edge leaves a lane
after stage j (and its branches) for the entry of a later lane, carrying
``p(j)·hop(α_j)``, the hop cost weighted by the probability of still being
in flight. A lane's entry has only its next stage edge, so a lane that is
entered runs at least one stage: an empty edge is the device -> cloud hop,
as in :func:`popex.decision.three_tier.three_tier_table`. The last point of
each lane goes to ``output`` at 0. Every input -> output path is one (x, y)
and its length is E[T(θ, x, y)]; Dijkstra finds the best cut, and
``tests/test_three_tier.py`` checks it against the table for all x <= y.
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import numpy as np

from popex.decision.three_tier import TIER_NAMES, Hop, ThreeTierProfile
from popex.errors import ConfigError

__all__ = ["CutPath", "build_three_tier_graph", "shortest_cuts"]

INPUT = "input"
OUTPUT = "output"


@dataclass(frozen=True)
class CutPath:
    """Result of :func:`shortest_cuts`: the device runs 1..x, the edge x+1..y, the cloud the rest."""

    x: int
    y: int
    expected_latency_ms: float
    path: tuple[str, ...]


def build_three_tier_graph(profile: ThreeTierProfile, *, device_edge: Hop, edge_cloud: Hop, device_cloud: Hop,
                           exit_probs: object, active: object) -> nx.DiGraph:
    """The DAG of one threshold configuration over the three tiers.

    Parameters
    ----------
    profile : ThreeTierProfile
    device_edge, edge_cloud, device_cloud : Hop
    exit_probs : array-like, shape (B,)
        q_b (ignored where inactive).
    active : array-like of bool, shape (B,)

    Returns
    -------
    networkx.DiGraph
        Vertices ``input``, ``<tier>_<j>`` (after stage j on that lane),
        ``<tier>_in_<j>`` (entry after stage j), ``<tier>_branch_<b>``, ``output``;
        every edge has ``latency_ms``; cut edges carry ``cut`` = (tier, j).

    Raises
    ------
    ConfigError
        On shapes that do not match the profile.
    """
    probs = np.asarray(exit_probs, dtype=np.float64).reshape(-1)
    flags = np.asarray(active, dtype=bool).reshape(-1)
    n_branches = len(profile.branch_after_stage)
    if probs.shape != (n_branches,) or flags.shape != (n_branches,):
        raise ConfigError(f"exit_probs and active need {n_branches} entries, got {probs.shape}, {flags.shape}")
    n_stages = profile.n_stages
    hops = {("device", "edge"): device_edge, ("edge", "cloud"): edge_cloud, ("device", "cloud"): device_cloud}
    graph = nx.DiGraph()
    exited_before = [0.0] * (n_stages + 2)  # Σ active q_b with k_b < i, for i = 1..N+1
    for i in range(1, n_stages + 2):
        exited_before[i] = float(sum(probs[b] for b, k in enumerate(profile.branch_after_stage) if flags[b] and k < i))
    point: dict[tuple[int, int], str] = {(0, 0): INPUT}  # (lane, j) -> the vertex after stage j and its branches
    for t, tier in enumerate(TIER_NAMES):
        for j in range(1, n_stages + 1):
            sources = [point[(t, j - 1)]] if (t, j - 1) in point else []
            if t and j - 1 < n_stages:
                sources.append(f"{tier}_in_{j - 1}")
            weight = max(0.0, 1.0 - exited_before[j]) * float(profile.stage_ms[t, j - 1])
            vertex = f"{tier}_{j}"
            for source in sources:
                graph.add_edge(source, vertex, latency_ms=weight, kind="stage")
            for b, k in enumerate(profile.branch_after_stage):
                if k == j and flags[b]:
                    branch = f"{tier}_branch_{b}"
                    graph.add_edge(vertex, branch, latency_ms=max(0.0, 1.0 - exited_before[j])
                                   * float(profile.branch_ms[t, b]), kind="branch")
                    vertex = branch
            point[(t, j)] = vertex
        graph.add_edge(point[(t, n_stages)], OUTPUT, latency_ms=0.0, kind="finish", tier=tier)
        for j in range(n_stages):  # a cut leaves a point where this lane ran (the device may run nothing)
            if (t, j) not in point:
                continue
            in_flight = max(0.0, 1.0 - exited_before[j + 1])
            for later in TIER_NAMES[t + 1:]:
                cost = float(hops[(tier, later)].cost_ms(profile.split_bytes[j]))
                graph.add_edge(point[(t, j)], f"{later}_in_{j}", latency_ms=in_flight * cost, kind="cut",
                               cut=(tier, j))
    return graph


def shortest_cuts(graph: nx.DiGraph, *, n_stages: int) -> CutPath:
    """The minimum-expected-latency (x, y) of a graph from :func:`build_three_tier_graph`.

    Parameters
    ----------
    graph : networkx.DiGraph
    n_stages : int
        N.

    Returns
    -------
    CutPath

    Raises
    ------
    ConfigError
        No path from input to output.
    """
    try:
        length_ms, path = nx.single_source_dijkstra(graph, INPUT, OUTPUT, weight="latency_ms")
    except (nx.NetworkXNoPath, nx.NodeNotFound) as err:
        raise ConfigError("the three-tier graph has no path from input to output") from err
    x, y = n_stages, n_stages
    for u, v in zip(path, path[1:]):
        data = graph.edges[u, v]
        if data["kind"] == "cut":
            source, j = data["cut"]
            if source == "device":
                x = j
                y = j if v.startswith("cloud") else n_stages
            else:
                y = j
    return CutPath(x=x, y=y, expected_latency_ms=float(length_ms), path=tuple(path))
