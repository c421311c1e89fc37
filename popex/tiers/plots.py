"""Figures of the tiers: the best configuration's timeline, and a benchmarked model's blocks.

Scission draws the best configuration as one bar per block coloured by the
tier that runs it, with a bar per hop for the communication, on a log scale;
:func:`plot_configuration` draws the same. :func:`plot_blocks` is the figure
``popex benchmark`` writes: time bars on a log scale, output size as a line.
"""

from __future__ import annotations

import os
from pathlib import Path

from popex.tiers.benchmark_file import BenchmarkSet, ModelBenchmark
from popex.tiers.network import Network
from popex.tiers.predict import Configuration

__all__ = ["plot_configuration", "plot_blocks"]

_COLOURS = {"device": "#C44E52", "edge": "#55A868", "cloud": "#4C72B0", "comm": "#E5C100"}
#: Log-scale bars cannot be 0: a block benchmarked at 0 ms is drawn at this height.
_FLOOR_MS = 1e-3


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _block_label(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def plot_configuration(config: Configuration, bench: BenchmarkSet, network: Network, model: str,
                       path: str | os.PathLike[str], *, input_bytes: float) -> Path:
    """Per-block time bars coloured by tier, with the communication bars, for one configuration.

    Parameters
    ----------
    config : Configuration
        Usually the fastest of a query.
    bench, network
        Where its numbers came from.
    model : str
    path : str or path-like
        The PNG to write.
    input_bytes : float
        What the device uploads when it computes nothing.

    Returns
    -------
    Path
    """
    plt = _pyplot()
    by_name = {(s.tier, s.system): s for s in bench.systems}
    labels, heights, colours = [], [], []
    previous = None  # (system name, bytes out) of the last tier that ran
    device_bytes = input_bytes
    for tier in ("device", "edge", "cloud"):
        part = getattr(config, tier)
        if part.first_block < 0:
            continue
        blocks = by_name[(tier, part.system)].models[model].blocks[part.first_block:part.last_block + 1]
        if tier != "device":
            source, n_bytes = previous or (config.device.system, device_bytes)
            labels.append("COMM.")
            heights.append(network.hop(source, part.system).transfer_s(n_bytes) * 1000)
            colours.append(_COLOURS["comm"])
        labels.extend(_block_label(b.input_layer, b.output_layer) for b in blocks)
        heights.extend(max(b.time_ms, _FLOOR_MS) for b in blocks)
        colours.extend([_COLOURS[tier]] * len(blocks))
        previous = (part.system, blocks[-1].output_bytes)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(labels) + 3), 4.5))
    ax.bar(range(len(labels)), heights, color=colours)
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_ylabel("time (ms, log scale)")
    ax.set_xlabel("layers (block) / communication")
    handles = [plt.Rectangle((0, 0), 1, 1, color=_COLOURS[t]) for t in ("device", "edge", "cloud", "comm")]
    names = [f"Device({config.device.system})", f"Edge({config.edge.system})", f"Cloud({config.cloud.system})",
             "communication"]
    ax.legend(handles, names, fontsize=8)
    ax.set_title(f"{model}: {config.latency_s:.4f} s, {config.upload_mb:.4f} MB uploaded")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_blocks(model: ModelBenchmark, path: str | os.PathLike[str], *, title: str) -> Path:
    """Time bars per block (log scale) and each block's output size as a line.

    Parameters
    ----------
    model : ModelBenchmark
    path : str or path-like
        The PNG to write.
    title : str

    Returns
    -------
    Path
    """
    plt = _pyplot()
    labels = [b.name or _block_label(b.input_layer, b.output_layer) for b in model.blocks]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(labels) + 3), 4.2))
    ax.bar(range(len(labels)), [max(b.time_ms, _FLOOR_MS) for b in model.blocks], color=_COLOURS["edge"],
           label="median time (ms)")
    ax.set_yscale("log")
    ax.set_ylabel("time (ms, log scale)")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax2 = ax.twinx()
    ax2.plot(range(len(labels)), [b.output_bytes / 1024 for b in model.blocks], "k.-", label="output (KiB)")
    ax2.set_ylabel("output size (KiB)")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
