"""Scission's prediction, vectorised: every system triple and every cut, filtered, the K fastest.

A configuration is a device system, an edge system and a cloud system and
two block indices x, y: the device runs blocks 0..x, the edge x+1..y, the
cloud the rest. Any tier may run nothing: x = -1 (the device uploads the
input), y = -1 (no edge), and there is no cloud once the device or the edge
finishes the model. That is Scission's enumeration, (L+1) + L(L+1)/2 cuts
per triple for L blocks (:func:`enumerate_cuts`). The device is the data
source and keeps its system name when it computes nothing; an edge or cloud
that runs nothing has no system (``None``), so such a configuration is
listed once, not once per unused system.

Latency = the used tiers' block times + for each hop crossed ping + bytes /
bandwidth (device -> edge with the device's output, or the input; edge ->
cloud with the edge's output; device -> cloud when there is no edge). The
upload figure is the bytes leaving the device plus those leaving the edge,
in decimal MB. Scission sizes an upload by whether the tier above had
non-zero *time*; here a tier counts by whether it runs blocks, which only
differs for blocks benchmarked at 0 ms (docs/tiers.md).

Instead of Scission's object per scenario, each triple is a handful of numpy
operations over prefix sums of block times (``benchmarks/predict.py``
measures it against a naive enumeration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from popex.errors import BenchmarkError
from popex.tiers.benchmark_file import BenchmarkSet, ModelBenchmark, SystemBenchmark
from popex.tiers.network import Network
from popex.tiers.query import DEFAULT_INPUT_MB, Query, TierCriteria

__all__ = ["TierPart", "Configuration", "enumerate_cuts", "format_line", "predict", "resolved_input_bytes", "NO_RESULTS"]

NO_RESULTS = "No results for the specified configuration"


@dataclass(frozen=True)
class TierPart:
    """What one tier does in a configuration: its system, its layer range (-1, -1 when idle), its time."""

    system: str | None
    first_layer: int
    last_layer: int
    compute_s: float
    first_block: int = -1
    last_block: int = -1

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: ``system``, ``first_layer``, ``last_layer``, ``compute_s``.

        Returns
        -------
        dict
        """
        return {"system": self.system, "first_layer": self.first_layer, "last_layer": self.last_layer,
                "compute_s": self.compute_s}


@dataclass(frozen=True)
class Configuration:
    """One predicted configuration and its cost."""

    latency_s: float
    upload_bytes: float
    transfer_s: float
    device: TierPart
    edge: TierPart
    cloud: TierPart

    @property
    def upload_mb(self) -> float:
        """Bytes leaving the device plus bytes leaving the edge, in decimal MB."""
        return self.upload_bytes / 1e6

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of ``--json``.

        Returns
        -------
        dict
        """
        return {"latency_s": self.latency_s, "upload_mb": self.upload_mb, "transfer_s": self.transfer_s,
                "device": self.device.to_dict(), "edge": self.edge.to_dict(), "cloud": self.cloud.to_dict()}


def format_line(rank: int, config: Configuration) -> str:
    """One result line exactly as Scission prints it.

    Parameters
    ----------
    rank : int
        1-based position.
    config : Configuration

    Returns
    -------
    str

    Examples
    --------
    >>> part = TierPart("raspi4", 0, 6, 1.0)
    >>> format_line(1, Configuration(9.01064, 2408700, 1.0, part, TierPart(None, -1, -1, 0.0),
    ...                              TierPart("6700k(GPU)", 7, 25, 0.1)))
    '[1] 9.0106s - 2.4087MB - Device(raspi4) = 0 - 6, Edge(None) = -1 - -1, Cloud(6700k(GPU)) = 7 - 25'
    """
    parts = ", ".join(f"{label}({part.system}) = {part.first_layer} - {part.last_layer}"
                      for label, part in (("Device", config.device), ("Edge", config.edge), ("Cloud", config.cloud)))
    return f"[{rank}] {round(config.latency_s, 4):.4f}s - {round(config.upload_mb, 4):.4f}MB - {parts}"


def enumerate_cuts(n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Every cut (x, y) of Scission, in its order: the device runs 0..x, the edge x+1..y (y = -1: no edge).

    Parameters
    ----------
    n_blocks : int
        L, the number of blocks.

    Returns
    -------
    tuple of two int arrays, shape (n_cuts,)
        ``n_cuts = (L + 1) + L (L + 1) / 2``.

    Examples
    --------
    >>> x, y = enumerate_cuts(2)
    >>> list(zip(x.tolist(), y.tolist()))
    [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1)]
    """
    xs, ys = [], []
    for x in range(-1, n_blocks):
        ys_x = [-1] + list(range(x + 1, n_blocks))
        xs.extend([x] * len(ys_x))
        ys.extend(ys_x)
    return np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)


@dataclass(frozen=True)
class _Cuts:
    """The per-cut quantities that do not depend on the systems."""

    n_blocks: int
    x: np.ndarray
    y: np.ndarray
    device_used: np.ndarray
    edge_used: np.ndarray
    cloud_used: np.ndarray
    cloud_start: np.ndarray
    first_layer: dict[str, np.ndarray]
    last_layer: dict[str, np.ndarray]


def _cuts(model: ModelBenchmark) -> _Cuts:
    n = len(model.blocks)
    x, y = enumerate_cuts(n)
    in_layer = np.asarray([b.input_layer for b in model.blocks], dtype=np.int64)
    out_layer = np.asarray([b.output_layer for b in model.blocks], dtype=np.int64)
    device_used, edge_used = x >= 0, y >= 0
    cloud_used = (x != n - 1) & (y != n - 1)
    cloud_start = np.maximum(x, y) + 1
    safe = np.minimum(cloud_start, n - 1)
    first = {"device": np.where(device_used, in_layer[0], -1),
             "edge": np.where(edge_used, in_layer[np.minimum(x + 1, n - 1)], -1),
             "cloud": np.where(cloud_used, in_layer[safe], -1)}
    last = {"device": np.where(device_used, out_layer[np.maximum(x, 0)], -1),
            "edge": np.where(edge_used, out_layer[np.maximum(y, 0)], -1),
            "cloud": np.where(cloud_used, out_layer[n - 1], -1)}
    return _Cuts(n_blocks=n, x=x, y=y, device_used=device_used, edge_used=edge_used, cloud_used=cloud_used,
                 cloud_start=cloud_start, first_layer=first, last_layer=last)


def _prefix_s(model: ModelBenchmark) -> np.ndarray:
    """P[i] = seconds of blocks 0..i-1 (P[0] = 0): Scission sums seconds, so convert before summing."""
    return np.concatenate(([0.0], np.cumsum([b.time_ms / 1000 for b in model.blocks])))


def _layer_mask(criteria: TierCriteria, first: np.ndarray, last: np.ndarray) -> np.ndarray:
    mask = np.ones(first.shape, dtype=bool)
    for layer in criteria.layers_in:
        mask &= (first <= layer) & (layer <= last)
    for layer in criteria.layers_out:
        mask &= ~((first <= layer) & (layer <= last))
    return mask


def _system_ok(criteria: TierCriteria, system: str | None) -> bool:
    return ((not criteria.systems_in or system in criteria.systems_in)
            and (not criteria.systems_out or system not in criteria.systems_out))


def resolved_input_bytes(bench: BenchmarkSet, query: Query) -> float:
    """The bytes a device uploads when it computes nothing: ``-i``, else the files' ``input_bytes``, else 0.15 MB.

    Parameters
    ----------
    bench : BenchmarkSet
    query : Query

    Returns
    -------
    float
    """
    if query.input_bytes is not None:
        return float(query.input_bytes)
    recorded = [s.models[query.model].input_bytes for s in bench.tier("device")
                if query.model in s.models and s.models[query.model].input_bytes is not None]
    return float(recorded[0]) if recorded else DEFAULT_INPUT_MB * 1000 * 1000


def _hop_arrays(network: Network, source: str | None, destination: str | None) -> tuple[float, float]:
    """(ping_s, bytes_per_s) of a hop; NaN where the file lacks it (an error only if a kept row needs it)."""
    if source is None or destination is None or (source, destination) not in network.hops:
        return float("nan"), float("nan")
    hop = network.hops[(source, destination)]
    return hop.ping_ms / 1000, float(hop.bytes_per_s)


def _systems(bench: BenchmarkSet, tier: str, model: str) -> list[SystemBenchmark | None]:
    found = [s for s in bench.tier(tier) if model in s.models]
    if tier == "device" and not found:
        raise BenchmarkError(f"no device system has benchmarked model {model!r} (models: "
                             f"{', '.join(bench.model_names()) or 'none'}); the device is the data source")
    return found or [None]  # no edge (cloud) system: configurations without one remain


def predict(bench: BenchmarkSet, network: Network, query: Query) -> list[Configuration]:
    """The ``query.n_results`` fastest configurations that meet the query, fastest first.

    Parameters
    ----------
    bench : BenchmarkSet
        The systems (layouts already checked to agree).
    network : Network
        Ping and bandwidth of the hops.
    query : Query

    Returns
    -------
    list of Configuration
        Empty when no configuration passes. Ties keep enumeration order
        (device, edge, cloud systems in file order, then Scission's cut order).

    Raises
    ------
    BenchmarkError
        No system has the model, or the network file lacks a pair that a
        configuration meeting the query needs.
    """
    if query.model not in bench.model_names():
        raise BenchmarkError(f"no benchmark of model {query.model!r} in {bench.directory or 'the files'} "
                             f"(models: {', '.join(bench.model_names())})")
    devices, edges, clouds = (_systems(bench, tier, query.model) for tier in ("device", "edge", "cloud"))
    reference = devices[0].models[query.model]
    cuts = _cuts(reference)
    out_bytes = np.asarray([b.output_bytes for b in reference.blocks], dtype=np.float64)
    input_bytes = resolved_input_bytes(bench, query)
    n = len(reference.blocks)
    dev_bytes = np.where(cuts.device_used, out_bytes[np.maximum(cuts.x, 0)], input_bytes)
    dev_bytes = np.where(cuts.edge_used | cuts.cloud_used, dev_bytes, 0.0)
    edge_bytes = np.where(cuts.edge_used & cuts.cloud_used, out_bytes[np.maximum(cuts.y, 0)], 0.0)
    layer_ok = (_layer_mask(query.device, cuts.first_layer["device"], cuts.last_layer["device"])
                & _layer_mask(query.edge, cuts.first_layer["edge"], cuts.last_layer["edge"])
                & _layer_mask(query.cloud, cuts.first_layer["cloud"], cuts.last_layer["cloud"]))
    base_ok = layer_ok.copy()
    for criteria, used, n_bytes in ((query.device, cuts.device_used, dev_bytes), (query.edge, cuts.edge_used, edge_bytes),
                                    (query.cloud, cuts.cloud_used, None)):
        if criteria.systems_in or criteria.systems_out:
            base_ok &= used
        if criteria.upload_limit_bytes is not None and n_bytes is not None:
            base_ok &= n_bytes <= criteria.upload_limit_bytes
    x1 = cuts.x + 1
    ys = np.maximum(cuts.y, 0) + 1
    rows = []  # (latency, transfer, device_s, edge_s, cloud_s, keep, (d, e, c))
    for d in devices:
        if not _system_ok(query.device, d.system):
            continue
        pd = _prefix_s(d.models[query.model])
        device_s = pd[x1]
        for ei, e in enumerate(edges):
            edge_keep = np.where(cuts.edge_used, e is not None and _system_ok(query.edge, e.system),
                                 ei == 0 and _system_ok(query.edge, None))
            pe = _prefix_s(e.models[query.model]) if e is not None else np.zeros(n + 1)
            edge_s = np.where(cuts.edge_used, pe[ys] - pe[x1], 0.0)
            for ci, c in enumerate(clouds):
                cloud_keep = np.where(cuts.cloud_used, c is not None and _system_ok(query.cloud, c.system),
                                      ci == 0 and _system_ok(query.cloud, None))
                keep = base_ok & edge_keep & cloud_keep
                if not keep.any():
                    continue
                pc = _prefix_s(c.models[query.model]) if c is not None else np.zeros(n + 1)
                cloud_s = np.where(cuts.cloud_used, pc[n] - pc[np.minimum(cuts.cloud_start, n)], 0.0)
                compute_s = device_s + edge_s + cloud_s
                for criteria, tier_s in ((query.device, device_s), (query.edge, edge_s), (query.cloud, cloud_s)):
                    if criteria.time_limit_s is not None:
                        keep = keep & (tier_s <= criteria.time_limit_s)
                    if criteria.time_limit_percent is not None:
                        share = np.divide(tier_s, compute_s, out=np.zeros_like(tier_s), where=compute_s > 0) * 100  # Scission's order
                        keep = keep & (share <= criteria.time_limit_percent)
                transfer_s = _transfer_s(network, cuts, d, e, c, dev_bytes, edge_bytes, keep)
                rows.append((compute_s + transfer_s, transfer_s, device_s, edge_s, cloud_s, keep, (d, e, c)))
    return _top(rows, cuts, dev_bytes + edge_bytes, query.n_results)


def _transfer_s(network: Network, cuts: _Cuts, d: SystemBenchmark, e: SystemBenchmark | None,
                c: SystemBenchmark | None, dev_bytes: np.ndarray, edge_bytes: np.ndarray,
                keep: np.ndarray) -> np.ndarray:
    names = (d.system, e.system if e else None, c.system if c else None)
    ping_de, bw_de = _hop_arrays(network, names[0], names[1])
    ping_ec, bw_ec = _hop_arrays(network, names[1], names[2])
    ping_dc, bw_dc = _hop_arrays(network, names[0], names[2])
    need = ((cuts.edge_used, names[0], names[1], ping_de), (cuts.edge_used & cuts.cloud_used, names[1], names[2], ping_ec),
            (~cuts.edge_used & cuts.cloud_used, names[0], names[2], ping_dc))
    for needed, source, destination, ping in need:
        if np.isnan(ping) and (needed & keep).any():
            network.hop(source, destination)  # raises, naming the pair
    with np.errstate(invalid="ignore"):
        first = np.where(cuts.edge_used, ping_de + dev_bytes / bw_de,
                         np.where(cuts.cloud_used, ping_dc + dev_bytes / bw_dc, 0.0))
        second = np.where(cuts.edge_used & cuts.cloud_used, ping_ec + edge_bytes / bw_ec, 0.0)
    return first + second


def _top(rows: list, cuts: _Cuts, upload_bytes: np.ndarray, n_results: int) -> list[Configuration]:
    if not rows:
        return []
    latency = np.stack([r[0] for r in rows])
    keep = np.stack([r[5] for r in rows])
    flat = np.where(keep, latency, np.inf).ravel()
    n_kept = int(keep.sum())
    if n_kept == 0 or n_results <= 0:
        return []
    k = min(n_results, n_kept)
    order = np.argsort(flat, kind="stable")[:k]
    results = []
    n_cuts = latency.shape[1]
    for index in order.tolist():
        row, cut = divmod(index, n_cuts)
        total, transfer, device_s, edge_s, cloud_s, _, (d, e, c) = rows[row]

        def part(tier: str, system: SystemBenchmark | None, used: bool, seconds: np.ndarray,
                 first_block: int, last_block: int) -> TierPart:
            return TierPart(system=(system.system if system is not None else None) if used or tier == "device"
                            else None, first_layer=int(cuts.first_layer[tier][cut]),
                            last_layer=int(cuts.last_layer[tier][cut]), compute_s=float(seconds[cut]),
                            first_block=first_block if used else -1, last_block=last_block if used else -1)

        x, y = int(cuts.x[cut]), int(cuts.y[cut])
        results.append(Configuration(
            latency_s=float(total[cut]), upload_bytes=float(upload_bytes[cut]), transfer_s=float(transfer[cut]),
            device=part("device", d, bool(cuts.device_used[cut]), device_s, 0, x),
            edge=part("edge", e, bool(cuts.edge_used[cut]), edge_s, x + 1, y),
            cloud=part("cloud", c, bool(cuts.cloud_used[cut]), cloud_s, int(cuts.cloud_start[cut]), cuts.n_blocks - 1)))
    return results
