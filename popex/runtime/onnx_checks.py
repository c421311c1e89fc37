"""Checks of an ONNX graph file before ONNX Runtime sees it, and the dry run of a whole model.

A graph comes from a user or the network, so it is read as protobuf only
(``onnx.load_model_from_string`` with external data off): a pickle or a
``torch.save`` zip renamed ``.onnx`` is named as such, the opset must be in
:data:`SUPPORTED_OPSETS`, each graph has one input and one output, and
external data may only name files inside the model directory. The dry run
then chains the declared input through every stage and branch, so shapes
that do not chain fail at registration with the stage named, not at the
first request.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from popex.checks import pickled_kind
from popex.runtime.onnx_model import OnnxModelError

if TYPE_CHECKING:
    from popex.runtime.onnx_model import OnnxModel

__all__ = ["SUPPORTED_OPSETS", "MAX_ONNX_BYTES", "describe_not_onnx", "check_graph_file", "make_session", "dry_run"]

#: Default-domain opsets accepted (what torch.onnx exports and ONNX Runtime 1.30 runs).
SUPPORTED_OPSETS = range(13, 22)
#: Largest sum of a model's graph files and their external data, bytes.
MAX_ONNX_BYTES = 256 * 1024 * 1024


def describe_not_onnx(data: bytes) -> str:
    """What a file that is not an ONNX protobuf looks like (a pickle, a torch zip), for the message."""
    kind = pickled_kind(data)
    if kind is not None:
        return f"it looks like {kind}, which POPEX never unpickles; export the model to ONNX (`popex export`)"
    return "it is not an ONNX protobuf"


def _external_locations(model: Any) -> list[tuple[str, str]]:
    """(tensor name, location) of every initializer stored as external data, subgraphs included."""
    from onnx import TensorProto
    from onnx.external_data_helper import _get_all_tensors

    found = []
    for tensor in _get_all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
            found.append((tensor.name, location))
    return found


def check_graph_file(data: bytes, path: Path, root: Path, rel: str, *, max_bytes: int) -> int:
    """Check one graph file of a model directory; return the bytes of its external data.

    Parameters
    ----------
    data : bytes
        The file's content.
    path : Path
        Where it lies (external data is resolved against its folder).
    root : Path
        The model directory: external data must stay inside it.
    rel : str
        Its path in model.json, named in errors.
    max_bytes : int
        Bytes of external data still allowed.

    Returns
    -------
    int

    Raises
    ------
    OnnxModelError
    """
    import onnx

    if not data:
        raise OnnxModelError(f"{rel} is empty")
    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # protobuf's DecodeError and friends
        raise OnnxModelError(f"{rel} cannot be read: {describe_not_onnx(data)} ({type(err).__name__})") from err
    if not model.graph.node and not model.graph.output:
        raise OnnxModelError(f"{rel} cannot be read: {describe_not_onnx(data)} (no graph)")
    opsets = {entry.domain or "ai.onnx": entry.version for entry in model.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is None or opset not in SUPPORTED_OPSETS:
        raise OnnxModelError(f"{rel} uses opset {opset}; supported are {SUPPORTED_OPSETS.start}.."
                             f"{SUPPORTED_OPSETS.stop - 1} (export with opset 17)")
    initializer_names = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializer_names]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise OnnxModelError(f"{rel} must have exactly one input and one output, it has {len(inputs)} "
                             f"and {len(model.graph.output)}")
    external_bytes = 0
    root_resolved = root.resolve()
    for name, location in _external_locations(model):
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
            raise OnnxModelError(f"{rel}: tensor {name!r} keeps its data at {location!r}; external data "
                                 "must be a relative path inside the model directory")
        target = (path.parent / location).resolve()
        if root_resolved not in target.parents:
            raise OnnxModelError(f"{rel}: tensor {name!r} keeps its data at {location!r}, outside the model "
                                 "directory")
        if not target.is_file():
            raise OnnxModelError(f"{rel}: tensor {name!r} keeps its data in {location!r}, which is missing")
        external_bytes += target.stat().st_size
        if external_bytes > max_bytes:
            raise OnnxModelError(f"{rel}: its external data makes the model larger than the size limit")
    return external_bytes


def make_session(path: Path, rel: str, *, n_threads: int) -> Any:
    """One ONNX Runtime session for a checked graph file, on the CPU, with ``n_threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = n_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as err:  # ORT raises its own Fail/InvalidGraph/... types
        message = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise OnnxModelError(f"{rel} is not a graph ONNX Runtime can run: {message}") from err


def _declared_shape(graph: Any) -> list[Any]:
    dims = graph.session.get_inputs()[0].shape
    return [d if isinstance(d, int) else None for d in dims]


def _call(graph: Any, x: np.ndarray, what: str) -> np.ndarray:
    declared = _declared_shape(graph)
    actual = list(x.shape)
    if len(declared) != len(actual) or any(d is not None and d != a for d, a in zip(declared[1:], actual[1:])):
        raise OnnxModelError(f"{what} ({graph.path}) declares input shape "
                             f"{['batch' if d is None else d for d in declared]} but receives {actual}: "
                             "the stages' shapes do not chain")
    try:
        out = graph(x)
    except Exception as err:
        raise OnnxModelError(f"{what} ({graph.path}) fails on an input of shape {actual}: "
                             f"{str(err).splitlines()[0][:300] if str(err) else type(err).__name__}") from err
    if not isinstance(out, np.ndarray) or out.dtype != np.float32:
        raise OnnxModelError(f"{what} ({graph.path}) must output float32, got "
                             f"{getattr(out, 'dtype', type(out).__name__)}")
    if out.shape[:1] != x.shape[:1]:
        raise OnnxModelError(f"{what} ({graph.path}) must keep the batch axis: input batch {x.shape[0]}, "
                             f"output shape {list(out.shape)}")
    if not np.isfinite(out).all():
        raise OnnxModelError(f"{what} ({graph.path}) outputs NaN or infinity on the dry run")
    return out


def dry_run(model: OnnxModel) -> None:
    """Chain a batch of 2 zeros of the declared input shape through every stage, branch and head.

    Raises
    ------
    OnnxModelError
        Naming the first piece whose input does not fit, whose output is not
        float32 with the batch axis kept, or whose logits are not
        (batch, n_classes).
    """
    x = np.zeros((2, *model.input_shape), dtype=np.float32)
    outputs = [x]
    for i, graph in enumerate(model._stages):
        x = _call(graph, x, f"stage {i + 1}")
        outputs.append(x)
    want = (2, model.n_classes)

    def check_logits(logits: np.ndarray, what: str) -> None:
        if tuple(logits.shape) != want:
            raise OnnxModelError(f"{what} must produce {model.n_classes} logits (one per class name), it "
                                 f"produces shape {list(logits.shape[1:])}")

    check_logits(x, f"the last stage ({model._stages[-1].path})")
    for b, after in enumerate(model.branch_after_stage):
        check_logits(_call(model._branches[b], outputs[after], f"branch {b}"), f"branch {b}")
    for name, (branches, final) in model._experts.items():
        check_logits(_call(final, outputs[-2], f"expert {name!r} final stage"), f"expert {name!r} final stage")
        for b, after in enumerate(model.branch_after_stage):
            check_logits(_call(branches[b], outputs[after], f"expert {name!r} branch {b}"),
                         f"expert {name!r} branch {b}")
    model._shapes = [tuple(o.shape[1:]) for o in outputs]
