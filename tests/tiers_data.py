"""What the tier tests share: where Scission's data is, and writers of benchmark and network files."""

from __future__ import annotations

import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The data lives beside the checkout (../shared/scission); CI clones the repository elsewhere, so it may point
# POPEX_SCISSION_DIR at its copy. Tests that need it skip cleanly when it is absent.
SCISSION = Path(os.environ.get("POPEX_SCISSION_DIR") or REPO.parent / "shared" / "scission")
HAVE_SCISSION = (SCISSION / "device-raspi4.json").is_file()
WIRELESS = SCISSION / "network_stats.csv"
SKIP_REASON = f"Scission's benchmark data is not at {SCISSION} (set POPEX_SCISSION_DIR)"


def block_dicts(times_ms: list[float], out_bytes: list[int], *, layers: list[tuple[int, int]] | None = None) -> list[dict]:
    layers = layers or [(i, i) for i in range(len(times_ms))]
    return [{"input_layer": a, "output_layer": b, "time_ms": t, "output_bytes": n, "flops": None, "params": None}
            for (a, b), t, n in zip(layers, times_ms, out_bytes)]


def write_system(directory: Path, tier: str, system: str, models: dict[str, list[dict]], *,
                 filename: str | None = None, input_bytes: int | None = None) -> Path:
    body = {"format": "popex-benchmark/1", "tier": tier, "system": system,
            "models": {name: ({"input_bytes": input_bytes} if input_bytes is not None else {}) | {"blocks": blocks}
                       for name, blocks in models.items()}}
    path = directory / (filename or f"{tier}-{system}.json")
    path.write_text(json.dumps(body))
    return path


def write_network(path: Path, rows: list[tuple[str, str, float, float]]) -> Path:
    lines = ["source,destination,ping(ms),bandwidth(mbps)"] + [f"{s},{d},   {p},  {b}" for s, d, p, b in rows]
    path.write_text("\n".join(lines) + "\n")
    return path
