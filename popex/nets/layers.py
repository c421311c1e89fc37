"""The whitelist of layer types a spec may use, their argument checks and builders.

Every layer of a spec (see :mod:`popex.nets.spec`) is looked up in
``LAYER_TYPES``; its arguments are checked by kind and its parameter count is
estimated from them before anything is allocated.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from popex.errors import SpecError
from popex.nets.blocks import BasicBlock, ConvBNActivation, InvertedResidual

__all__ = ["LAYER_TYPES", "MAX_CHANNELS", "build_layer", "check_layer", "check_spec_float", "check_spec_int"]

MAX_CHANNELS = 65_536

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")

# -- argument kinds --------------------------------------------------------------


def check_spec_int(value: Any, where: str, *, low: int = 0, high: int = MAX_CHANNELS) -> int:
    """An integer argument in ``low..high``; ``where`` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise SpecError(f"{where} must be in [{low}, {high}], got {value}")
    return value


def _positive(value: Any, where: str) -> int:
    return check_spec_int(value, where, low=1)


def _non_negative(value: Any, where: str) -> int:
    return check_spec_int(value, where, low=0)


def _size(value: Any, where: str) -> int | list[int]:
    """An int or a pair of ints >= 1 (kernel sizes, strides)."""
    if isinstance(value, list):
        if len(value) != 2:
            raise SpecError(f"{where} must be an integer or a pair, got a list of {len(value)}")
        return [check_spec_int(v, where, low=1, high=1024) for v in value]
    return check_spec_int(value, where, low=1, high=1024)


def _padding(value: Any, where: str) -> int | list[int]:
    if isinstance(value, list):
        if len(value) != 2:
            raise SpecError(f"{where} must be an integer or a pair, got a list of {len(value)}")
        return [check_spec_int(v, where, low=0, high=1024) for v in value]
    return check_spec_int(value, where, low=0, high=1024)


def check_spec_float(value: Any, where: str) -> float:
    """A finite number; ``where`` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SpecError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _probability(value: Any, where: str) -> float:
    p = check_spec_float(value, where)
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
        optional={"eps": check_spec_float, "momentum": _probability},
        build=lambda a: nn.BatchNorm2d(a["num_features"], eps=a.get("eps", 1e-5), momentum=a.get("momentum", 0.1)),
        n_parameters=lambda a: 2 * a["num_features"],
    ),
    "batchnorm1d": _LayerType(
        required={"num_features": _positive},
        optional={"eps": check_spec_float, "momentum": _probability},
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
            "in_features": lambda v, w: check_spec_int(v, w, low=1, high=16_777_216),
            "out_features": lambda v, w: check_spec_int(v, w, low=1, high=16_777_216),
        },
        optional={"bias": _bool},
        build=lambda a: nn.Linear(a["in_features"], a["out_features"], bias=a.get("bias", True)),
        n_parameters=lambda a: a["in_features"] * a["out_features"] + a["out_features"],
    ),
    "dropout": _LayerType(required={}, optional={"p": _probability}, build=lambda a: nn.Dropout(a.get("p", 0.5))),
    "flatten": _LayerType(required={}, optional={}, build=lambda a: nn.Flatten(1)),
    "localresponsenorm": _LayerType(
        required={"size": _positive},
        optional={"alpha": check_spec_float, "beta": check_spec_float, "k": check_spec_float},
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
        optional={"stride": lambda v, w: check_spec_int(v, w, low=1, high=2)},
        build=lambda a: BasicBlock(a["in_channels"], a["out_channels"], stride=a.get("stride", 1)),
        n_parameters=_basic_block_parameters,
    ),
    "inverted_residual": _LayerType(
        required={"in_channels": _positive, "out_channels": _positive},
        optional={
            "stride": lambda v, w: check_spec_int(v, w, low=1, high=2),
            "expand_ratio": lambda v, w: check_spec_int(v, w, low=1, high=32),
        },
        build=lambda a: InvertedResidual(
            a["in_channels"], a["out_channels"], stride=a.get("stride", 1), expand_ratio=a.get("expand_ratio", 6)
        ),
        n_parameters=_inverted_residual_parameters,
    ),
}


# -- validation ------------------------------------------------------------------


def check_layer(layer: Any, where: str) -> int:
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


def build_layer(layer: dict[str, Any]) -> nn.Module:
    """Instantiate one validated layer dict."""
    args = {k: v for k, v in layer.items() if k not in ("type", "name")}
    try:
        return LAYER_TYPES[layer["type"]].build(args)
    except ValueError as err:
        raise SpecError(f"layer {layer.get('name') or layer['type']!r}: {err}") from err
