"""FLOPs and parameters of one ONNX graph, read from the graph itself (no torch, nothing executed).

FLOPs count the multiply-accumulates of the layers that dominate a CNN's
cost, 2 per MAC: ``Conv`` (output elements x input channels per group x
kernel size), ``Gemm`` and ``MatMul`` (output elements x the shared
dimension). Element-wise, pooling and normalisation layers are not counted,
as in the usual published FLOP figures (and in :mod:`popex.nets.flops`,
which counts MACs of the torch module). Shapes come from ONNX shape
inference with the batch dimension set to 1. Parameters are the elements of
the graph's floating-point initializers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["GraphCost", "graph_cost"]

_FLOAT_TYPES = {1, 10, 11, 16}  # FLOAT, FLOAT16, DOUBLE, BFLOAT16 (onnx.TensorProto)


@dataclass(frozen=True)
class GraphCost:
    """What one graph costs per sample."""

    flops: int
    params: int


def _dims(value_info) -> list[int] | None:
    shape = value_info.type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return None if any(d is None for d in dims) else dims


def graph_cost(data: bytes) -> GraphCost:
    """FLOPs and parameters of a serialized ONNX graph, per sample (batch 1).

    Parameters
    ----------
    data : bytes
        The ``.onnx`` file (already checked by the loader; external data is not read).

    Returns
    -------
    GraphCost
        A node whose shapes inference cannot fix counts 0 FLOPs.
    """
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    initializers = {t.name: list(t.dims) for t in graph.initializer}
    params = sum(math.prod(t.dims) for t in graph.initializer if t.data_type in _FLOAT_TYPES)
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1  # the batch: costs are per sample
    inferred = onnx.shape_inference.infer_shapes(model).graph
    shapes = {v.name: d for v in (*inferred.value_info, *inferred.input, *inferred.output)
              if (d := _dims(v)) is not None}
    shapes.update(initializers)
    flops = 0
    for node in inferred.node:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in shapes:
            weight = shapes[node.input[1]]  # (C_out, C_in / group, k...)
            flops += 2 * math.prod(out) * math.prod(weight[1:])
        elif node.op_type in ("Gemm", "MatMul") and node.input[0] in shapes:
            a = shapes[node.input[0]]
            transposed = node.op_type == "Gemm" and any(att.name == "transA" and att.i for att in node.attribute)
            shared = a[-2] if transposed else a[-1]
            flops += 2 * math.prod(out) * shared
    return GraphCost(flops=int(flops), params=int(params))
