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
import re
from typing import Any


from popex.errors import SpecError
from popex.untrusted import MAX_DOCUMENT_BYTES, loads_json
from popex.runtime.exit_chain import PRISTINE_HEAD
from popex.nets.layers import LAYER_TYPES, build_layer, check_layer, check_spec_float, check_spec_int

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
MAX_CLASSES = 100_000
MAX_EXPERTS = 8

_EXPERT_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _check_layers(layers: Any, where: str) -> int:
    if not isinstance(layers, list) or not layers:
        raise SpecError(f"{where} must be a non-empty list of layers")
    return sum(check_layer(layer, f"{where}[{j}]") for j, layer in enumerate(layers))


def _check_vector(value: Any, where: str, length: int) -> None:
    if not isinstance(value, list) or len(value) != length:
        raise SpecError(f"{where} must be a list of {length} numbers (one per channel), got {value!r}")
    for j, v in enumerate(value):
        check_spec_float(v, f"{where}[{j}]")


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
    channels, height, width = (check_spec_int(v, f"input_shape[{j}]", low=1, high=4096) for j, v in enumerate(shape))
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
        k = check_spec_int(branch["after_stage"], f"{where}.after_stage", low=1, high=len(stages) - 1)
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
    spec = loads_json(data, name="spec", max_bytes=MAX_DOCUMENT_BYTES, error=SpecError)
    return validate_spec(spec)
