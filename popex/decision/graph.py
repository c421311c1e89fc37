"""Split selection as a shortest path (DESIGN.md §4).

For one threshold configuration the edge path is a chain: ``input`` (after
stage 0), one vertex after each stage and, after stage k_b, one vertex per
active branch b (the branch runs on the edge before the next stage and
before any offload at split k_b). From the split-s point (the last vertex
after stage s) a cut edge goes to ``output`` carrying
``p_off(s)·(O + 8α_s/(1000B) + R + Σ_{i>s} t^c_i)``; at s = N the edge to
``output`` weighs 0. The path through the cut at s has length E[T(θ, s)],
so Dijkstra from ``input`` to ``output`` finds the best split.

Reach probabilities come from the active branch set:
``r_i = 1 − Σ_{active b, k_b < i} q_b`` and
``p_off(s) = 1 − Σ_{active b, k_b <= s} q_b``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx

from popex.decision.latency import Link, Profile, _exit_config
from popex.errors import ConfigError

__all__ = [
    "SplitPath",
    "build_graph",
    "shortest_split",
]

INPUT = "input"
OUTPUT = "output"


def _stage_vertex(stage: int) -> str:
    return INPUT if stage == 0 else f"stage_{stage}"


def _check_weights(graph: nx.DiGraph) -> None:
    # networkx would silently count a missing weight as 1; here it is a build error.
    for u, v, data in graph.edges(data=True):
        weight = data.get("latency_ms")
        if not isinstance(weight, float) or not math.isfinite(weight) or weight < 0:
            raise ConfigError(
                f"graph edge {u!r} -> {v!r} has latency_ms={weight!r}; every edge needs "
                "a finite weight >= 0 (use build_graph)"
            )


@dataclass(frozen=True)
class SplitPath:
    """Result of :func:`shortest_split`.

    Attributes
    ----------
    split : int
        Best split s (stages run on the edge).
    expected_latency_ms : float
        Length of the shortest path, E[T(θ, s)] in ms.
    path : tuple of str
        Vertices from ``"input"`` to ``"output"``.
    """

    split: int
    expected_latency_ms: float
    path: tuple[str, ...]


def build_graph(
    profile: Profile, link: Link, exit_probs: object, active: object
) -> nx.DiGraph:
    """Build the split DAG of one threshold configuration.

    Vertices: ``"input"``, ``"stage_<i>"`` (after stage i, 1-based),
    ``"branch_<b>"`` for each active branch (0-based) and ``"output"``.
    Every edge has ``latency_ms`` and ``kind`` ("stage", "branch" or "cut");
    cut edges also carry ``split``.

    Parameters
    ----------
    profile : Profile
    link : Link
    exit_probs : array-like, shape (B,)
        q_b of each branch (ignored where inactive).
    active : array-like of bool, shape (B,)
        Whether branch b has a threshold.

    Returns
    -------
    networkx.DiGraph

    Raises
    ------
    ConfigError
        On wrong shapes or invalid probabilities.

    Examples
    --------
    >>> p = Profile(stage_names=("a", "b"), stage_edge_ms=[1.0, 2.0],
    ...             stage_cloud_ms=[0.0, 0.5], branch_after_stage=(1,),
    ...             branch_edge_ms=[0.5], split_bytes=[1000, 1000, 4],
    ...             offload_overhead_ms=1.0)
    >>> g = build_graph(p, Link(uplink_mbps=8.0, rtt_ms=10.0), [0.5], [True])
    >>> list(nx.topological_sort(g))[:3]
    ['input', 'stage_1', 'branch_0']
    """
    if not isinstance(profile, Profile) or not isinstance(link, Link):
        raise ConfigError(
            "build_graph expects (Profile, Link, ...), got "
            f"({type(profile).__name__}, {type(link).__name__}, ...)"
        )
    probs, flags = _exit_config(profile, exit_probs, active)
    n_stages = profile.n_stages
    branches_after = {
        stage: [b for b, k in enumerate(profile.branch_after_stage) if k == stage and flags[b]]
        for stage in range(n_stages + 1)
    }
    cloud_after_ms = [
        float(sum(profile.stage_cloud_ms[split:])) for split in range(n_stages + 1)
    ]
    graph = nx.DiGraph()
    graph.add_node(INPUT, stage=0)
    graph.add_node(OUTPUT)
    exited = 0.0  # Σ q_b over active branches passed so far

    def reach() -> float:
        # Clamped: q_b summing to 1 can leave 1 - Σ q_b at -1e-16, and Dijkstra
        # needs weights >= 0.
        return max(0.0, 1.0 - exited)

    point = INPUT  # the split point after the current stage
    for split in range(n_stages + 1):
        if split > 0:
            vertex = _stage_vertex(split)
            graph.add_node(vertex, stage=split)
            graph.add_edge(
                point,
                vertex,
                latency_ms=reach() * float(profile.stage_edge_ms[split - 1]),
                kind="stage",
            )
            point = vertex
        for b in branches_after[split]:
            vertex = f"branch_{b}"
            graph.add_node(vertex, branch=b, stage=split)
            # Reach of stage k_b: exits strictly before k_b, i.e. before this branch.
            graph.add_edge(
                point, vertex, latency_ms=reach() * float(profile.branch_edge_ms[b]),
                kind="branch",
            )
            exited += float(probs[b])
            point = vertex
        if split < n_stages:
            weight = reach() * (
                profile.offload_overhead_ms
                + link.transfer_ms(float(profile.wire_bytes[split]))
                + link.rtt_ms
                + cloud_after_ms[split]
            )
        else:
            weight = 0.0
        # Every path crosses exactly one cut edge, so the per-request fixed edge time rides on it.
        weight += profile.edge_fixed_ms
        graph.add_edge(point, OUTPUT, latency_ms=float(weight), kind="cut", split=split)
    return graph


def shortest_split(graph: nx.DiGraph) -> SplitPath:
    """Minimum-expected-latency split of a graph from :func:`build_graph`.

    Parameters
    ----------
    graph : networkx.DiGraph
        Built by :func:`build_graph`.

    Returns
    -------
    SplitPath

    Raises
    ------
    ConfigError
        If an edge lacks a valid ``latency_ms``, or there is no path from
        ``"input"`` to ``"output"``.

    Examples
    --------
    >>> p = Profile(stage_names=("a", "b"), stage_edge_ms=[1.0, 2.0],
    ...             stage_cloud_ms=[0.0, 0.5], branch_after_stage=(1,),
    ...             branch_edge_ms=[0.5], split_bytes=[1000, 1000, 4],
    ...             offload_overhead_ms=1.0)
    >>> best = shortest_split(build_graph(p, Link(uplink_mbps=8.0, rtt_ms=10.0), [0.5], [True]))
    >>> best.split, best.expected_latency_ms
    (2, 2.5)
    """
    if not isinstance(graph, nx.DiGraph) or INPUT not in graph or OUTPUT not in graph:
        raise ConfigError("shortest_split expects a graph from build_graph with input and output")
    _check_weights(graph)
    try:
        length_ms, path = nx.single_source_dijkstra(graph, INPUT, OUTPUT, weight="latency_ms")
    except nx.NetworkXNoPath as err:
        raise ConfigError("the graph has no path from input to output") from err
    split = graph.edges[path[-2], path[-1]]["split"]
    return SplitPath(split=int(split), expected_latency_ms=float(length_ms), path=tuple(path))
