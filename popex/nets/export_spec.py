"""Export a spec model (spec.json + weights.safetensors) to the ONNX model directory.

``python -m popex.nets.export_spec SRC_DIR OUT_DIR`` does it in a subprocess,
so that a service never imports torch itself: exit 0 and one line with the
model id, or one line of error on stderr and exit 2.

Besides the graphs, the calibration files are copied and a
``distortion-classifier/`` sub-model is exported beside them, as the contract
lays the directory out.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from popex.errors import PopexError
from popex.nets.early_exit import EarlyExitNet
from popex.nets.export import ExportResult, export
from popex.nets.io import load_model

__all__ = ["export_early_exit_net", "export_spec_dir", "main", "add_export_parser"]

_DISTORTION_DIR = "distortion-classifier"


class _Stages(nn.Module):
    """Stages start+1..stop of a net (head ``head`` where stage N is included)."""

    def __init__(self, net: EarlyExitNet, start: int, stop: int, head: str | None = None) -> None:
        super().__init__()
        self.net, self.start, self.stop, self.head = net, start, stop, head
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run_stages(x, start=self.start, stop=self.stop, head=self.head)


class _Branch(nn.Module):
    def __init__(self, net: EarlyExitNet, branch: int, head: str | None = None) -> None:
        super().__init__()
        self.net, self.branch, self.head = net, branch, head
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.run_branch(self.branch, x, head=self.head)


def export_early_exit_net(net: EarlyExitNet, out: str | os.PathLike[str]) -> ExportResult:
    """Export an EarlyExitNet (every head set) to ``out``; model.json keeps the spec's other top-level keys."""
    net.eval()
    n = net.n_stages
    stages = [_Stages(net, i, i + 1) for i in range(n)]
    branches = {k: _Branch(net, b) for b, k in enumerate(net.branch_after_stage)}
    experts = {name: {"branches": {k: _Branch(net, b, name) for b, k in enumerate(net.branch_after_stage)},
                      "final": _Stages(net, n - 1, n, name)} for name in net.expert_names}
    example = torch.randn((1, *net.input_shape), generator=torch.Generator().manual_seed(0))
    spec = net.spec
    result = export(stages=stages, branches=branches, example_input=example, out=out,
                    class_names=list(net.class_names), normalisation={"mean": spec["mean"], "std": spec["std"]},
                    name=spec.get("name"), experts=experts or None)
    extra = {key: value for key, value in spec.items()
             if key not in ("format", "stages", "branches", "experts", "name", "input_shape", "mean", "std",
                            "class_names")}
    extra["stage_names"] = list(net.stage_names)  # the spec's stage names, for profiles and tables
    # export() writes the common keys; the spec's others (on_channel_mismatch, description, ...) too
    result = _add_keys(result, extra)
    return result


def _add_keys(result: ExportResult, extra: dict) -> ExportResult:
    import json

    from popex.nets.export import MODEL_JSON, compute_onnx_model_id
    from popex.nets.io import atomic_write_bytes

    path = result.out_dir / MODEL_JSON
    manifest = json.loads(path.read_text())
    manifest.update(extra)
    atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode())
    files = {p: (result.out_dir / p).read_bytes() for p in result.files if p != MODEL_JSON}
    return ExportResult(out_dir=result.out_dir, model_id=compute_onnx_model_id(manifest, files),
                        max_abs_diff=result.max_abs_diff, files=result.files, exporter=result.exporter)


def export_spec_dir(spec_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> ExportResult:
    """Export the spec model in ``spec_dir`` (and its distortion classifier) to ``out_dir``; copy calibration."""
    spec_dir, out_dir = Path(spec_dir), Path(out_dir)
    torch.set_num_threads(1)
    result = export_early_exit_net(load_model(spec_dir).net, out_dir)
    for calibration in sorted(spec_dir.glob("calibration*.npz")):
        if calibration.resolve() != (out_dir / calibration.name).resolve():
            shutil.copyfile(calibration, out_dir / calibration.name)
    if (spec_dir / _DISTORTION_DIR / "spec.json").is_file():
        export_spec_dir(spec_dir / _DISTORTION_DIR, out_dir / _DISTORTION_DIR)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m popex.nets.export_spec SRC_DIR OUT_DIR``: 0 and the model id, or 2 and one error line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m popex.nets.export_spec SRC_DIR OUT_DIR", file=sys.stderr)
        return 2
    try:
        result = export_spec_dir(argv[0], argv[1])
    except PopexError as err:
        # "error[<code>]: <message>": the tiers' converter (popex.runtime.model_files) reads the code back.
        print(f"error[{err.code}]: {err}", file=sys.stderr)
        return 2
    worst = max(result.max_abs_diff.values())
    print(f"model {result.model_id} written to {result.out_dir} (max |onnx - torch| {worst:.2g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def _cmd_export(args) -> int:
    result = export_spec_dir(args.model, args.out)
    for name, diff in result.max_abs_diff.items():
        print(f"  {name:<16} max |onnx - torch| {diff:.2g}")
    print(f"model {result.model_id} written to {result.out_dir} ({len(result.files)} files)")
    return 0


def add_export_parser(subparsers) -> None:
    """Register ``popex export`` (sets ``run`` like the other subcommands)."""
    p = subparsers.add_parser("export", help="export a spec model directory to ONNX (popex-onnx/1), checked by ORT")
    p.add_argument("--model", required=True, help="spec model directory (spec.json, weights.safetensors)")
    p.add_argument("--out", required=True, help="directory to write (may be the model directory itself)")
    p.set_defaults(run=_cmd_export)
