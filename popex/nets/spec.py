"""The JSON model spec: a whitelist of layer types, checked before anything is built.

A spec arrives from users and over the network, so it is data, never code:
every layer type and every argument is looked up in ``LAYER_TYPES``; anything
else is refused with a message naming where it sits (``stages[2].layers[0]``).
Parameter counts are estimated from the arguments *before* a tensor is
allocated, so a hostile spec cannot make the service allocate gigabytes.

A spec looks like::

    {
      "format": "popex-spec/1",
      "name": "b-lenet",
      "input_shape": [1, 28, 28], "mean": [0.286], "std": [0.353],
      "class_names": ["T-shirt/top", ...],
      "stages": [{"name": "conv1", "layers": [{"type": "conv2d", "name": "conv1",
                   "in_channels": 1, "out_channels": 6, "kernel_size": 5}, ...]}, ...],
      "branches": [{"after_stage": 1, "layers": [...]}]
    }

A layer's optional ``name`` is its dotted module path in the network
(``features.3``, ``layer1.0``, ``fc``): it becomes the state-dict key prefix,
which is how torchvision parameter names are kept.

An optional ``"experts": ["blur", "noise"]`` adds one *head set* per name:
its own copy of every branch and of the last stage (which holds the final
classifier), while the other stages stay shared. The backbone's own heads
are the ``"pristine"`` head set (see :mod:`popex.nets.experts`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from popex.errors import SpecError
from popex.nets.blocks import BasicBlock, ConvBNActivation, InvertedResidual

__all__ = [
    "SPEC_FORMAT",
    "LAYER_TYPES",
    "PRISTINE_HEAD",
    "MAX_EXPERTS",
    "MAX_PARAMETERS",
    "validate_spec",
    "canonical_spec_bytes",
    "build_layer",
    "parse_spec_json",
]

SPEC_FORMAT = "popex-spec/1"
MAX_PARAMETERS = 60_000_000  # ~240 MB of fp32 weights; larger specs are refused before allocation
MAX_LAYERS = 1_000
MAX_INPUT_VALUES = 3 * 1024 * 1024
MAX_CHANNELS = 65_536
MAX_CLASSES = 100_000
MAX_EXPERTS = 8
PRISTINE_HEAD = "pristine"  # the backbone's own head set; never listed under "experts"

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
_EXPERT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


# -- argument kinds --------------------------------------------------------------


def _check_int(value: Any, where: str, *, low: int = 0, high: int = MAX_CHANNELS) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SpecError(f"{where} must be in [{low}, {high}], got {value}")
    return value


def _positive(value: Any, where: str) -> int:
    return _check_int(value, where, low=1)


def _non_negative(value: Any, where: str) -> int:
    return _check_int(value, where, low=0)


def _size(value: Any, where: str) -> int | list[int]:
    """An int or a pair of ints >= 1 (kernel sizes, strides)."""
    if isinstance(value, list):
        if len(value) != 2:
            raise SpecError(f"{where} must be an integer or a pair, got a list of {len(value)}")
        return [_check_int(v, where, low=1, high=1024) for v in value]
    return _check_int(value, where, low=1, high=1024)


def _padding(value: Any, where: str) -> int | list[int]:
    if isinstance(value, list):
        if len(value) != 2:
            raise SpecError(f"{where} must be an integer or a pair, got a list of {len(value)}")
        return [_check_int(v, where, low=0, high=1024) for v in value]
    return _check_int(value, where, low=0, high=1024)


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _probability(value: Any, where: str) -> float:
    p = _float(value, where)
    if not 0.0 <= p < 1.0:
        raise SpecError(f"{where} must be in [0, 1), got {p}")
    return p


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise SpecError(f"{where} must be true or false, got {value!r}")
    return value


def _activation(value: Any, where: str) -> str | None:
    if value not in ("relu", "relu6", None):
        raise SpecError(f"{where} must be 'relu', 'relu6' or null, got {value!r}")
    return value


def _pair_product(value: int | list[int]) -> int:
    return value[0] * value[1] if isinstance(value, list) else value * value


# -- the whitelist ---------------------------------------------------------------


@dataclass(frozen=True)
class _LayerType:
    """How one whitelisted layer type is checked, costed and built."""

    required: dict[str, Callable[[Any, str], Any]]
    optional: dict[str, Callable[[Any, str], Any]]
    build: Callable[[dict[str, Any]], nn.Module]
    n_parameters: Callable[[dict[str, Any]], int] = lambda args: 0


def _conv_parameters(a: dict[str, Any]) -> int:
    groups = a.get("groups", 1)
    weights = a["out_channels"] * (a["in_channels"] // groups) * _pair_product(a["kernel_size"])
    return weights + (a["out_channels"] if a.get("bias", True) else 0)


def _build_conv(a: dict[str, Any]) -> nn.Module:
    if a["in_channels"] % a.get("groups", 1) or a["out_channels"] % a.get("groups", 1):
        raise SpecError(f"groups={a['groups']} must divide in_channels and out_channels")
    return nn.Conv2d(
        a["in_channels"],
        a["out_channels"],
        a["kernel_size"],
        stride=a.get("stride", 1),
        padding=a.get("padding", 0),
        dilation=a.get("dilation", 1),
        groups=a.get("groups", 1),
        bias=a.get("bias", True),
    )


def _inverted_residual_parameters(a: dict[str, Any]) -> int:
    hidden = round(a["in_channels"] * a.get("expand_ratio", 6))
    return a["in_channels"] * hidden + 9 * hidden + hidden * a["out_channels"] + 4 * hidden + 2 * a["out_channels"]


def _basic_block_parameters(a: dict[str, Any]) -> int:
    c_in, c_out = a["in_channels"], a["out_channels"]
    return 9 * c_in * c_out + 9 * c_out * c_out + c_in * c_out + 6 * c_out


_POOL_ARGS = {"stride": _size, "padding": _padding}

LAYER_TYPES: dict[str, _LayerType] = {
    "conv2d": _LayerType(
        required={"in_channels": _positive, "out_channels": _positive, "kernel_size": _size},
        optional={"stride": _size, "padding": _padding, "dilation": _size, "groups": _positive, "bias": _bool},
        build=_build_conv,
        n_parameters=_conv_parameters,
    ),
    "batchnorm2d": _LayerType(
        required={"num_features": _positive},
        optional={"eps": _float, "momentum": _probability},
        build=lambda a: nn.BatchNorm2d(a["num_features"], eps=a.get("eps", 1e-5), momentum=a.get("momentum", 0.1)),
        n_parameters=lambda a: 2 * a["num_features"],
    ),
    "batchnorm1d": _LayerType(
        required={"num_features": _positive},
        optional={"eps": _float, "momentum": _probability},
        build=lambda a: nn.BatchNorm1d(a["num_features"], eps=a.get("eps", 1e-5), momentum=a.get("momentum", 0.1)),
        n_parameters=lambda a: 2 * a["num_features"],
    ),
    "relu": _LayerType(required={}, optional={}, build=lambda a: nn.ReLU()),
    "relu6": _LayerType(required={}, optional={}, build=lambda a: nn.ReLU6()),
    "maxpool2d": _LayerType(
        required={"kernel_size": _size},
        optional={**_POOL_ARGS, "ceil_mode": _bool},
        build=lambda a: nn.MaxPool2d(
            a["kernel_size"], stride=a.get("stride"), padding=a.get("padding", 0), ceil_mode=a.get("ceil_mode", False)
        ),
    ),
    "avgpool2d": _LayerType(
        required={"kernel_size": _size},
        optional={**_POOL_ARGS, "ceil_mode": _bool},
        build=lambda a: nn.AvgPool2d(
            a["kernel_size"], stride=a.get("stride"), padding=a.get("padding", 0), ceil_mode=a.get("ceil_mode", False)
        ),
    ),
    "adaptiveavgpool2d": _LayerType(
        required={"output_size": _size}, optional={}, build=lambda a: nn.AdaptiveAvgPool2d(a["output_size"])
    ),
    "adaptivemaxpool2d": _LayerType(
        required={"output_size": _size}, optional={}, build=lambda a: nn.AdaptiveMaxPool2d(a["output_size"])
    ),
    "linear": _LayerType(
        required={
            "in_features": lambda v, w: _check_int(v, w, low=1, high=16_777_216),
            "out_features": lambda v, w: _check_int(v, w, low=1, high=16_777_216),
        },
        optional={"bias": _bool},
        build=lambda a: nn.Linear(a["in_features"], a["out_features"], bias=a.get("bias", True)),
        n_parameters=lambda a: a["in_features"] * a["out_features"] + a["out_features"],
    ),
    "dropout": _LayerType(required={}, optional={"p": _probability}, build=lambda a: nn.Dropout(a.get("p", 0.5))),
    "flatten": _LayerType(required={}, optional={}, build=lambda a: nn.Flatten(1)),
    "localresponsenorm": _LayerType(
        required={"size": _positive},
        optional={"alpha": _float, "beta": _float, "k": _float},
        build=lambda a: nn.LocalResponseNorm(
            a["size"], alpha=a.get("alpha", 1e-4), beta=a.get("beta", 0.75), k=a.get("k", 1.0)
        ),
    ),
    "conv_bn_act": _LayerType(
        required={"in_channels": _positive, "out_channels": _positive},
        optional={"kernel_size": _positive, "stride": _positive, "groups": _positive, "activation": _activation},
        build=lambda a: ConvBNActivation(
            a["in_channels"],
            a["out_channels"],
            kernel_size=a.get("kernel_size", 3),
            stride=a.get("stride", 1),
            groups=a.get("groups", 1),
            activation=a.get("activation", "relu6"),
        ),
        n_parameters=lambda a: _conv_parameters({**a, "kernel_size": a.get("kernel_size", 3), "bias": False})
        + 2 * a["out_channels"],
    ),
    "basic_block": _LayerType(
        required={"in_channels": _positive, "out_channels": _positive},
        optional={"stride": lambda v, w: _check_int(v, w, low=1, high=2)},
        build=lambda a: BasicBlock(a["in_channels"], a["out_channels"], stride=a.get("stride", 1)),
        n_parameters=_basic_block_parameters,
    ),
    "inverted_residual": _LayerType(
        required={"in_channels": _positive, "out_channels": _positive},
        optional={
            "stride": lambda v, w: _check_int(v, w, low=1, high=2),
            "expand_ratio": lambda v, w: _check_int(v, w, low=1, high=32),
        },
        build=lambda a: InvertedResidual(
            a["in_channels"], a["out_channels"], stride=a.get("stride", 1), expand_ratio=a.get("expand_ratio", 6)
        ),
        n_parameters=_inverted_residual_parameters,
    ),
}


# -- validation ------------------------------------------------------------------


def _check_layer(layer: Any, where: str) -> int:
    """Check one layer dict; return its estimated parameter count."""
    if not isinstance(layer, dict):
        raise SpecError(f"{where} must be an object with a 'type', got {type(layer).__name__}")
    kind = layer.get("type")
    if kind not in LAYER_TYPES:
        allowed = ", ".join(sorted(LAYER_TYPES))
        raise SpecError(f"{where}: unknown layer type {kind!r}; allowed: {allowed}")
    layer_type = LAYER_TYPES[kind]
    name = layer.get("name")
    if name is not None and (not isinstance(name, str) or not _NAME_RE.match(name) or len(name) > 200):
        raise SpecError(f"{where}.name must be a dotted identifier like 'features.3', got {name!r}")
    known = set(layer_type.required) | set(layer_type.optional) | {"type", "name"}
    unknown = sorted(set(layer) - known)
    if unknown:
        raise SpecError(f"{where}: unknown argument(s) {unknown} for layer type {kind!r}")
    for arg, check in layer_type.required.items():
        if arg not in layer:
            raise SpecError(f"{where}: layer type {kind!r} needs argument {arg!r}")
        check(layer[arg], f"{where}.{arg}")
    for arg, check in layer_type.optional.items():
        if arg in layer and not (arg == "activation" and layer[arg] is None):
            check(layer[arg], f"{where}.{arg}")
    return layer_type.n_parameters(layer)


def _check_layers(layers: Any, where: str) -> int:
    if not isinstance(layers, list) or not layers:
        raise SpecError(f"{where} must be a non-empty list of layers")
    return sum(_check_layer(layer, f"{where}[{j}]") for j, layer in enumerate(layers))


def _check_vector(value: Any, where: str, length: int) -> None:
    if not isinstance(value, list) or len(value) != length:
        raise SpecError(f"{where} must be a list of {length} numbers (one per channel), got {value!r}")
    for j, v in enumerate(value):
        _float(v, f"{where}[{j}]")


def _check_experts(experts: Any) -> int:
    """Check the optional ``experts`` list: distinct lower-case names; return how many."""
    if not isinstance(experts, list) or len(experts) > MAX_EXPERTS:
        raise SpecError(f"experts must be a list of at most {MAX_EXPERTS} head-set names, got {experts!r}")
    for j, name in enumerate(experts):
        if not isinstance(name, str) or not _EXPERT_NAME_RE.match(name):
            raise SpecError(f"experts[{j}] must be a lower-case identifier like 'blur' (at most 32 characters), "
                            f"got {name!r}")
        if name == PRISTINE_HEAD:
            raise SpecError(f"experts[{j}]: {PRISTINE_HEAD!r} is the backbone's own head set; do not list it")
    if len(set(experts)) != len(experts):
        raise SpecError(f"experts must not repeat a name, got {experts}")
    return len(experts)


def validate_spec(spec: Any) -> dict[str, Any]:
    """Check a spec against the whitelist without building anything.

    Parameters
    ----------
    spec : dict
        The parsed JSON spec.

    Returns
    -------
    dict
        The same spec (validated; it is not modified).

    Raises
    ------
    SpecError
        Naming the first problem found: an unknown layer type or argument,
        a bad value, missing stages, a branch out of range, a model too large.

    Examples
    --------
    >>> validate_spec({"stages": []})
    Traceback (most recent call last):
    ...
    popex.errors.SpecError: spec is missing 'input_shape'
    """
    if not isinstance(spec, dict):
        raise SpecError(f"a spec must be a JSON object, got {type(spec).__name__}")
    for key in ("input_shape", "class_names", "stages"):
        if key not in spec:
            raise SpecError(f"spec is missing {key!r}")
    allowed = {"format", "name", "input_shape", "mean", "std", "class_names", "stages", "branches", "description",
               "experts"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise SpecError(f"unknown spec key(s) {unknown}; allowed: {sorted(allowed)}")
    if spec.get("format", SPEC_FORMAT) != SPEC_FORMAT:
        raise SpecError(f"spec format must be {SPEC_FORMAT!r}, got {spec.get('format')!r}")
    if "name" in spec and not isinstance(spec["name"], str):
        raise SpecError("spec 'name' must be a string")

    shape = spec["input_shape"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise SpecError(f"input_shape must be [channels, height, width], got {shape!r}")
    channels, height, width = (_check_int(v, f"input_shape[{j}]", low=1, high=4096) for j, v in enumerate(shape))
    if channels * height * width > MAX_INPUT_VALUES:
        raise SpecError(f"input_shape {shape} has more than {MAX_INPUT_VALUES} values")
    for key in ("mean", "std"):
        if key in spec:
            _check_vector(spec[key], key, channels)
    if "std" in spec and any(v <= 0 for v in spec["std"]):
        raise SpecError(f"std must be positive, got {spec['std']}")

    names = spec["class_names"]
    if not isinstance(names, list) or not 2 <= len(names) <= MAX_CLASSES:
        raise SpecError(f"class_names must be a list of 2..{MAX_CLASSES} strings")
    if not all(isinstance(n, str) for n in names):
        raise SpecError("class_names must all be strings")

    stages = spec["stages"]
    if not isinstance(stages, list) or len(stages) < 1:
        raise SpecError("stages must be a non-empty list (the final classifier is part of the last stage)")
    n_parameters = 0
    n_layers = 0
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict) or "layers" not in stage:
            raise SpecError(f"{where} must be an object with 'layers'")
        if set(stage) - {"name", "layers"}:
            raise SpecError(f"{where}: unknown key(s) {sorted(set(stage) - {'name', 'layers'})}")
        if "name" in stage and not isinstance(stage["name"], str):
            raise SpecError(f"{where}.name must be a string")
        stage_parameters = _check_layers(stage["layers"], f"{where}.layers")
        n_parameters += stage_parameters
        n_layers += len(stage["layers"])
    head_parameters, head_layers = stage_parameters, len(stages[-1]["layers"])  # the last stage is in every head

    branches = spec.get("branches", [])
    if not isinstance(branches, list):
        raise SpecError("branches must be a list")
    previous = 0
    for b, branch in enumerate(branches):
        where = f"branches[{b}]"
        if not isinstance(branch, dict) or "after_stage" not in branch or "layers" not in branch:
            raise SpecError(f"{where} must be an object with 'after_stage' and 'layers'")
        if set(branch) - {"after_stage", "layers", "name"}:
            raise SpecError(f"{where}: unknown key(s) {sorted(set(branch) - {'after_stage', 'layers', 'name'})}")
        k = _check_int(branch["after_stage"], f"{where}.after_stage", low=1, high=len(stages) - 1)
        if k <= previous:
            raise SpecError(
                f"{where}.after_stage={k}: branches must be listed in order, one per stage at most "
                f"(the previous branch is after stage {previous})"
            )
        previous = k
        branch_parameters = _check_layers(branch["layers"], f"{where}.layers")
        n_parameters += branch_parameters
        n_layers += len(branch["layers"])
        head_parameters += branch_parameters
        head_layers += len(branch["layers"])

    # Each expert holds its own copy of every branch and of the last stage.
    n_expert_sets = _check_experts(spec.get("experts", []))
    n_layers += n_expert_sets * head_layers
    n_parameters += n_expert_sets * head_parameters

    if n_layers > MAX_LAYERS:
        raise SpecError(f"spec has {n_layers} layers; at most {MAX_LAYERS} are allowed")
    if n_parameters > MAX_PARAMETERS:
        raise SpecError(f"spec declares about {n_parameters:,} parameters; at most {MAX_PARAMETERS:,} are allowed")
    return spec


def canonical_spec_bytes(spec: dict[str, Any]) -> bytes:
    """The spec as canonical JSON (sorted keys, no spaces): what the model id hashes.

    >>> canonical_spec_bytes({"b": 1, "a": [1, 2]})
    b'{"a":[1,2],"b":1}'
    """
    return json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def parse_spec_json(data: bytes | str) -> dict[str, Any]:
    """Parse and validate spec JSON that came from a file or the network.

    Raises
    ------
    SpecError
        If the bytes are not UTF-8 JSON or the spec is invalid.
    """
    try:
        spec = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SpecError(f"spec is not valid JSON: {err}") from err
    return validate_spec(spec)


def build_layer(layer: dict[str, Any]) -> nn.Module:
    """Instantiate one validated layer dict."""
    args = {k: v for k, v in layer.items() if k not in ("type", "name")}
    try:
        return LAYER_TYPES[layer["type"]].build(args)
    except ValueError as err:
        raise SpecError(f"layer {layer.get('name') or layer['type']!r}: {err}") from err
