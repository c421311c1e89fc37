"""Model artifacts on disk and on the wire: spec.json + weights.safetensors.

Weights are only ever parsed as safetensors (a header of JSON plus raw
tensor bytes): nothing is unpickled, so a weights file from a user or the
network cannot run code. The model id is the sha256 of the canonical spec
JSON followed by the weights bytes, so the edge and the cloud agree on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from popex.checks import pickled_kind
from popex.errors import SpecError, WeightsError
from popex.nets.early_exit import EarlyExitNet
from popex.nets.spec import canonical_spec_bytes, parse_spec_json
from popex.decision.calibration import CALIBRATION_FILE
from popex.runtime.model_files import atomic_write_bytes

__all__ = [
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "CALIBRATION_FILE",
    "LoadedModel",
    "compute_model_id",
    "weights_to_bytes",
    "load_weights",
    "load_model_bytes",
    "load_model",
    "save_model",
    "atomic_write_bytes",
]

SPEC_FILE = "spec.json"
WEIGHTS_FILE = "weights.safetensors"
MAX_WEIGHTS_BYTES = 512 * 1024 * 1024


def _describe_not_safetensors(data: bytes) -> str:
    kind = pickled_kind(data)
    if kind is not None:
        return f"it looks like {kind}; POPEX never unpickles weights, save them with safetensors"
    return "it is not a safetensors file"


@dataclass(frozen=True)
class LoadedModel:
    """A built network with the artifacts it came from."""

    net: EarlyExitNet
    spec: dict[str, Any]
    model_id: str
    weights_bytes: bytes


def compute_model_id(spec: dict[str, Any], weights_bytes: bytes) -> str:
    """sha256 (hex) of the canonical spec JSON followed by the weights bytes.

    >>> compute_model_id({"a": 1}, b"")[:12]
    '015abd7f5cc5'
    """
    digest = hashlib.sha256()
    digest.update(canonical_spec_bytes(spec))
    digest.update(weights_bytes)
    return digest.hexdigest()


def weights_to_bytes(net: torch.nn.Module) -> bytes:
    """The network's state dict as safetensors bytes."""
    state = {key: tensor.detach().contiguous().cpu() for key, tensor in net.state_dict().items()}
    return safetensors_save(state)


def load_weights(net: EarlyExitNet, weights_bytes: bytes) -> None:
    """Load safetensors bytes into ``net``, checking every key, shape and dtype first.

    Raises
    ------
    WeightsError
        If the bytes are not safetensors (a pickle is named as such), or the
        tensors do not match the spec: nothing is loaded in that case.
    """
    if not weights_bytes:
        raise WeightsError("weights file is empty")
    if len(weights_bytes) > MAX_WEIGHTS_BYTES:
        raise WeightsError(f"weights file is {len(weights_bytes)} bytes; at most {MAX_WEIGHTS_BYTES} are accepted")
    try:
        tensors = safetensors_load(weights_bytes)
    except Exception as err:  # the parser raises its own error types for every kind of bad input
        raise WeightsError(f"cannot read weights: {_describe_not_safetensors(weights_bytes)} ({err})") from err
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise WeightsError(
            "weights do not match the spec: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for key, want in expected.items():  # the network's order, so the first mismatch reported is stable
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise WeightsError(f"weights do not match the spec: {key!r} has shape {list(tensor.shape)}, "
                               f"the spec needs {list(want.shape)}")
        if tensor.dtype.is_floating_point != want.dtype.is_floating_point:
            raise WeightsError(f"weights do not match the spec: {key!r} has dtype {tensor.dtype}, needs {want.dtype}")
        if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
            raise WeightsError(f"weights contain NaN or infinity in {key!r}")
    net.load_state_dict({key: tensor.to(expected[key].dtype) for key, tensor in tensors.items()}, strict=True)


def load_model_bytes(spec_bytes: bytes, weights_bytes: bytes) -> LoadedModel:
    """Build a model from spec JSON and safetensors bytes (from a file or the network).

    Raises
    ------
    SpecError, WeightsError
        With one message naming the problem.
    """
    spec = parse_spec_json(spec_bytes)
    net = EarlyExitNet(spec)
    load_weights(net, weights_bytes)
    net.eval()
    return LoadedModel(net=net, spec=spec, model_id=compute_model_id(spec, weights_bytes), weights_bytes=weights_bytes)


def load_model(directory: str | os.PathLike[str]) -> LoadedModel:
    """Load ``spec.json`` and ``weights.safetensors`` from a model directory."""
    directory = Path(directory)
    spec_path, weights_path = directory / SPEC_FILE, directory / WEIGHTS_FILE
    for path in (spec_path, weights_path):
        if not path.is_file():
            raise SpecError(f"model directory {str(directory)!r} has no {path.name}")
    return load_model_bytes(spec_path.read_bytes(), weights_path.read_bytes())


def save_model(net: EarlyExitNet, directory: str | os.PathLike[str]) -> str:
    """Write ``spec.json`` and ``weights.safetensors``; return the model id."""
    directory = Path(directory)
    weights_bytes = weights_to_bytes(net)
    atomic_write_bytes(directory / SPEC_FILE, (json.dumps(net.spec, indent=2) + "\n").encode())
    atomic_write_bytes(directory / WEIGHTS_FILE, weights_bytes)
    return compute_model_id(net.spec, weights_bytes)
