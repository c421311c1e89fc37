"""The profiler: per-stage and per-branch time, bytes at each split.

Every stage is timed on its real input (the output of the previous stage
for one image) with ONNX Runtime, after a warm-up, with the thread count its
sessions were built with; repeats are interleaved across stages so that a burst
of load on a shared machine spreads over all stages instead of biasing one.
Medians go into the latency model; the 10th-90th percentile spread is kept
for people to judge the measurement.

The same stages timed per batch size (:mod:`popex.runtime.batch_profile`,
the batch-aware plan's inference time matrix) are stored by
:func:`save_profile` in ``profile.json`` under ``"batch"``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from tqdm import tqdm

from popex.decision.latency import Profile
from popex.errors import ConfigError, ProfileError

if TYPE_CHECKING:
    from popex.runtime.batch_profile import BatchTimings
    from popex.runtime.onnx_model import OnnxModel

__all__ = [
    "StageTimings",
    "time_stages",
    "build_profile",
    "save_profile",
    "load_profile",
    "plot_profile",
    "DEFAULT_OFFLOAD_OVERHEAD_MS",
]

# O (DESIGN.md §3) that `popex profile` and `popex plan` assume without a measurement; the edge
# service starts from its own initial_offload_overhead_ms and then measures O.
DEFAULT_OFFLOAD_OVERHEAD_MS = 2.0


@dataclass(frozen=True, eq=False)
class StageTimings:
    """Measured times of one network on one machine (batch of 1).

    Attributes
    ----------
    stage_names : tuple of str, length N
    stage_ms, stage_spread_ms : np.ndarray, shape (N,)
        Median time of each stage and the spread (90th minus 10th percentile).
    branch_ms, branch_spread_ms : np.ndarray, shape (B,)
        The same for each branch, on the output of its stage.
    split_bytes : np.ndarray of int64, shape (N+1,)
        fp32 bytes of the tensor at each split (0 = preprocessed input).
    n_repeats : int
    n_threads : int
    """

    stage_names: tuple[str, ...]
    stage_ms: np.ndarray
    stage_spread_ms: np.ndarray
    branch_ms: np.ndarray
    branch_spread_ms: np.ndarray
    split_bytes: np.ndarray
    n_repeats: int
    n_threads: int

    def scaled(self, factor: float) -> StageTimings:
        """These timings on a device ``factor`` times slower (edge-device emulation).

        >>> t = StageTimings(("s1",), np.array([1.0]), np.array([0.1]), np.zeros(0), np.zeros(0),
        ...                  np.array([4, 0]), n_repeats=1, n_threads=1)
        >>> t.scaled(3.0).stage_ms.tolist()
        [3.0]
        """
        if not factor > 0:
            raise ConfigError(f"slowdown factor must be positive, got {factor!r}")
        return dataclasses.replace(
            self,
            stage_ms=self.stage_ms * factor,
            stage_spread_ms=self.stage_spread_ms * factor,
            branch_ms=self.branch_ms * factor,
            branch_spread_ms=self.branch_spread_ms * factor,
        )


def time_stages(
    net: OnnxModel,
    *,
    n_warmup: int = 5,
    n_repeats: int = 30,
    n_threads: int | None = None,
    progress: bool = False,
) -> StageTimings:
    """Time every stage and branch of ``net`` for one input.

    Parameters
    ----------
    net : OnnxModel
        The stage executor (sessions built with the tier's thread count).
    n_warmup : int
        Untimed runs first (allocator, oneDNN kernels selection).
    n_repeats : int
        Timed runs per stage and branch; the median is reported.
    n_threads : int, optional
        The intra-op threads the sessions were built with, recorded in the
        timings (default 1, the tiers' default).
    progress : bool
        Show a progress bar over the repeats.

    Returns
    -------
    StageTimings
    """
    if n_warmup < 0 or n_repeats < 1:
        raise ConfigError(f"need n_warmup >= 0 and n_repeats >= 1, got {n_warmup}, {n_repeats}")
    n_stages, n_branches = net.n_stages, net.n_branches
    inputs = [np.zeros((1, *net.input_shape), dtype=np.float32)]
    for i in range(n_stages):
        inputs.append(net.run_stages(inputs[-1], start=i, stop=i + 1))
    split_bytes = np.array([x.size * 4 for x in inputs], dtype=np.int64)
    stage_samples = np.zeros((n_repeats, n_stages))
    branch_samples = np.zeros((n_repeats, n_branches))
    for repeat in tqdm(range(-n_warmup, n_repeats), desc="profiling", disable=not progress):
        for i in range(n_stages):
            started = time.perf_counter_ns()
            net.run_stages(inputs[i], start=i, stop=i + 1)
            if repeat >= 0:
                stage_samples[repeat, i] = (time.perf_counter_ns() - started) / 1e6
        for b, after_stage in enumerate(net.branch_after_stage):
            started = time.perf_counter_ns()
            net.run_branch(b, inputs[after_stage])
            if repeat >= 0:
                branch_samples[repeat, b] = (time.perf_counter_ns() - started) / 1e6
    used_threads = 1 if n_threads is None else n_threads

    def spread(samples: np.ndarray) -> np.ndarray:
        if samples.shape[1] == 0:
            return np.zeros(0)
        return np.percentile(samples, 90, axis=0) - np.percentile(samples, 10, axis=0)

    return StageTimings(
        stage_names=tuple(net.stage_names),
        stage_ms=np.median(stage_samples, axis=0),
        stage_spread_ms=spread(stage_samples),
        branch_ms=np.median(branch_samples, axis=0) if n_branches else np.zeros(0),
        branch_spread_ms=spread(branch_samples),
        split_bytes=split_bytes,
        n_repeats=n_repeats,
        n_threads=used_threads,
    )


def build_profile(
    edge: StageTimings,
    *,
    branch_after_stage: Sequence[int],
    cloud_stage_ms: Sequence[float] | None = None,
    offload_overhead_ms: float,
    cloud_speedup: float,
    payload_overhead_bytes: int = 0,
    edge_fixed_ms: float = 0.0,
    wire_ratio: float = 1.0,
) -> Profile:
    """Combine edge timings, cloud timings and the transport overhead into a :class:`Profile`.

    Parameters
    ----------
    edge : StageTimings
        Measured on the edge.
    branch_after_stage : sequence of int
        k_b of each branch (``net.branch_after_stage``).
    cloud_stage_ms : sequence of float, optional
        Measured on the cloud. When absent, the cloud is *assumed* to run each
        stage ``cloud_speedup`` times faster than the edge; callers print that.
    offload_overhead_ms : float
        O of DESIGN.md §3: serialisation, HTTP and deserialisation per offload.
    cloud_speedup : float
        Used only without ``cloud_stage_ms``. No default here: the edge
        service and the offline ``popex`` commands assume different values,
        each from its own one place.
    payload_overhead_bytes : int
        Added to every split's bytes (the wire format's header).
    edge_fixed_ms : float
        Edge time of every request before stage 1 (decode, preprocessing).
    wire_ratio : float
        Bytes on the wire per payload byte (below 1 with compression).

    Raises
    ------
    ProfileError
        If the cloud times do not have one value per stage.
    """
    n_stages = len(edge.stage_ms)
    if cloud_stage_ms is None:
        if not cloud_speedup > 0:
            raise ConfigError(f"cloud_speedup must be positive, got {cloud_speedup}")
        cloud = edge.stage_ms / cloud_speedup
    else:
        cloud = np.asarray(cloud_stage_ms, dtype=np.float64)
        if cloud.shape != (n_stages,):
            raise ProfileError(f"cloud profile has {cloud.size} stage times, the model has {n_stages} stages")
    return Profile(
        stage_names=edge.stage_names,
        stage_edge_ms=np.asarray(edge.stage_ms, dtype=np.float64),
        stage_cloud_ms=cloud,
        branch_after_stage=tuple(int(k) for k in branch_after_stage),
        branch_edge_ms=np.asarray(edge.branch_ms, dtype=np.float64),
        split_bytes=edge.split_bytes + int(payload_overhead_bytes),
        offload_overhead_ms=float(offload_overhead_ms),
        edge_fixed_ms=float(edge_fixed_ms),
        wire_ratio=float(wire_ratio),
    )


def save_profile(profile: Profile, out_dir: str | os.PathLike[str], *, timings: StageTimings | None = None,
                 note: str | None = None, batch_timings: BatchTimings | None = None) -> dict[str, Path]:
    """Write ``profile.json`` (the Profile's dict, plus spreads, a note, the batch timings) and ``profile.csv``.

    Returns the paths written, by kind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = profile.to_dict()
    if timings is not None:
        data["measurement"] = {
            "n_repeats": timings.n_repeats,
            "n_threads": timings.n_threads,
            "stage_spread_ms": [float(v) for v in timings.stage_spread_ms],
            "branch_spread_ms": [float(v) for v in timings.branch_spread_ms],
        }
    if note:
        data["note"] = note
    if batch_timings is not None:
        data["batch"] = batch_timings.to_dict()
    json_path, csv_path = out_dir / "profile.json", out_dir / "profile.csv"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "index", "name", "after_stage", "edge_ms", "cloud_ms", "out_bytes"])
        writer.writerow(["input", 0, "input", "", "", "", int(profile.split_bytes[0])])
        for i, name in enumerate(profile.stage_names):
            writer.writerow(["stage", i + 1, name, "", f"{profile.stage_edge_ms[i]:.6f}",
                             f"{profile.stage_cloud_ms[i]:.6f}", int(profile.split_bytes[i + 1])])
        for b, k in enumerate(profile.branch_after_stage):
            writer.writerow(["branch", b, f"branch{b}", k, f"{profile.branch_edge_ms[b]:.6f}", "", ""])
    return {"json": json_path, "csv": csv_path}


def load_profile(path: str | os.PathLike[str]) -> Profile:
    """Read a ``profile.json`` written by :func:`save_profile` (extra keys are ignored)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ProfileError(f"cannot read profile {str(path)!r}: {err}") from err
    return Profile.from_dict(data)


def plot_profile(profile: Profile, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Scission-style figure: per-stage time bars (edge, cloud) and the bytes at each split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_stages = len(profile.stage_names)
    x = np.arange(1, n_stages + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * n_stages + 3), 4.2))
    ax.bar(x - 0.2, profile.stage_edge_ms, width=0.4, label="edge (ms)", color="#4C72B0")
    ax.bar(x + 0.2, profile.stage_cloud_ms, width=0.4, label="cloud (ms)", color="#DD8452")
    for b, k in enumerate(profile.branch_after_stage):
        ax.bar(k + 0.45, profile.branch_edge_ms[b], width=0.15, color="#55A868",
               label="branch on edge (ms)" if b == 0 else None)
    ax.set_xticks(x, [f"{i}\n{name}" for i, name in zip(x, profile.stage_names)], fontsize=8)
    ax.set_xlabel("stage")
    ax.set_ylabel("time per image (ms)")
    ax2 = ax.twinx()
    ax2.plot(np.arange(0, n_stages + 1), profile.split_bytes / 1024, "k.-", label="bytes at split (KiB)")
    ax2.set_ylabel("tensor crossing the link at split s (KiB)")
    ax2.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper right", fontsize=8)
    ax.set_title(title or "Per-stage time and output size")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
