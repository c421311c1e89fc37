"""Multi-tier benchmark files (``popex-benchmark/1``): one JSON file per system, never a pickle.

A file says how long each block of each model takes on one system of one
tier, and how many bytes leave the block::

    {"format": "popex-benchmark/1", "tier": "device", "system": "raspi4",
     "models": {"vgg19": {"input_bytes": 150000,
       "blocks": [{"input_layer": 0, "output_layer": 1, "time_ms": 70.589,
                   "output_bytes": 12845184, "flops": null, "params": null}, ...]}}}

Blocks are in execution order and name *layer numbers* (Scission's
convention), not block indices. Everything is checked when a file is read,
because the predictor trusts it afterwards: the format tag, the tier, finite
non-negative numbers, layer ranges that are contiguous and increasing. A
directory of files is one :class:`BenchmarkSet`; files that give the same
model different block layouts are refused, naming both files (Scission's
predictor silently misaligns blocks then). Scission's own ``.dat`` files, and
anything else that is a pickle, are refused by their first bytes, never
unpickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from popex.checks import pickled_kind
from popex.errors import BenchmarkError
from popex.runtime.devices import TIERS

__all__ = [
    "BENCHMARK_FORMAT",
    "TIERS",
    "Block",
    "BranchBenchmark",
    "ModelBenchmark",
    "SystemBenchmark",
    "BenchmarkSet",
    "parse_benchmark",
    "load_benchmark_file",
    "benchmark_to_dict",
    "write_benchmark_file",
    "load_benchmark_dir",
]

BENCHMARK_FORMAT = "popex-benchmark/1"
_TOP_KEYS = {"format", "tier", "system", "models"}
_TOP_OPTIONAL = {"note", "host"}
_MODEL_OPTIONAL = {"input_bytes", "whole_model_ms", "n_repeats", "additivity_error", "branches"}
_BRANCH_KEYS = {"after_block", "time_ms"}
_BRANCH_OPTIONAL = {"flops", "params"}
_BLOCK_KEYS = {"input_layer", "output_layer", "time_ms", "output_bytes"}
_BLOCK_OPTIONAL = {"flops", "params", "name"}
#: Largest benchmark file read (a few hundred models of a few hundred blocks is well below).
MAX_BENCHMARK_FILE_BYTES = 64 * 1024 * 1024


def _fail(source: str, where: str, message: str) -> BenchmarkError:
    return BenchmarkError(f"{source}: {where}: {message}" if where else f"{source}: {message}")


def _count(value: Any, *, source: str, where: str, nullable: bool = False) -> int | None:
    """A non-negative int (JSON integer; a float with no fraction is accepted, as Scission's sizes are)."""
    if value is None and nullable:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(source, where, f"must be a non-negative integer, got {value!r}")
    return value


def _time_ms(value: Any, *, source: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise _fail(source, where, f"must be a finite non-negative number of ms, got {value!r}")
    return float(value)


def _keys(entry: Any, required: set[str], optional: set[str], *, source: str, where: str) -> dict:
    if not isinstance(entry, dict):
        raise _fail(source, where, f"must be an object, got {type(entry).__name__}")
    missing = sorted(required - set(entry))
    unknown = sorted(set(entry) - required - optional)
    if missing or unknown:
        raise _fail(source, where, "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
    return entry


@dataclass(frozen=True)
class Block:
    """One benchmarked block: the layers it covers, its time, and the bytes of its output."""

    input_layer: int
    output_layer: int
    time_ms: float
    output_bytes: int
    flops: int | None = None
    params: int | None = None
    name: str | None = None


@dataclass(frozen=True)
class BranchBenchmark:
    """A side exit of an early-exit model (POPEX's extension): the block it follows (0-based) and its time."""

    after_block: int
    time_ms: float
    flops: int | None = None
    params: int | None = None


@dataclass(frozen=True)
class ModelBenchmark:
    """A model's blocks on one system, in execution order, and the bytes of its input if recorded."""

    blocks: tuple[Block, ...]
    input_bytes: int | None = None
    whole_model_ms: float | None = None
    n_repeats: int | None = None
    additivity_error: float | None = None
    branches: tuple[BranchBenchmark, ...] = ()

    @property
    def layout(self) -> tuple[tuple[int, int], ...]:
        """The (input_layer, output_layer) of every block: what two systems must agree on."""
        return tuple((b.input_layer, b.output_layer) for b in self.blocks)


@dataclass(frozen=True)
class SystemBenchmark:
    """One system of one tier: its models' benchmarks, and the file they came from (for messages)."""

    tier: str
    system: str
    models: Mapping[str, ModelBenchmark]
    source: str = "<memory>"
    note: str | None = None
    host: str | None = None


def _parse_block(entry: Any, *, source: str, where: str) -> Block:
    entry = _keys(entry, _BLOCK_KEYS, _BLOCK_OPTIONAL, source=source, where=where)
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise _fail(source, f"{where}.name", f"must be a string, got {name!r}")
    return Block(
        input_layer=_count(entry["input_layer"], source=source, where=f"{where}.input_layer"),
        output_layer=_count(entry["output_layer"], source=source, where=f"{where}.output_layer"),
        time_ms=_time_ms(entry["time_ms"], source=source, where=f"{where}.time_ms"),
        output_bytes=_count(entry["output_bytes"], source=source, where=f"{where}.output_bytes"),
        flops=_count(entry.get("flops"), source=source, where=f"{where}.flops", nullable=True),
        params=_count(entry.get("params"), source=source, where=f"{where}.params", nullable=True),
        name=name)


def _parse_model(entry: Any, *, source: str, where: str) -> ModelBenchmark:
    entry = _keys(entry, {"blocks"}, _MODEL_OPTIONAL, source=source, where=where)
    raw_blocks = entry["blocks"]
    if not isinstance(raw_blocks, list) or not raw_blocks:
        raise _fail(source, f"{where}.blocks", "must be a non-empty list")
    blocks = tuple(_parse_block(b, source=source, where=f"{where}.blocks[{i}]") for i, b in enumerate(raw_blocks))
    for i, block in enumerate(blocks):
        if block.output_layer < block.input_layer:
            raise _fail(source, f"{where}.blocks[{i}]", f"layer range {block.input_layer}..{block.output_layer} "
                                                        "decreases")
        if i and block.input_layer != blocks[i - 1].output_layer + 1:
            raise _fail(source, f"{where}.blocks[{i}]", f"layer ranges are not contiguous: block {i - 1} ends at "
                                                        f"layer {blocks[i - 1].output_layer}, block {i} starts at "
                                                        f"{block.input_layer} (expected {blocks[i - 1].output_layer + 1})")
    raw_branches = entry.get("branches", [])
    if not isinstance(raw_branches, list):
        raise _fail(source, f"{where}.branches", "must be a list")
    branches = []
    for i, raw in enumerate(raw_branches):
        here = f"{where}.branches[{i}]"
        raw = _keys(raw, _BRANCH_KEYS, _BRANCH_OPTIONAL, source=source, where=here)
        after = _count(raw["after_block"], source=source, where=f"{here}.after_block")
        if after >= len(blocks) - 1:
            raise _fail(source, f"{here}.after_block", f"must be a block before the last (0..{len(blocks) - 2}), "
                                                       f"got {after}")
        branches.append(BranchBenchmark(after_block=after, time_ms=_time_ms(raw["time_ms"], source=source,
                                                                            where=f"{here}.time_ms"),
                                        flops=_count(raw.get("flops"), source=source, where=f"{here}.flops",
                                                     nullable=True),
                                        params=_count(raw.get("params"), source=source, where=f"{here}.params",
                                                      nullable=True)))
    whole = entry.get("whole_model_ms")
    error = entry.get("additivity_error")
    n_repeats = entry.get("n_repeats")
    return ModelBenchmark(
        blocks=blocks,
        input_bytes=_count(entry.get("input_bytes"), source=source, where=f"{where}.input_bytes", nullable=True),
        whole_model_ms=None if whole is None else _time_ms(whole, source=source, where=f"{where}.whole_model_ms"),
        n_repeats=_count(n_repeats, source=source, where=f"{where}.n_repeats", nullable=True),
        additivity_error=None if error is None else _additivity(error, source=source, where=where),
        branches=tuple(branches))


def _additivity(value: Any, *, source: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, f"{where}.additivity_error", f"must be a finite number, got {value!r}")
    return float(value)


def _system_name(value: Any, *, source: str) -> str:
    # Names appear in network files and printed configurations: any printable text (``-`` and spaces
    # included, as in "6700k(GPU)" or "pi 4"), but no commas (the network CSV) and no surrounding blanks.
    if (not isinstance(value, str) or not value.strip() or value != value.strip() or "," in value
            or not value.isprintable()):
        raise _fail(source, "system", f"must be a printable name without commas or surrounding blanks, got {value!r}")
    return value


def parse_benchmark(data: bytes, *, source: str = "<memory>") -> SystemBenchmark:
    """Parse and check one benchmark file's bytes.

    Parameters
    ----------
    data : bytes
        The file's content (JSON, ``popex-benchmark/1``).
    source : str
        The file's name, put at the start of every message.

    Returns
    -------
    SystemBenchmark

    Raises
    ------
    BenchmarkError
        A pickle (named, never unpickled), not JSON, another format, a bad
        tier, a negative or non-finite number, layer ranges that are not
        contiguous and increasing; the message names the file and the place.

    Examples
    --------
    >>> text = (b'{"format": "popex-benchmark/1", "tier": "edge", "system": "vm 2", "models": {"m": {"blocks": '
    ...         b'[{"input_layer": 0, "output_layer": 3, "time_ms": 1.5, "output_bytes": 10}]}}}')
    >>> parse_benchmark(text).models["m"].layout
    ((0, 3),)
    >>> parse_benchmark(b"\\x80\\x04K.", source="edge-x.dat")
    Traceback (most recent call last):
    ...
    popex.errors.BenchmarkError: edge-x.dat: is a Python pickle: refused, never unpickled (convert it to popex-benchmark/1 JSON)
    """
    kind = pickled_kind(data)
    if kind:
        raise _fail(source, "", f"is {kind}: refused, never unpickled (convert it to {BENCHMARK_FORMAT} JSON)")
    try:
        content = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(source, "", f"is not {BENCHMARK_FORMAT} JSON ({err})") from err
    if not isinstance(content, dict) or content.get("format") != BENCHMARK_FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise _fail(source, "format", f"must be {BENCHMARK_FORMAT!r}, got {found!r}")
    content = _keys(content, _TOP_KEYS, _TOP_OPTIONAL, source=source, where="")
    if content["tier"] not in TIERS:
        raise _fail(source, "tier", f"must be one of {', '.join(TIERS)}, got {content['tier']!r}")
    models = content["models"]
    if not isinstance(models, dict) or not models:
        raise _fail(source, "models", "must be a non-empty object of model name -> benchmark")
    parsed = {}
    for name, entry in models.items():
        if not name or not name.isprintable():
            raise _fail(source, "models", f"model names must be printable and non-empty, got {name!r}")
        parsed[name] = _parse_model(entry, source=source, where=f"models.{name}")
    for key in ("note", "host"):
        if content.get(key) is not None and not isinstance(content[key], str):
            raise _fail(source, key, f"must be a string, got {content[key]!r}")
    return SystemBenchmark(tier=content["tier"], system=_system_name(content["system"], source=source),
                           models=MappingProxyType(parsed), source=source, note=content.get("note"),
                           host=content.get("host"))


def load_benchmark_file(path: str | os.PathLike[str]) -> SystemBenchmark:
    """Read and check one benchmark file.

    Parameters
    ----------
    path : str or path-like
        A ``popex-benchmark/1`` JSON file.

    Returns
    -------
    SystemBenchmark

    Raises
    ------
    BenchmarkError
        The file cannot be read or is not a valid benchmark (see :func:`parse_benchmark`).
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BENCHMARK_FILE_BYTES:
            raise _fail(path.name, "", f"is over {MAX_BENCHMARK_FILE_BYTES} bytes")
        data = path.read_bytes()
    except OSError as err:
        raise BenchmarkError(f"cannot read benchmark file {str(path)!r}: {err.strerror or err}") from err
    return parse_benchmark(data, source=path.name)


def benchmark_to_dict(bench: SystemBenchmark) -> dict[str, Any]:
    """The JSON object of a benchmark, as :func:`parse_benchmark` reads it back.

    Parameters
    ----------
    bench : SystemBenchmark

    Returns
    -------
    dict
    """
    models = {}
    for name, model in bench.models.items():
        entry: dict[str, Any] = {}
        for key in ("input_bytes", "whole_model_ms", "n_repeats", "additivity_error"):
            if getattr(model, key) is not None:
                entry[key] = getattr(model, key)
        entry["blocks"] = [{"input_layer": b.input_layer, "output_layer": b.output_layer, "time_ms": b.time_ms,
                            "output_bytes": b.output_bytes, "flops": b.flops, "params": b.params,
                            **({"name": b.name} if b.name is not None else {})} for b in model.blocks]
        if model.branches:
            entry["branches"] = [{"after_block": b.after_block, "time_ms": b.time_ms, "flops": b.flops,
                                  "params": b.params} for b in model.branches]
        models[name] = entry
    top: dict[str, Any] = {"format": BENCHMARK_FORMAT, "tier": bench.tier, "system": bench.system}
    top.update({key: getattr(bench, key) for key in ("note", "host") if getattr(bench, key) is not None})
    top["models"] = models
    return top


def write_benchmark_file(bench: SystemBenchmark, path: str | os.PathLike[str]) -> Path:
    """Write a benchmark as JSON, checked by reading it back first.

    Parameters
    ----------
    bench : SystemBenchmark
    path : str or path-like

    Returns
    -------
    Path
        The file written.
    """
    data = json.dumps(benchmark_to_dict(bench), indent=1).encode()
    parse_benchmark(data, source=str(path))  # never write what could not be read back
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@dataclass(frozen=True)
class BenchmarkSet:
    """The systems of a benchmark directory, in file-name order, with layouts checked to agree."""

    systems: tuple[SystemBenchmark, ...]
    directory: str = field(default="")

    def tier(self, tier: str) -> tuple[SystemBenchmark, ...]:
        """The systems of one tier, in file-name order.

        Parameters
        ----------
        tier : str
            One of ``device``, ``edge``, ``cloud``.

        Returns
        -------
        tuple of SystemBenchmark
        """
        return tuple(s for s in self.systems if s.tier == tier)

    def model_names(self) -> list[str]:
        """Every model some system has benchmarked, sorted.

        Returns
        -------
        list of str
        """
        return sorted({name for s in self.systems for name in s.models})


def _check_layouts(systems: tuple[SystemBenchmark, ...]) -> None:
    first: dict[str, SystemBenchmark] = {}
    seen: dict[tuple[str, str], SystemBenchmark] = {}
    for system in systems:
        twin = seen.setdefault((system.tier, system.system), system)
        if twin is not system:
            raise BenchmarkError(f"{twin.source} and {system.source} both benchmark the {system.tier} system "
                                 f"{system.system!r}: keep one")
        for name, model in system.models.items():
            reference = first.setdefault(name, system)
            theirs = reference.models[name].layout
            if theirs != model.layout:
                where = next((i for i, (a, b) in enumerate(zip(theirs, model.layout)) if a != b),
                             min(len(theirs), len(model.layout)))
                detail = (f"{len(theirs)} vs {len(model.layout)} blocks" if where == min(len(theirs), len(model.layout))
                          else f"block {where} covers layers {theirs[where][0]}..{theirs[where][1]} vs "
                               f"{model.layout[where][0]}..{model.layout[where][1]}")
                raise BenchmarkError(f"{reference.source} and {system.source} disagree on the block layout of model "
                                     f"{name!r} ({detail}): benchmark both with the same version")


def load_benchmark_dir(directory: str | os.PathLike[str]) -> BenchmarkSet:
    """Every benchmark file of a directory (``*.json``; Scission's pickled ``*.dat`` are refused, named).

    Parameters
    ----------
    directory : str or path-like

    Returns
    -------
    BenchmarkSet

    Raises
    ------
    BenchmarkError
        No benchmark file, any bad file, two files for one system, or two
        files whose block layouts for one model differ (both named).
    """
    root = Path(directory)
    if not root.is_dir():
        raise BenchmarkError(f"benchmark directory {str(root)!r} does not exist")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in (".json", ".dat", ".pkl", ".pickle"))
    systems = tuple(load_benchmark_file(p) for p in paths)
    if not systems:
        raise BenchmarkError(f"no benchmark files (*.json, {BENCHMARK_FORMAT}) in {str(root)!r}")
    _check_layouts(systems)
    return BenchmarkSet(systems=systems, directory=str(root))
