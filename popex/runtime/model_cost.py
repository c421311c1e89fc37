"""What a model costs to run, read from its files before anything runs: FLOPs and peak activation bytes.

The parameter cap of :mod:`popex.nets.spec` bounds the weights, not the
work: a 750 KB spec of wide convolutions on a large input passed every
check and kept four request threads busy for two minutes in its dry run
(the audit of issue 15). So both services compute, per sample (batch 1):

- **FLOPs**: 2 per multiply-accumulate of the convolutions and linear
  layers (element-wise, pooling and normalisation layers are not counted,
  as in the usual published figures; their cost is bounded by the
  activation cap and the layer count), over every stage, branch and
  expert head;
- **peak activation bytes**: the largest inputs + output (float32) of one
  operation, inside the blocks too (a residual sum: two inputs, one output).

For the spec form this is arithmetic on the spec's shapes
(:func:`spec_cost`, no torch); for the ONNX form it is ONNX shape inference
on each graph (:func:`onnx_files_cost`, FLOPs from
:func:`popex.tiers.onnx_cost.graph_cost`). :func:`check_model_cost` refuses a
model over the configured caps (``max_model_flops``,
``max_activation_bytes``) with a 400 naming the computed value and the cap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from popex.errors import CostError, SpecError
from popex.untrusted import MAX_DOCUMENT_BYTES, loads_json

__all__ = ["ModelCost", "DEFAULT_MAX_MODEL_FLOPS", "DEFAULT_MAX_ACTIVATION_BYTES", "spec_cost", "onnx_files_cost",
           "files_cost", "check_model_cost"]

#: Default cap on FLOPs per sample: ResNet-50 at 224x224 (8.2 GFLOPs) fits.
DEFAULT_MAX_MODEL_FLOPS = 10_000_000_000
#: Default cap on one layer's input + output per sample: VGG's first layers at 224x224 (26 MB) fit.
DEFAULT_MAX_ACTIVATION_BYTES = 64 * 2**20
_FLOAT_BYTES = 4
_ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2}  # TensorProto


@dataclass(frozen=True)
class ModelCost:
    """What one sample costs a model: FLOPs and the largest activation footprint of one layer."""

    flops: int
    peak_activation_bytes: int


# -- the spec form: arithmetic on shapes ------------------------------------------------------------------------


def _int(layer: Mapping[str, Any], key: str, default: Any = None, *, low: int = 1) -> int | list[int]:
    value = layer.get(key, default)
    values = value if isinstance(value, list) else [value]
    if (not values or len(values) > 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values)):
        raise SpecError(f"layer {layer.get('type')!r}: {key} must be an integer >= {low} (or a pair), got {value!r}")
    return value


def _pair(value: int | list[int]) -> tuple[int, int]:
    return (value[0], value[-1]) if isinstance(value, list) else (value, value)


def _conv_out(shape: tuple[int, ...], c_out: int, kernel: Any, stride: Any = 1, padding: Any = 0,
              dilation: Any = 1, ceil_mode: bool = False) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise SpecError(f"a 2-D layer needs a (channels, height, width) input, it gets shape {list(shape)}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    rounding = math.ceil if ceil_mode else math.floor
    h = rounding((shape[1] + 2 * ph - dh * (kh - 1) - 1) / sh) + 1
    w = rounding((shape[2] + 2 * pw - dw * (kw - 1) - 1) / sw) + 1
    if h < 1 or w < 1:
        raise SpecError(f"a {kh}x{kw} kernel does not fit the {shape[1]}x{shape[2]} input it gets")
    return c_out, h, w


def _conv(shape: tuple[int, ...], c_in: int, c_out: int, kernel: Any, *, stride: Any = 1, padding: Any = 0,
          dilation: Any = 1, groups: int = 1) -> tuple[int, tuple[int, ...], int]:
    """(MACs, output shape, input + output elements) of one convolution."""
    out = _conv_out(shape, c_out, kernel, stride, padding, dilation)
    kh, kw = _pair(kernel)
    return math.prod(out) * (c_in // groups) * kh * kw, out, math.prod(shape) + math.prod(out)


def _layer_cost(layer: Mapping[str, Any], shape: tuple[int, ...]) -> tuple[int, tuple[int, ...], int]:
    """(MACs, output shape, most elements held at once) of one spec layer on an input of ``shape``."""
    kind = layer.get("type")
    if kind == "conv2d":
        c_out = _int(layer, "out_channels")
        return _conv(shape, _int(layer, "in_channels"), c_out, _int(layer, "kernel_size"),
                     stride=_int(layer, "stride", 1), padding=_int(layer, "padding", 0, low=0),
                     dilation=_int(layer, "dilation", 1), groups=_int(layer, "groups", 1))
    if kind == "conv_bn_act":
        k = _int(layer, "kernel_size", 3)
        return _conv(shape, _int(layer, "in_channels"), _int(layer, "out_channels"), k,
                     stride=_int(layer, "stride", 1), padding=(_pair(k)[0] - 1) // 2, groups=_int(layer, "groups", 1))
    if kind == "basic_block":
        c_in, c_out, stride = _int(layer, "in_channels"), _int(layer, "out_channels"), _int(layer, "stride", 1)
        macs1, mid, held1 = _conv(shape, c_in, c_out, 3, stride=stride, padding=1)
        macs2, out, held2 = _conv(mid, c_out, c_out, 3, padding=1)
        macs3 = math.prod(out) * c_in if stride != 1 or c_in != c_out else 0  # the 1x1 downsample
        return macs1 + macs2 + macs3, out, max(held1, held2, 3 * math.prod(out))  # the sum: two inputs, one output
    if kind == "inverted_residual":
        c_in, c_out, stride = _int(layer, "in_channels"), _int(layer, "out_channels"), _int(layer, "stride", 1)
        hidden = round(c_in * _int(layer, "expand_ratio", 6))
        expand = (math.prod(shape[1:]) * hidden * c_in, (hidden, *shape[1:])) if hidden != c_in else (0, shape)
        macs2, mid, held2 = _conv(expand[1], hidden, hidden, 3, stride=stride, padding=1, groups=hidden)
        macs3, out, held3 = _conv(mid, hidden, c_out, 1)
        residual = 3 * math.prod(out) if stride == 1 and c_in == c_out else 0
        return expand[0] + macs2 + macs3, out, max(math.prod(shape) + math.prod(expand[1]), held2, held3, residual)
    if kind in ("maxpool2d", "avgpool2d"):
        k = _int(layer, "kernel_size")
        out = _conv_out(shape, shape[0] if shape else 0, k, layer.get("stride") or k,
                        _int(layer, "padding", 0, low=0), ceil_mode=bool(layer.get("ceil_mode")))
        return 0, out, math.prod(shape) + math.prod(out)
    if kind in ("adaptiveavgpool2d", "adaptivemaxpool2d"):
        out = (shape[0], *_pair(_int(layer, "output_size")))
        return 0, out, math.prod(shape) + math.prod(out)
    if kind == "flatten":
        return 0, (math.prod(shape),), math.prod(shape)
    if kind == "linear":
        n_in, n_out = _int(layer, "in_features"), _int(layer, "out_features")
        out = (*shape[:-1], n_out)
        return math.prod(out) * n_in, out, math.prod(shape) + math.prod(out)
    return 0, shape, 2 * math.prod(shape)  # element-wise: relu, norms, dropout (checked by the spec's whitelist)


def _layers_cost(layers: Any, shape: tuple[int, ...], where: str) -> tuple[int, tuple[int, ...], int]:
    if not isinstance(layers, list):
        raise SpecError(f"{where} must be a list of layers")
    macs, held = 0, 0
    for j, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise SpecError(f"{where}[{j}] must be an object with a 'type'")
        try:
            layer_macs, shape, layer_held = _layer_cost(layer, shape)
        except SpecError as err:
            raise SpecError(f"{where}[{j}]: {err}") from err
        macs, held = macs + layer_macs, max(held, layer_held)
    return macs, shape, held


def spec_cost(spec: Any) -> ModelCost:
    """FLOPs and peak activation bytes of a spec-form model, per sample, from its shapes alone (nothing built).

    Parameters
    ----------
    spec : dict
        The parsed spec.json (not yet validated: what cannot be costed is a SpecError).

    Returns
    -------
    ModelCost

    Raises
    ------
    SpecError
        If a shape or an argument the cost depends on is missing or not a positive integer.

    Examples
    --------
    >>> conv = {"type": "conv2d", "in_channels": 1, "out_channels": 8, "kernel_size": 3, "padding": 1}
    >>> spec_cost({"input_shape": [1, 28, 28], "stages": [{"layers": [conv]}]})
    ModelCost(flops=112896, peak_activation_bytes=28224)
    """
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise SpecError("spec must be an object with a non-empty list of 'stages'")
    shape: tuple[int, ...] = _input_shape(spec.get("input_shape"))
    outputs, macs, held = [shape], 0, 0
    for i, stage in enumerate(spec["stages"]):
        layers = stage.get("layers") if isinstance(stage, dict) else None
        stage_macs, shape, stage_held = _layers_cost(layers, shape, f"stages[{i}].layers")
        outputs.append(shape)
        macs, held = macs + stage_macs, max(held, stage_held)
    head_macs, _, head_held = _layers_cost(spec["stages"][-1].get("layers"), outputs[-2], "the last stage")
    branches = spec.get("branches", [])
    for b, branch in enumerate(branches if isinstance(branches, list) else []):
        after = branch.get("after_stage") if isinstance(branch, dict) else None
        if isinstance(after, bool) or not isinstance(after, int) or not 1 <= after < len(outputs) - 1:
            raise SpecError(f"branches[{b}].after_stage must name a stage before the last, got {after!r}")
        branch_macs, _, branch_held = _layers_cost(branch.get("layers"), outputs[after], f"branches[{b}].layers")
        head_macs, macs, held = head_macs + branch_macs, macs + branch_macs, max(held, branch_held)
    experts = spec.get("experts", [])
    # each expert head set copies every branch and the last stage
    macs += head_macs * (len(experts) if isinstance(experts, list) else 0)
    return ModelCost(flops=2 * macs, peak_activation_bytes=_FLOAT_BYTES * max(held, head_held))


def _input_shape(value: Any) -> tuple[int, int, int]:
    if (not isinstance(value, list) or len(value) != 3
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)):
        raise SpecError(f"input_shape must be [channels, height, width] of positive integers, got {value!r}")
    return tuple(value)


# -- the ONNX form: shape inference ---------------------------------------------------------------------------


def _graph_peak_bytes(data: bytes) -> int:
    """The largest input + output bytes of one node of a graph, batch 1 (unknown shapes count 0)."""
    import onnx

    model = onnx.load_model_from_string(data)
    constants = {t.name for t in model.graph.initializer}
    for node in model.graph.node:  # weights, and what is computed from weights alone (Identity, Constant)
        if all(name in constants for name in node.input):
            constants.update(node.output)
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(model).graph
    sizes: dict[str, int] = {}
    for value in (*inferred.value_info, *inferred.input, *inferred.output):
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            element = _ELEMENT_BYTES.get(value.type.tensor_type.elem_type, _FLOAT_BYTES)
            sizes[value.name] = element * math.prod(d.dim_value for d in dims)
    return max((sum(sizes.get(name, 0) for name in (*node.input, *node.output) if name not in constants)
                for node in inferred.node), default=0)


def onnx_files_cost(files: Mapping[str, bytes], manifest: Mapping[str, Any]) -> ModelCost:
    """FLOPs and peak activation bytes of an ONNX-form model, per sample, from its graphs (nothing run).

    Parameters
    ----------
    files : mapping of str to bytes
        The model's files by path.
    manifest : dict
        Its checked model.json (:func:`popex.runtime.onnx_model.read_manifest`).

    Returns
    -------
    ModelCost

    Raises
    ------
    OnnxModelError
        If a graph cannot be read as protobuf.
    """
    from popex.runtime.onnx_checks import describe_not_onnx
    from popex.runtime.onnx_model import OnnxModelError, manifest_files
    from popex.tiers.onnx_cost import graph_cost

    flops, peak = 0, 0
    for rel in manifest_files(manifest):
        try:
            flops += graph_cost(files[rel]).flops
            peak = max(peak, _graph_peak_bytes(files[rel]))
        except Exception as err:  # protobuf's DecodeError, shape inference's InferenceError
            raise OnnxModelError(f"{rel} cannot be read: {describe_not_onnx(files[rel])} ({type(err).__name__}: "
                                 f"{str(err).splitlines()[0][:200] if str(err) else ''})") from err
    return ModelCost(flops=flops, peak_activation_bytes=peak)


def files_cost(files: Mapping[str, bytes]) -> ModelCost:
    """The cost of a model given as its files, in either form (model.json wins, as everywhere).

    Raises
    ------
    SpecError, OnnxModelError
    """
    from popex.runtime.model_files import SPEC_FILE
    from popex.runtime.onnx_model import MANIFEST_FILE, read_manifest

    if MANIFEST_FILE in files:
        return onnx_files_cost(files, read_manifest(files[MANIFEST_FILE]))
    if SPEC_FILE not in files:
        raise SpecError(f"the model has neither {MANIFEST_FILE} nor {SPEC_FILE}")
    return spec_cost(loads_json(files[SPEC_FILE], name="spec", max_bytes=MAX_DOCUMENT_BYTES, error=SpecError))


def check_model_cost(cost: ModelCost, *, max_flops: int, max_activation_bytes: int) -> ModelCost:
    """Refuse a model over the caps, naming the computed value and the cap.

    Parameters
    ----------
    cost : ModelCost
    max_flops, max_activation_bytes : int
        The config's ``max_model_flops`` and ``max_activation_bytes``.

    Returns
    -------
    ModelCost
        ``cost``, within the caps.

    Raises
    ------
    CostError

    Examples
    --------
    >>> check_model_cost(ModelCost(5 * 10**9, 1000), max_flops=10**9, max_activation_bytes=2**20)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    popex.errors.CostError: the model needs 5,000,000,000 FLOPs per sample; at most 1,000,000,000 are taken ...
    """
    if cost.flops > max_flops:
        raise CostError(f"the model needs {cost.flops:,} FLOPs per sample; at most {max_flops:,} are taken "
                        "(max_model_flops)")
    if cost.peak_activation_bytes > max_activation_bytes:
        raise CostError(f"one layer of the model holds {cost.peak_activation_bytes:,} bytes of activations per "
                        f"sample; at most {max_activation_bytes:,} are taken (max_activation_bytes)")
    return cost
