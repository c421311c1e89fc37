"""Benchmark a POPEX model's stages on this machine, as a ``popex-benchmark/1`` entry.

Each stage of the model is one block (layer numbers = 0-based stage
indices, so Scission's ``-d 3`` means "stage 4 runs on the device"). Stages
and branches run with ONNX Runtime, exactly as the tiers run them
(:func:`popex.runtime.profiler.time_stages`: warm-up, then repeats
interleaved across stages, the median kept). The whole chain is timed the
same way, so that the file records how far the sum of the blocks is from
the whole model (the additivity error a per-block prediction rests on).
``slowdown`` scales every time, to stand for a slower system
(``configs/devices.yaml`` holds measured factors).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import numpy as np

from popex.errors import BenchmarkError
from popex.runtime.model_files import ONNX_DIR, load_model_dir, model_form
from popex.runtime.onnx_model import MANIFEST_FILE
from popex.tiers.benchmark_file import TIERS, Block, BranchBenchmark, ModelBenchmark, SystemBenchmark
from popex.tiers.onnx_cost import graph_cost

__all__ = ["ModelMeasurement", "benchmark_model", "merge_into"]


@dataclass(frozen=True)
class ModelMeasurement:
    """A model benchmarked here: its entry for the file, and how the blocks add up."""

    name: str
    model: ModelBenchmark
    whole_model_ms: float
    sum_of_blocks_ms: float

    @property
    def additivity_error(self) -> float:
        """(sum of blocks - whole model) / whole model: > 0 when blocks timed alone cost more."""
        return float(self.model.additivity_error or 0.0)


def _whole_model_ms(net, *, n_warmup: int, n_repeats: int) -> float:
    x = np.zeros((1, *net.input_shape), dtype=np.float32)
    samples = []
    for repeat in range(-n_warmup, n_repeats):
        started = time.perf_counter_ns()
        net.run_stages(x)
        if repeat >= 0:
            samples.append((time.perf_counter_ns() - started) / 1e6)
    return statistics.median(samples)


def benchmark_model(model_dir: str | os.PathLike[str], *, name: str, n_repeats: int = 30, n_warmup: int = 5,
                    slowdown: float = 1.0, n_threads: int = 1, progress: bool = False) -> ModelMeasurement:
    """Time every stage and branch of a model directory here, with its output bytes, FLOPs and parameters.

    Parameters
    ----------
    model_dir : path
        ONNX form, or spec.json + weights.safetensors (exported to ONNX first, as the tiers do).
    name : str
        The model's name in the benchmark file.
    n_repeats, n_warmup : int
        Timed runs (the median is kept) and untimed runs first.
    slowdown : float
        Every time is multiplied by it (an emulated slower system); > 0.
    n_threads : int
        ONNX Runtime intra-op threads.
    progress : bool

    Returns
    -------
    ModelMeasurement

    Raises
    ------
    BenchmarkError
        A bad repeat count or slowdown; the model loader's errors for a bad directory.
    """
    from popex.runtime.profiler import time_stages

    if n_repeats < 1 or n_warmup < 0:
        raise BenchmarkError(f"--repeats must be >= 1 (got {n_repeats}) and warm-up >= 0 (got {n_warmup})")
    if not (slowdown > 0 and np.isfinite(slowdown)):
        raise BenchmarkError(f"--emulate-slowdown must be a finite factor > 0, got {slowdown!r}")
    directory = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="popex-bench-") as scratch:
        export_to = Path(scratch) / ONNX_DIR
        loaded = load_model_dir(directory, n_threads=n_threads, export_to=export_to)
        if model_form(directory) == "onnx":
            base = directory
        else:
            base = directory / ONNX_DIR if (directory / ONNX_DIR / MANIFEST_FILE).is_file() else export_to
        manifest = loaded.net.spec
        stage_costs = [graph_cost((base / rel).read_bytes()) for rel in manifest["stages"]]
        branch_costs = [graph_cost((base / b["file"]).read_bytes()) for b in manifest.get("branches", [])]
        net = loaded.net
        timings = time_stages(net, n_warmup=n_warmup, n_repeats=n_repeats, n_threads=n_threads, progress=progress)
        whole_ms = _whole_model_ms(net, n_warmup=n_warmup, n_repeats=n_repeats) * slowdown
    blocks = tuple(Block(input_layer=i, output_layer=i, time_ms=float(timings.stage_ms[i]) * slowdown,
                         output_bytes=int(timings.split_bytes[i + 1]), flops=cost.flops, params=cost.params,
                         name=timings.stage_names[i]) for i, cost in enumerate(stage_costs))
    branches = tuple(BranchBenchmark(after_block=k - 1, time_ms=float(timings.branch_ms[b]) * slowdown,
                                     flops=branch_costs[b].flops, params=branch_costs[b].params)
                     for b, k in enumerate(net.branch_after_stage))
    sum_ms = sum(b.time_ms for b in blocks)
    error = (sum_ms - whole_ms) / whole_ms if whole_ms else 0.0
    model = ModelBenchmark(blocks=blocks, input_bytes=int(timings.split_bytes[0]), whole_model_ms=whole_ms,
                           n_repeats=n_repeats, additivity_error=error, branches=branches)
    return ModelMeasurement(name=name, model=model, whole_model_ms=whole_ms, sum_of_blocks_ms=sum_ms)


def merge_into(existing: SystemBenchmark | None, measurement: ModelMeasurement, *, tier: str, system: str,
               note: str | None = None) -> SystemBenchmark:
    """A system's benchmark with ``measurement`` added (or replacing the model's previous entry).

    Parameters
    ----------
    existing : SystemBenchmark or None
        The file already there, if any; it must be of the same tier and system.
    measurement : ModelMeasurement
    tier, system : str
    note : str, optional

    Returns
    -------
    SystemBenchmark

    Raises
    ------
    BenchmarkError
        The tier is unknown, or the existing file is another system's.
    """
    if tier not in TIERS:
        raise BenchmarkError(f"--tier must be one of {', '.join(TIERS)}, got {tier!r}")
    if existing is not None and (existing.tier, existing.system) != (tier, system):
        raise BenchmarkError(f"{existing.source} holds the {existing.tier} system {existing.system!r}, not the {tier} "
                             f"system {system!r}: choose another --out")
    models = dict(existing.models) if existing is not None else {}
    models[measurement.name] = measurement.model
    return SystemBenchmark(tier=tier, system=system, models=MappingProxyType(models),
                           note=note if note is not None else (existing.note if existing else None),
                           host=os.uname().nodename)
