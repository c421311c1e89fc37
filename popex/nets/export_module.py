"""The one-module variant of the ONNX export: trace once, cut the graph at the stage boundaries.

The module is traced with forward hooks on the named submodules, so the
output of each stage-boundary submodule and of each branch head becomes an
extra output of one ONNX graph; ``onnx.utils.Extractor`` then cuts that graph
into one piece per stage and per branch. Functional code in ``forward``
(``torch.flatten``, residual adds, ``torch.cat``) goes with the piece it
belongs to.

Limits: a boundary must be a true cut (nothing after it uses a tensor from
before it: not inside a residual block whose skip goes round it); each named
submodule must run exactly once per forward; its output must be one tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import onnx
import onnx.utils
import torch
from torch import nn

from popex.errors import ExportError
from popex.nets import export as core

__all__ = ["export_model"]


class _Tapped(nn.Module):
    """The module, returning (final logits, branch logits..., boundary tensors...) captured by hooks."""

    def __init__(self, module: nn.Module, taps: Sequence[str]) -> None:
        super().__init__()
        self.module, self.taps = module, list(taps)
        self._targets = []
        self.eval()  # the exporter restores the wrapper's mode afterwards, recursively: it must not be training
        for name in self.taps:
            try:
                self._targets.append(module.get_submodule(name))
            except AttributeError as err:
                raise ExportError(f"the module has no submodule {name!r}") from err

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        captured: dict[int, list[Any]] = {i: [] for i in range(len(self.taps))}
        handles = [target.register_forward_hook(lambda _m, _i, output, i=i: captured[i].append(output))
                   for i, target in enumerate(self._targets)]
        try:
            result = self.module(x)
        finally:
            for handle in handles:
                handle.remove()
        final = result[-1] if isinstance(result, (list, tuple)) else result
        outputs = [final]
        for i, name in enumerate(self.taps):
            if len(captured[i]) != 1 or not isinstance(captured[i][0], torch.Tensor):
                raise ExportError(f"submodule {name!r} must run once per forward and return one tensor "
                                  f"(it ran {len(captured[i])} times)")
            outputs.append(captured[i][0])
        return tuple(outputs)


def _cut(proto: onnx.ModelProto, source: str, target: str, where: str) -> bytes:
    """The piece of ``proto`` from tensor ``source`` to tensor ``target``, checked to depend on nothing else."""
    try:
        piece = onnx.utils.Extractor(proto).extract_model([source], [target])
    except Exception as err:
        raise ExportError(f"{where}: cannot cut the graph there: {str(err)[:200]}") from err
    known = {source} | {t.name for t in piece.graph.initializer}
    for node in piece.graph.node:
        known.update(node.output)
    for node in piece.graph.node:
        missing = [name for name in node.input if name and name not in known]
        if missing:
            raise ExportError(f"{where}: the boundary is not a cut: the graph after it also uses {missing[0]!r} "
                              f"from before it (a skip connection around the boundary?); name another submodule")
    return core._normalise_graph(piece)


def export_model(module: nn.Module, *, stage_ends: Sequence[str], branch_heads: Mapping[int, str] | None = None,
                 example_input: torch.Tensor, out: str | os.PathLike[str], class_names: Sequence[str],
                 normalisation: Mapping[str, Sequence[float]], name: str | None = None) -> core.ExportResult:
    """Export one module whose forward returns the final logits (or a list ending with them).

    Parameters
    ----------
    module : nn.Module
        In eval mode.
    stage_ends : sequence of str
        Dotted names of the submodules that end stages 1..N-1 (stage N ends
        at the module's final logits, so it is not named).
    branch_heads : mapping int -> str, optional
        "after stage k" (1..N-1) -> dotted name of the head whose output is that branch's logits.
    example_input, out, class_names, normalisation, name
        As for :func:`popex.nets.export.export`.

    Returns
    -------
    ExportResult

    Raises
    ------
    ExportError
        As ``export``, and where a boundary is not a cut of the graph.
    """
    keys = core._manifest_keys(example_input, class_names, normalisation, name, out)
    stage_ends = list(stage_ends)
    branch_heads = dict(branch_heads or {})
    n_stages = len(stage_ends) + 1
    if any(not isinstance(k, int) or not 1 <= k < n_stages for k in branch_heads):
        raise ExportError(f"branch keys must be stage numbers 1..{n_stages - 1}, got {sorted(branch_heads, key=str)}")
    after = sorted(branch_heads)
    core._check_eval({"the module": module})
    tapped = _Tapped(module, [branch_heads[k] for k in after] + stage_ends)
    n_branches = len(after)

    def reference(x: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = tapped(x)
        exits = {f"branch{b}": outputs[1 + b] for b in range(n_branches)}
        exits["final"] = outputs[0]
        return exits

    x = example_input.float()
    with torch.inference_mode():
        try:
            for where, value in reference(x).items():
                core._check_logits(f"exit {where}", value, len(class_names))
        except RuntimeError as err:
            raise ExportError(f"the module does not run on example_input: {str(err)[:300]}") from err
    names = ["final"] + [f"branch{b}" for b in range(n_branches)] + [f"boundary{i}" for i in range(1, n_stages)]
    proto, exporter, notes = core._torch_to_proto(tapped, x.clone(), output_names=names)
    proto = onnx.shape_inference.infer_shapes(proto)
    boundaries = ["input"] + [f"boundary{i}" for i in range(1, n_stages)] + ["final"]
    files = {f"stages/{i}.onnx": _cut(proto, boundaries[i - 1], boundaries[i], f"stage {i}")
             for i in range(1, n_stages + 1)}
    files.update({f"branches/{b}.onnx": _cut(proto, boundaries[k], f"branch{b}", f"branch after stage {k}")
                  for b, k in enumerate(after)})
    return core.export_pieces(out=out, manifest_keys=keys, files=files, n_stages=n_stages, branch_after_stage=after,
                              expert_names=[], reference=reference, example_input=x,
                              exporter={path: exporter for path in files}, notes=notes)
