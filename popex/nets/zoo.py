"""The architecture zoo: specs for B-LeNet, B-AlexNet, B-ResNet and B-MobileNetV2.

Each public builder is keyword-only and returns a *spec* (plain JSON data),
so a zoo model travels and registers exactly like a user's model. Backbone
layer names follow torchvision where a torchvision model exists
(``conv1``/``layer1.0``/``fc`` for ResNet, ``features.N``/``classifier.1``
for MobileNetV2).
"""

from __future__ import annotations

import math
from typing import Any, Callable

from popex.errors import SpecError
from popex.nets.early_exit import EarlyExitNet
from popex.nets.spec import SPEC_FORMAT

__all__ = [
    "ZOO",
    "b_lenet_spec",
    "b_alexnet_spec",
    "b_resnet_spec",
    "b_mobilenetv2_spec",
    "zoo_spec",
]

_FASHION_MNIST_MEAN, _FASHION_MNIST_STD = 0.2860, 0.3530


# -- layer helpers -----------------------------------------------------------------


def _conv(c_in: int, c_out: int, k: int, *, name: str | None = None, stride: int = 1, padding: int = 0,
          bias: bool = True) -> dict[str, Any]:
    layer: dict[str, Any] = {"type": "conv2d", "in_channels": c_in, "out_channels": c_out, "kernel_size": k}
    if stride != 1:
        layer["stride"] = stride
    if padding:
        layer["padding"] = padding
    if not bias:
        layer["bias"] = False
    if name:
        layer["name"] = name
    return layer


def _bn(n: int, name: str | None = None) -> dict[str, Any]:
    return {"type": "batchnorm2d", "num_features": n, **({"name": name} if name else {})}


def _linear(n_in: int, n_out: int, name: str | None = None) -> dict[str, Any]:
    return {"type": "linear", "in_features": n_in, "out_features": n_out, **({"name": name} if name else {})}


_RELU = {"type": "relu"}
_FLATTEN = {"type": "flatten"}


def _pool_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _default_classes(n_classes: int, class_names: list[str] | None) -> list[str]:
    if class_names is None:
        return [f"class{i}" for i in range(n_classes)]
    if len(class_names) != n_classes:
        raise SpecError(f"got {len(class_names)} class names for n_classes={n_classes}")
    return list(class_names)


def _header(name: str, in_channels: int, image_size: int, class_names: list[str],
            mean: list[float] | None, std: list[float] | None) -> dict[str, Any]:
    return {
        "format": SPEC_FORMAT,
        "name": name,
        "input_shape": [in_channels, image_size, image_size],
        "mean": mean if mean is not None else [0.5] * in_channels,
        "std": std if std is not None else [0.25] * in_channels,
        "class_names": class_names,
    }


# -- B-LeNet ---------------------------------------------------------------------


def b_lenet_spec(*, n_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0,
                 class_names: list[str] | None = None, mean: list[float] | None = None,
                 std: list[float] | None = None) -> dict[str, Any]:
    """BranchyNet's B-LeNet: LeNet-5 with one branch after the first conv stage.

    ``width`` scales every channel and hidden-unit count (1.0 is LeNet-5's 6/16 channels, 120/84 units).
    """
    if not 0 < width <= 8:
        raise SpecError(f"width must be in (0, 8], got {width}")
    c1, c2, cb, h1, h2 = (max(2, round(c * width)) for c in (6, 16, 8, 120, 84))
    size1 = image_size // 2  # conv1 keeps the size (padding 2), pool halves it
    size2 = (size1 - 4) // 2
    size_branch = size1 // 2
    spec = _header("b-lenet", in_channels, image_size, _default_classes(n_classes, class_names), mean, std)
    spec["stages"] = [
        {"name": "conv1", "layers": [_conv(in_channels, c1, 5, padding=2, name="conv1"), _RELU,
                                     {"type": "maxpool2d", "kernel_size": 2}]},
        {"name": "conv2", "layers": [_conv(c1, c2, 5, name="conv2"), _RELU, {"type": "maxpool2d", "kernel_size": 2}]},
        {"name": "classifier", "layers": [_FLATTEN, _linear(c2 * size2 * size2, h1, "fc1"), _RELU,
                                          _linear(h1, h2, "fc2"), _RELU, _linear(h2, n_classes, "fc3")]},
    ]
    spec["branches"] = [
        {"after_stage": 1, "layers": [_conv(c1, cb, 3, padding=1), _RELU, {"type": "maxpool2d", "kernel_size": 2},
                                      _FLATTEN, _linear(cb * size_branch * size_branch, n_classes)]},
    ]
    return spec


# -- B-AlexNet -------------------------------------------------------------------


def b_alexnet_spec(*, n_classes: int = 10, in_channels: int = 1, image_size: int = 28, width: float = 1.0,
                   class_names: list[str] | None = None, mean: list[float] | None = None,
                   std: list[float] | None = None) -> dict[str, Any]:
    """BranchyNet's B-AlexNet for small images: five conv stages, branches after stages 1 and 2.

    Batch norm is added after each convolution (it trains in a few epochs on a
    CPU); names follow torchvision's AlexNet (``features.N``, ``classifier.N``).
    ``width`` scales every channel count (0.5 halves the compute).
    """
    if not 0 < width <= 8:
        raise SpecError(f"width must be in (0, 8], got {width}")
    c1, c2, c3, c4, c5, cb1, cb2 = (max(4, round(c * width)) for c in (32, 64, 96, 64, 64, 16, 32))
    pool = {"type": "maxpool2d", "kernel_size": 3, "stride": 2, "padding": 1}
    s1 = _pool_out(image_size, 3, 2, 1)
    s2 = _pool_out(s1, 3, 2, 1)
    s5 = _pool_out(s2, 3, 2, 1)
    sb1 = _pool_out(s1, 3, 2, 1)
    sb2 = _pool_out(s2, 3, 2, 1)
    spec = _header("b-alexnet", in_channels, image_size, _default_classes(n_classes, class_names), mean, std)
    spec["stages"] = [
        {"name": "conv1", "layers": [_conv(in_channels, c1, 5, padding=2, name="features.0"), _bn(c1, "features.1"),
                                     _RELU, pool]},
        {"name": "conv2", "layers": [_conv(c1, c2, 3, padding=1, name="features.4"), _bn(c2, "features.5"),
                                     _RELU, pool]},
        {"name": "conv3", "layers": [_conv(c2, c3, 3, padding=1, name="features.8"), _bn(c3, "features.9"), _RELU]},
        {"name": "conv4", "layers": [_conv(c3, c4, 3, padding=1, name="features.11"), _bn(c4, "features.12"),
                                     _RELU]},
        {"name": "conv5", "layers": [_conv(c4, c5, 3, padding=1, name="features.14"), _bn(c5, "features.15"),
                                     _RELU, pool]},
        {"name": "classifier", "layers": [
            _FLATTEN, {"type": "dropout", "p": 0.3}, _linear(c5 * s5 * s5, 256, "classifier.1"), _RELU,
            {"type": "dropout", "p": 0.3}, _linear(256, 128, "classifier.4"), _RELU,
            _linear(128, n_classes, "classifier.6")]},
    ]
    spec["branches"] = [
        {"after_stage": 1, "layers": [_conv(c1, cb1, 3, padding=1), _bn(cb1), _RELU, pool, _FLATTEN,
                                      _linear(cb1 * sb1 * sb1, n_classes)]},
        {"after_stage": 2, "layers": [_conv(c2, cb2, 3, padding=1), _bn(cb2), _RELU, pool, _FLATTEN,
                                      _linear(cb2 * sb2 * sb2, n_classes)]},
    ]
    return spec


# -- B-ResNet --------------------------------------------------------------------


def _gap_branch(channels: int, n_classes: int, *, stride: int = 1) -> list[dict[str, Any]]:
    return [_conv(channels, channels, 3, stride=stride, padding=1, bias=False), _bn(channels), _RELU,
            {"type": "adaptiveavgpool2d", "output_size": 1}, _FLATTEN, _linear(channels, n_classes)]


def b_resnet_spec(*, n_classes: int = 10, in_channels: int = 3, image_size: int = 32, width: int = 16,
                  blocks_per_layer: tuple[int, ...] = (2, 2, 2, 2), bottleneck_channels: int | None = None,
                  exit_flop_fractions: tuple[float, ...] | None = None, class_names: list[str] | None = None,
                  mean: list[float] | None = None, std: list[float] | None = None) -> dict[str, Any]:
    """A ResNet of basic blocks (ResNet-18 layout by default), each residual block a stage.

    The stem is a 3x3 convolution without max pooling, as usual for 32x32
    inputs; names are torchvision's (``conv1``, ``bn1``, ``layerL.B``, ``fc``).
    Branches sit after the last block of layer1, layer2 and layer3, at
    about 25/50/75% of the backbone's compute (every layer costs about the
    same); their convolution has stride 2, so that a branch adds a quarter
    of a full-resolution convolution, not a whole one, to its exit's cost.

    With ``bottleneck_channels`` the stem is made for split computing (the
    "bottleneck injection" of Matsubara et al.'s head-network distillation):
    two stride-2 convolutions bring the image to a quarter of its side and
    ``bottleneck_channels`` channels (linear, no ReLU), so the tensor a cut
    after the stem ships is smaller than the input itself; on 28x28 inputs
    every plain CNN's cut tensors are larger than the 3.1 KB image, and the
    planner then only ever chooses all-edge or all-cloud.

    ``exit_flop_fractions`` places the branches where the cumulative
    multiply-accumulates are nearest each fraction (as B-MobileNetV2 does)
    instead of after each layer.
    """
    if width < 1 or not blocks_per_layer or min(blocks_per_layer) < 1:
        raise SpecError(f"need width >= 1 and at least one block per layer, got {width}, {blocks_per_layer}")
    if bottleneck_channels is not None and not 1 <= bottleneck_channels <= 4096:
        raise SpecError(f"bottleneck_channels must be in [1, 4096], got {bottleneck_channels}")
    spec = _header("b-resnet", in_channels, image_size, _default_classes(n_classes, class_names), mean, std)
    if bottleneck_channels is None:
        stem_layers = [_conv(in_channels, width, 3, padding=1, bias=False, name="conv1"), _bn(width, "bn1"), _RELU]
        channels = width
    else:
        stem = max(8, width // 4)  # a cheap stem: the edge runs it before a cut at the bottleneck
        stem_layers = [_conv(in_channels, stem, 3, stride=2, padding=1, bias=False, name="conv1"), _bn(stem, "bn1"),
                       _RELU, _conv(stem, bottleneck_channels, 3, stride=2, padding=1, bias=False, name="bottleneck"),
                       _bn(bottleneck_channels, "bottleneck_bn")]
        channels = bottleneck_channels
    stages: list[dict[str, Any]] = [{"name": "stem", "layers": stem_layers}]
    branches = []
    for layer_index, n_blocks in enumerate(blocks_per_layer):
        out_channels = width * 2 ** layer_index
        for block in range(n_blocks):
            stride = 2 if layer_index > 0 and block == 0 else 1
            name = f"layer{layer_index + 1}.{block}"
            stages.append({"name": name, "layers": [{"type": "basic_block", "name": name, "in_channels": channels,
                                                     "out_channels": out_channels, "stride": stride}]})
            channels = out_channels
        if layer_index < len(blocks_per_layer) - 1:
            branches.append({"after_stage": len(stages), "layers": _gap_branch(channels, n_classes, stride=2)})
    stages[-1]["layers"] += [{"type": "adaptiveavgpool2d", "output_size": 1, "name": "avgpool"}, _FLATTEN,
                             _linear(channels, n_classes, "fc")]
    spec["stages"] = stages
    spec["branches"] = branches
    if exit_flop_fractions is not None:
        spec["branches"] = _branches_at_fractions(spec, exit_flop_fractions, n_classes, stride=2)
    return spec


def _branches_at_fractions(spec: dict[str, Any], fractions: tuple[float, ...], n_classes: int, *,
                           stride: int = 1) -> list[dict[str, Any]]:
    """Branches after the stages whose cumulative MACs are nearest each fraction, in order, one per stage."""
    from popex.nets.flops import stage_macs  # local: flops imports this package's net

    backbone = EarlyExitNet({**spec, "branches": []})
    macs = stage_macs(backbone)
    shapes = backbone.stage_output_shapes()
    total = sum(macs)
    cumulative_fraction = [sum(macs[:k]) / total for k in range(1, len(macs))]  # after stages 1..N-1
    branches: list[dict[str, Any]] = []
    previous = 0
    for fraction in fractions:
        # the stage whose cumulative share is nearest the target, after the previous exit
        candidates = range(previous + 1, len(macs))
        if not candidates:
            break
        k = min(candidates, key=lambda stage: abs(cumulative_fraction[stage - 1] - fraction))
        branches.append({"after_stage": k, "layers": _gap_branch(shapes[k][0], n_classes, stride=stride)})
        previous = k
    return branches


# -- B-MobileNetV2 ---------------------------------------------------------------

# torchvision's inverted residual setting: expand ratio t, channels c, repeats n, stride s
_MOBILENETV2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                        (6, 160, 3, 2), (6, 320, 1, 1))


def _make_divisible(value: float, divisor: int = 8) -> int:
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new_value + divisor if new_value < 0.9 * value else new_value


def b_mobilenetv2_spec(*, n_classes: int = 10, in_channels: int = 3, image_size: int = 32, width_mult: float = 1.0,
                       depth_mult: float = 1.0, exit_flop_fractions: tuple[float, ...] = (0.25, 0.5, 0.75),
                       class_names: list[str] | None = None, mean: list[float] | None = None,
                       std: list[float] | None = None) -> dict[str, Any]:
    """MobileNetV2 with side exits at fractions of its FLOPs (SPINN's placement).

    Each ``features.N`` block is a stage. For inputs below 64 pixels the stem
    and the first strided group keep stride 1 (the usual CIFAR adaptation),
    otherwise the strides are torchvision's. A branch goes after the first
    stage at which the cumulative multiply-accumulates reach each fraction.
    ``depth_mult`` scales each group's number of blocks (rounded up, at
    least one), as EfficientNet's depth coefficient does.
    """
    if not 0 < width_mult <= 8 or not 0 < depth_mult <= 8:
        raise SpecError(f"width_mult and depth_mult must be in (0, 8], got {width_mult}, {depth_mult}")
    small = image_size < 64
    input_channels = _make_divisible(32 * width_mult)
    last_channels = _make_divisible(1280 * max(1.0, width_mult))
    stages: list[dict[str, Any]] = [
        {"name": "features.0", "layers": [{"type": "conv_bn_act", "name": "features.0", "in_channels": in_channels,
                                           "out_channels": input_channels, "stride": 1 if small else 2}]},
    ]
    first_strided_group = True
    for t, c, n, s in _MOBILENETV2_SETTING:
        out_channels = _make_divisible(c * width_mult)
        for i in range(max(1, math.ceil(n * depth_mult))):
            stride = s if i == 0 else 1
            if small and s == 2 and i == 0 and first_strided_group:
                stride, first_strided_group = 1, False
            name = f"features.{len(stages)}"
            stages.append({"name": name, "layers": [{"type": "inverted_residual", "name": name,
                                                     "in_channels": input_channels, "out_channels": out_channels,
                                                     "stride": stride, "expand_ratio": t}]})
            input_channels = out_channels
    name = f"features.{len(stages)}"
    stages.append({"name": name, "layers": [
        {"type": "conv_bn_act", "name": name, "in_channels": input_channels, "out_channels": last_channels,
         "kernel_size": 1},
        {"type": "adaptiveavgpool2d", "output_size": 1}, _FLATTEN,
        {"type": "dropout", "p": 0.2, "name": "classifier.0"},
        _linear(last_channels, n_classes, "classifier.1")]})
    spec = _header("b-mobilenetv2", in_channels, image_size, _default_classes(n_classes, class_names), mean, std)
    spec["stages"] = stages
    spec["branches"] = _branches_at_fractions(spec, exit_flop_fractions, n_classes)
    return spec


ZOO: dict[str, Callable[..., dict[str, Any]]] = {
    "b-lenet": b_lenet_spec,
    "b-alexnet": b_alexnet_spec,
    "b-resnet": b_resnet_spec,
    "b-mobilenetv2": b_mobilenetv2_spec,
}


def zoo_spec(name: str, **options: Any) -> dict[str, Any]:
    """The spec of zoo architecture ``name``; options go to its builder.

    >>> zoo_spec("b-lenet")["name"]
    'b-lenet'
    """
    if name not in ZOO:
        raise SpecError(f"unknown architecture {name!r}; the zoo has {sorted(ZOO)}")
    return ZOO[name](**options)
