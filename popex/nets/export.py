"""Export ordinary torch modules to the ONNX model directory (format "popex-onnx/1", issue 11).

``export(stages=[...], branches={k: head}, ...)`` exports each piece with
``torch.onnx.export`` (opset 17, one input ``input``, one output ``output``,
dynamic first axis ``batch``; the TorchScript exporter first, the dynamo
exporter if that fails), writes ``model.json``, then checks with ONNX Runtime
that chaining the exported pieces reproduces the modules' outputs on the
example input and on a batch of 4 random inputs. It refuses (ExportError)
where an exit differs by more than ``1e-4 * max(1, max|reference|)``.

``export_model(module, stage_ends=[...], branch_heads={...})`` exports one
module whose forward returns the logits, tracing it once with the stage
boundaries as extra graph outputs and cutting that graph at them.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from popex.errors import ExportError
from popex.runtime.onnx_model import MANIFEST_FILE, ONNX_FORMAT, OnnxModelError, load_onnx_dir, manifest_files
from popex.runtime.onnx_model import compute_onnx_model_id as runtime_model_id
from popex.nets.io import atomic_write_bytes

__all__ = ["FORMAT", "MODEL_JSON", "OPSET", "ExportResult", "compute_onnx_model_id", "referenced_files",
           "export", "export_model", "export_pieces"]

FORMAT = ONNX_FORMAT
MODEL_JSON = MANIFEST_FILE
OPSET = 17
RELATIVE_TOLERANCE = 1e-4
N_RANDOM_INPUTS = 4


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the directory, its model id, the largest |ORT - torch| per exit."""

    out_dir: Path
    model_id: str
    max_abs_diff: dict[str, float]  # exit name ("branch0", "final", "blur/branch0", "blur/final") -> difference
    files: tuple[str, ...]  # every path written, relative to out_dir, model.json last
    exporter: dict[str, str]  # graph path -> "torchscript" or "dynamo"


def referenced_files(manifest: Mapping[str, Any]) -> list[str]:
    """Every graph path a model.json names (stages, branches, expert heads), sorted."""
    return sorted(manifest_files(manifest))


def compute_onnx_model_id(manifest: Mapping[str, Any], files: Mapping[str, bytes]) -> str:
    """Model id of the ONNX form: sha256 of the canonical model.json, then each referenced file.

    Per file, in sorted path order: the path (UTF-8), ``b"\\0"``, the length as
    8-byte big endian, the bytes. Files in ``files`` that model.json does not
    reference (calibration, ...) are not hashed.

    >>> compute_onnx_model_id({"stages": ["stages/1.onnx"]}, {"stages/1.onnx": b"x"})[:12]
    'f5a337eb8245'
    """
    paths = referenced_files(manifest)
    missing = [path for path in paths if path not in files]
    if missing:
        raise ExportError(f"model.json names {missing[0]!r}, which is not among the files")
    return runtime_model_id(manifest, {path: files[path] for path in paths})


def _normalise_graph(proto: onnx.ModelProto) -> bytes:
    """One input "input", one output "output", first axis "batch", no doc strings; checked, serialised."""
    graph = proto.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise ExportError(f"a piece must have one tensor input and one output, the graph has "
                          f"{len(inputs)} and {len(graph.output)}")
    for value, want in ((inputs[0], "input"), (graph.output[0], "output")):
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise ExportError(f"piece {want} must be float32")
        if value.name != want:
            old = value.name
            for node in graph.node:
                node.input[:] = [want if n == old else n for n in node.input]
                node.output[:] = [want if n == old else n for n in node.output]
            value.name = want
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_param = "batch"
    proto.doc_string = ""
    graph.doc_string = ""
    for node in graph.node:
        node.doc_string = ""
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"the exported graph is not valid ONNX: {str(err)[:300]}") from err
    return proto.SerializeToString(deterministic=True)


def _torch_to_proto(module: nn.Module, example: torch.Tensor, *, output_names: Sequence[str] = ("output",),
                    ) -> tuple[onnx.ModelProto, str, list[str]]:
    """(graph, exporter name, the exporter's warnings): TorchScript exporter, else dynamo."""
    axes = {name: {0: "batch"} for name in ("input", *output_names)}
    errors = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            buffer = io.BytesIO()
            torch.onnx.export(module, (example,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=["input"], output_names=list(output_names), dynamic_axes=axes,
                              do_constant_folding=True)
            proto, exporter = onnx.load_from_string(buffer.getvalue()), "torchscript"
        except Exception as err:  # the exporters raise many types; the message is what helps
            errors.append(f"TorchScript exporter: {type(err).__name__}: {str(err)[:300]}")
            proto = None
        if proto is None:
            try:
                program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET,
                                            input_names=["input"], output_names=list(output_names),
                                            dynamic_axes=axes, verbose=False)
                proto, exporter = program.model_proto, "dynamo"
            except Exception as err:
                errors.append(f"dynamo exporter: {type(err).__name__}: {str(err)[:300]}")
                raise ExportError("cannot export to ONNX: " + "; ".join(errors)) from err
    notes = sorted({str(w.message).split(".")[0] for w in caught
                    if issubclass(w.category, torch.jit.TracerWarning)})
    return proto, exporter, notes


def _run_chain(manifest: Mapping[str, Any], files: Mapping[str, bytes], x: np.ndarray) -> dict[str, np.ndarray]:
    """Every exit's logits from the exported graphs, run by the tiers' own executor (checks and dry run included)."""
    with tempfile.TemporaryDirectory(prefix="popex-export-check-") as scratch:
        directory = Path(scratch)
        for path in referenced_files(manifest):
            (directory / path).parent.mkdir(parents=True, exist_ok=True)
            (directory / path).write_bytes(files[path])
        (directory / MODEL_JSON).write_text(json.dumps(manifest))
        try:
            net, _ = load_onnx_dir(directory)
        except OnnxModelError as err:
            raise ExportError(f"the exported graphs do not load as a model: {err}") from err
    exits = {}
    for head in (None, *net.expert_names):
        prefix = "" if head is None else f"{head}/"
        logits = net.forward(x, head=head)
        exits.update({f"{prefix}branch{b}": value for b, value in enumerate(logits[:-1])})
        exits[f"{prefix}final"] = logits[-1]
    return exits


def _verify(manifest: Mapping[str, Any], files: Mapping[str, bytes],
            reference: Callable[[torch.Tensor], dict[str, torch.Tensor]], example_input: torch.Tensor,
            notes: Sequence[str]) -> dict[str, float]:
    """Max |ORT - torch| per exit over the example input and a batch of random ones; refuse above tolerance."""
    generator = torch.Generator().manual_seed(0)
    random_inputs = torch.randn((N_RANDOM_INPUTS, *example_input.shape[1:]), generator=generator)
    worst: dict[str, float] = {}
    for x in (example_input, random_inputs):
        with torch.inference_mode():
            want = {name: value.detach().float().numpy() for name, value in reference(x).items()}
        got = _run_chain(manifest, files, x.detach().float().numpy())
        for name, ref in want.items():
            if got[name].shape != ref.shape:
                raise ExportError(f"exit {name}: ONNX gives shape {list(got[name].shape)} for a batch of "
                                  f"{len(x)}, torch {list(ref.shape)}")
            diff = float(np.max(np.abs(got[name] - ref))) if ref.size else 0.0
            if not np.isfinite(diff) or diff > RELATIVE_TOLERANCE * max(1.0, float(np.max(np.abs(ref)))):
                hint = f"; the exporter warned: {'; '.join(notes)[:400]}" if notes else ""
                raise ExportError(f"exit {name}: the exported graphs differ from the module by {diff:.3g} on a "
                                  f"batch of {len(x)} (allowed {RELATIVE_TOLERANCE:g} x max(1, |logits|)); "
                                  f"data-dependent control flow or random ops do not export{hint}")
            worst[name] = max(worst.get(name, 0.0), diff)
    return worst


def _check_eval(modules: Mapping[str, nn.Module]) -> None:
    for where, module in modules.items():
        if not isinstance(module, nn.Module):
            raise ExportError(f"{where} must be a torch.nn.Module, got {type(module).__name__}")
        if any(m.training for m in module.modules()):
            raise ExportError(f"{where} is in training mode (dropout and batch norm differ from inference); "
                              f"call .eval() on the modules before exporting")


def _write(out: str | os.PathLike[str], manifest: dict[str, Any], files: dict[str, bytes]) -> list[str]:
    """Write the graphs, remove stale graphs of an earlier export, write model.json last."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"output {str(out)!r} exists and is not a directory")
    for folder in ("stages", "branches", "experts"):
        for old in (out / folder).rglob("*.onnx") if (out / folder).is_dir() else []:
            if old.relative_to(out).as_posix() not in files:
                old.unlink()
    for path, data in sorted(files.items()):
        atomic_write_bytes(out / path, data)
    atomic_write_bytes(out / MODEL_JSON, (json.dumps(manifest, indent=2) + "\n").encode())
    return [*sorted(files), MODEL_JSON]


def export_pieces(*, out: str | os.PathLike[str], manifest_keys: Mapping[str, Any], files: dict[str, bytes],
                  n_stages: int, branch_after_stage: Sequence[int], expert_names: Sequence[str],
                  reference: Callable[[torch.Tensor], dict[str, torch.Tensor]], example_input: torch.Tensor,
                  exporter: dict[str, str], notes: Sequence[str] = ()) -> ExportResult:
    """Write a checked model directory from exported graphs (``files``, by contract path); the shared core."""
    manifest = {key: value for key, value in manifest_keys.items()
                if key not in ("format", "stages", "branches", "experts")}
    manifest["format"] = FORMAT
    manifest["stages"] = [f"stages/{i}.onnx" for i in range(1, n_stages + 1)]
    manifest["branches"] = [{"after_stage": k, "file": f"branches/{b}.onnx"}
                            for b, k in enumerate(branch_after_stage)]
    if expert_names:
        manifest["experts"] = {name: {"branches": [f"experts/{name}/branches/{b}.onnx"
                                                   for b in range(len(branch_after_stage))],
                                      "final": f"experts/{name}/final.onnx"} for name in expert_names}
    max_abs_diff = _verify(manifest, files, reference, example_input, notes)
    written = _write(out, manifest, files)
    return ExportResult(out_dir=Path(out), model_id=compute_onnx_model_id(manifest, files),
                        max_abs_diff=max_abs_diff, files=tuple(written), exporter=dict(exporter))


def _manifest_keys(example_input: Any, class_names: Sequence[str], normalisation: Mapping[str, Any],
                   name: str | None, out: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate the common arguments once; the model.json keys they give."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4 or example_input.shape[0] < 1:
        raise ExportError("example_input must be a float tensor (batch, C, H, W), got "
                          f"{getattr(example_input, 'shape', type(example_input).__name__)}")
    n_channels = int(example_input.shape[1])
    for key in ("mean", "std"):
        values = normalisation.get(key) if isinstance(normalisation, Mapping) else None
        if not isinstance(values, Sequence) or len(values) != n_channels:
            raise ExportError(f"normalisation[{key!r}] must list {n_channels} numbers (one per channel), "
                              f"got {values!r}")
    if any(float(s) <= 0 for s in normalisation["std"]):
        raise ExportError(f"normalisation['std'] must be positive, got {list(normalisation['std'])}")
    if not class_names or not all(isinstance(c, str) for c in class_names):
        raise ExportError("class_names must be a non-empty list of strings")
    return {"name": name or Path(out).resolve().name, "input_shape": list(example_input.shape[1:]),
            "mean": [float(v) for v in normalisation["mean"]], "std": [float(v) for v in normalisation["std"]],
            "class_names": list(class_names)}


def _check_logits(where: str, value: torch.Tensor, n_classes: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or value.shape[1] != n_classes:
        raise ExportError(f"{where} must return logits (batch, {n_classes}) (one per class name), got "
                          f"{list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")


def export(*, stages: Sequence[nn.Module], branches: Mapping[int, nn.Module] | None = None,
           example_input: torch.Tensor, out: str | os.PathLike[str], class_names: Sequence[str],
           normalisation: Mapping[str, Sequence[float]], name: str | None = None,
           experts: Mapping[str, Mapping[str, Any]] | None = None) -> ExportResult:
    """Export stages and branch heads to a popex-onnx/1 model directory, checked by ONNX Runtime.

    Parameters
    ----------
    stages : sequence of nn.Module
        Stages 1..N in execution order, in eval mode; stage N ends with the classifier.
    branches : mapping int -> nn.Module, optional
        "after stage k" (1..N-1) -> a head returning logits.
    example_input : Tensor (batch, C, H, W)
        A normalised input; its shape without batch is ``input_shape``.
    out : path
        Directory to write (created; an earlier export's graphs there are replaced).
    class_names : sequence of str
    normalisation : {"mean": [...], "std": [...]}
        Per channel, as model.json's ``mean`` / ``std``.
    name : str, optional
        Model name (default: the directory's name).
    experts : mapping name -> {"branches": {k: head}, "final": module}, optional
        Expert head sets: a copy of every branch (same keys) and of stage N.

    Returns
    -------
    ExportResult

    Raises
    ------
    ExportError
        On a bad argument, a module the exporters cannot handle, or an export that
        differs from the module by more than 1e-4 relative at some exit.
    """
    stages = list(stages)
    branches = dict(branches or {})
    experts = dict(experts or {})
    keys = _manifest_keys(example_input, class_names, normalisation, name, out)
    if not stages:
        raise ExportError("stages must list at least one module")
    if any(not isinstance(k, int) or not 1 <= k < len(stages) for k in branches):
        raise ExportError(f"branch keys must be stage numbers 1..{len(stages) - 1}, got {sorted(branches, key=str)}")
    after = sorted(branches)
    for expert, heads in experts.items():
        if not isinstance(expert, str) or not expert.isidentifier() or expert != expert.lower() or expert == "pristine":
            raise ExportError(f"expert names are lower-case identifiers other than 'pristine', got {expert!r}")
        if not isinstance(heads, Mapping) or sorted(dict(heads.get("branches", {}))) != after or "final" not in heads:
            raise ExportError(f"experts[{expert!r}] must be {{'branches': {{k: head}} for k in {after}, 'final': module}}")
    pieces: dict[str, tuple[str, nn.Module]] = {f"stages/{i + 1}.onnx": (f"stage {i + 1}", m) for i, m in enumerate(stages)}
    pieces.update({f"branches/{b}.onnx": (f"branch after stage {k}", branches[k]) for b, k in enumerate(after)})
    for expert, heads in experts.items():
        pieces.update({f"experts/{expert}/branches/{b}.onnx": (f"expert {expert} branch after stage {k}",
                                                               heads["branches"][k]) for b, k in enumerate(after)})
        pieces[f"experts/{expert}/final.onnx"] = (f"expert {expert} final", heads["final"])
    _check_eval({where: module for where, module in pieces.values()})
    n_classes = len(class_names)

    def reference(x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = [x]
        for module in stages:
            features.append(module(features[-1]))
        exits = {f"branch{b}": branches[k](features[k]) for b, k in enumerate(after)}
        exits["final"] = features[-1]
        for expert, heads in experts.items():
            exits.update({f"{expert}/branch{b}": heads["branches"][k](features[k]) for b, k in enumerate(after)})
            exits[f"{expert}/final"] = heads["final"](features[-2])
        return exits

    with torch.inference_mode():
        inputs = [example_input.float()]
        try:
            for module in stages:
                inputs.append(module(inputs[-1]))
            for where, value in reference(inputs[0]).items():
                _check_logits(f"exit {where}", value, n_classes)
        except RuntimeError as err:
            raise ExportError(f"the modules do not run on example_input: {str(err)[:300]}") from err
    piece_inputs = {f"stages/{i + 1}.onnx": inputs[i] for i in range(len(stages))}
    piece_inputs.update({f"branches/{b}.onnx": inputs[k] for b, k in enumerate(after)})
    for expert in experts:
        piece_inputs.update({f"experts/{expert}/branches/{b}.onnx": inputs[k] for b, k in enumerate(after)})
        piece_inputs[f"experts/{expert}/final.onnx"] = inputs[-2]
    files, exporter, notes = {}, {}, []
    for path, (where, module) in pieces.items():
        try:
            proto, exporter[path], warned = _torch_to_proto(module, piece_inputs[path].clone())
            files[path] = _normalise_graph(proto)
        except ExportError as err:
            raise ExportError(f"{where}: {err}") from err
        notes += [f"{where}: {w}" for w in warned]
    return export_pieces(out=out, manifest_keys=keys, files=files, n_stages=len(stages), branch_after_stage=after,
                         expert_names=list(experts), reference=reference, example_input=example_input.float(),
                         exporter=exporter, notes=notes)


from popex.nets.export_module import export_model  # noqa: E402  the one-module variant, over the same core
