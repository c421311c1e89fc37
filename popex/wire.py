"""The edge <-> cloud contract (DESIGN.md §6): the offload payload and the cloud's reply.

One offloaded request is one safetensors payload: the intermediate tensor
(batch dimension first) under the key ``"tensor"``, and string metadata::

    popex_wire  "1"           format version
    model_id    sha256 hex    which registered model continues the inference
    split       "0".."N-1"    stages already run on the edge
    wire_dtype  float32 | float16 | int8
    request_id  the edge's id of the request (echoed back)
    head        optional: the expert head set whose final stage the cloud runs (absent: pristine)
    scale       int8 only: repr() of the float step of the quantisation
    budget_ms   optional: ms left to the request; a batch has request_ids, budgets_ms (popex._wire_batch)

safetensors is a JSON header plus raw little-endian tensor bytes, so the
payload is the raw tensor plus a fixed ~280-byte header, and parsing it can
never run code: nothing on this path is unpickled or evaluated, and tensor
values never travel as JSON lists.

On the HTTP hop the payload may travel deflate-compressed (``Content-Encoding:
deflate``, :func:`compress_payload`; :func:`decompress_payload` inflates at
most ``max_bytes``).

The cloud answers an offload with one JSON object, :class:`OffloadReply`:
the cloud builds it with :meth:`OffloadReply.to_dict`, the edge reads it
with :meth:`OffloadReply.from_dict`, so both sides hold the same contract.

``int8`` is symmetric per-tensor quantisation: ``scale = max|x| / 127``,
``q = clamp(round(x / scale), -127, 127)``, decoded as ``q * scale``; every
value is reproduced within ``scale / 2``. An all-zero tensor gets scale 1.0.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import numpy as np
from safetensors.numpy import save as safetensors_save

from popex._wire_bytes import (
    CONTENT_ENCODINGS,
    MAX_WIRE_BYTES,
    WIRE_COMPRESSIONS,
    compress_payload,
    decompress_payload,
    deserialize,
    read_header,
)
from popex._wire_batch import BATCH_METADATA, batch_metadata, parse_batch_metadata
from popex._wire_errors import UnsupportedEncodingError, WireError
from popex.errors import ConfigError

__all__ = [
    "WIRE_DTYPES", "WIRE_FORMAT_VERSION", "TENSOR_KEY", "MAX_WIRE_BYTES", "CONTENT_ENCODINGS",
    "WIRE_COMPRESSIONS", "WireError", "UnsupportedEncodingError", "OffloadRequest", "OffloadReply",
    "encode_offload", "decode_offload", "replies_from_dict", "compress_payload", "decompress_payload",
]

WIRE_DTYPES = ("float32", "float16", "int8")
WIRE_FORMAT_VERSION = "1"
TENSOR_KEY = "tensor"

_MAX_ID_CHARS = 128
_MAX_SPLIT = 100_000
_MAX_NDIM = 8
_INT8_MAX = 127
_SPLIT_RE = re.compile(r"[0-9]{1,6}")
_REQUIRED_METADATA = ("popex_wire", "model_id", "split", "wire_dtype", "request_id")
_OPTIONAL_METADATA = ("head", "scale", *BATCH_METADATA)
# safetensors dtype tag and the little-endian numpy dtype of each wire dtype
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int8": "I8"}
_NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}
_MAX_LABEL = 2**31 - 1
_MAX_REPLY_MS = 3_600_000.0


# -- helpers -----------------------------------------------------------------------


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_ID_CHARS or not value.isprintable():
        raise WireError(f"{name} must be a non-empty printable string of at most {_MAX_ID_CHARS} characters, "
                        f"got {str(value)[:40]!r}")
    return value


def _check_metadata(metadata: object) -> dict[str, str]:
    if not isinstance(metadata, dict):
        raise WireError(f"payload has no POPEX metadata; it needs the keys {list(_REQUIRED_METADATA)}")
    missing = [key for key in _REQUIRED_METADATA if key not in metadata]
    if missing:
        raise WireError(f"payload metadata lacks {missing}; it needs the keys {list(_REQUIRED_METADATA)}")
    unexpected = sorted(set(metadata) - set(_REQUIRED_METADATA) - set(_OPTIONAL_METADATA))
    if unexpected:
        raise WireError(f"payload metadata has unexpected keys {unexpected[:5]}")
    if metadata["popex_wire"] != WIRE_FORMAT_VERSION:
        raise WireError(f"wire format version {str(metadata['popex_wire'])[:20]!r} is not supported; "
                        f"this cloud speaks {WIRE_FORMAT_VERSION!r}")
    if metadata["wire_dtype"] not in WIRE_DTYPES:
        raise WireError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {str(metadata['wire_dtype'])[:20]!r}")
    return metadata


def _parse_split(text: str) -> int:
    if not _SPLIT_RE.fullmatch(text):
        raise WireError(f"split must be a non-negative integer, got {text[:20]!r}")
    return int(text)


def _parse_scale(metadata: dict[str, str]) -> float | None:
    wire_dtype = metadata["wire_dtype"]
    if wire_dtype != "int8":
        if "scale" in metadata:
            raise WireError(f"metadata 'scale' belongs to int8 payloads, this one is {wire_dtype}")
        return None
    try:
        scale = float(metadata.get("scale", ""))
    except ValueError as err:
        raise WireError(f"int8 payload needs a float 'scale' in its metadata, got {metadata.get('scale')!r:.40}") \
            from err
    if not (math.isfinite(scale) and scale > 0):
        raise WireError(f"int8 'scale' must be a positive finite float, got {scale}")
    return scale


def _reply_number(body: dict, key: str, *, high: float) -> float:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= high:
        raise WireError(f"the cloud's reply has {key} = {str(value)[:40]!r}; expected a finite number in [0, {high:g}]")
    return float(value)


def _reply_text(body: dict, key: str) -> str:
    value = body[key]
    if not isinstance(value, str):
        raise WireError(f"the cloud's reply has {key} = {str(value)[:40]!r}; expected a string")
    return value


def _quantise_int8(x: np.ndarray) -> tuple[np.ndarray, float]:
    max_abs = float(np.abs(x).max())
    scale = max_abs / _INT8_MAX if max_abs > 0 else 1.0
    q = np.clip(np.rint(x / np.float32(scale)), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, scale


# -- request and reply -------------------------------------------------------------


@dataclass(frozen=True)
class OffloadRequest:
    """A decoded offload: the float32 tensor and where it belongs.

    ``n_bytes`` is the size of the payload on the wire, for the uplink monitor. A batch
    has ``request_ids`` and ``budgets_ms`` (one per sample); one sample may have ``budget_ms``.
    """

    tensor: np.ndarray
    model_id: str
    split: int
    wire_dtype: str
    request_id: str
    head: str | None
    n_bytes: int
    budget_ms: float | None = None
    request_ids: tuple[str, ...] | None = None
    budgets_ms: tuple[float, ...] | None = None


@dataclass(frozen=True)
class OffloadReply:
    """The cloud's answer to one offload: the body of ``POST /api/v1/infer``.

    Attributes
    ----------
    label : int
        Class index of the final exit.
    class_name : str
        Its name.
    confidence : float
        Max softmax probability of the final exit (temperature 1), in [0, 1].
    cloud_ms : float
        The cloud's inflate + decode + compute time, ms: the edge subtracts
        it from its round trip to get the transfer time.
    request_id : str
        The payload's ``request_id``, echoed.
    model_id : str
        The payload's ``model_id``, echoed.
    """

    label: int
    class_name: str
    confidence: float
    cloud_ms: float
    request_id: str
    model_id: str

    def to_dict(self) -> dict[str, int | float | str]:
        """The JSON object the cloud sends, keys in field order.

        Returns
        -------
        dict
            ``{"label", "class_name", "confidence", "cloud_ms", "request_id", "model_id"}``.

        Examples
        --------
        >>> OffloadReply(3, "cat", 0.9, 1.5, "r1", "m").to_dict()["class_name"]
        'cat'
        """
        return {"label": self.label, "class_name": self.class_name, "confidence": self.confidence,
                "cloud_ms": self.cloud_ms, "request_id": self.request_id, "model_id": self.model_id}

    @classmethod
    def from_dict(cls, body: object) -> OffloadReply:
        """Check a reply received from the cloud and type it.

        Keys beyond the six of :meth:`to_dict` are ignored, so a newer cloud
        may add some.

        Parameters
        ----------
        body : object
            The parsed JSON body.

        Returns
        -------
        OffloadReply

        Raises
        ------
        WireError
            If ``body`` is not an object with the six keys, ``label`` is not
            an int >= 0, ``confidence`` is not in [0, 1], ``cloud_ms`` is not
            a finite number >= 0, or a name or id is not a string.

        Examples
        --------
        >>> reply = OffloadReply(3, "cat", 0.9, 1.5, "r1", "m")
        >>> OffloadReply.from_dict(reply.to_dict()) == reply
        True
        >>> OffloadReply.from_dict({"label": 3})
        Traceback (most recent call last):
        ...
        popex.wire.WireError: the cloud's reply lacks ['class_name', 'confidence', 'cloud_ms', 'request_id', 'model_id']
        """
        if not isinstance(body, dict):
            raise WireError(f"the cloud's reply must be a JSON object, got {type(body).__name__}")
        missing = [field.name for field in fields(cls) if field.name not in body]
        if missing:
            raise WireError(f"the cloud's reply lacks {missing}")
        label = body["label"]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= _MAX_LABEL:
            raise WireError(f"the cloud's reply has label = {str(label)[:40]!r}; expected an int >= 0")
        return cls(label=label, class_name=_reply_text(body, "class_name"),
                   confidence=_reply_number(body, "confidence", high=1.0),
                   cloud_ms=_reply_number(body, "cloud_ms", high=_MAX_REPLY_MS),
                   request_id=_reply_text(body, "request_id"), model_id=_reply_text(body, "model_id"))


# -- public functions --------------------------------------------------------------


def encode_offload(
    tensor: np.ndarray,
    *,
    model_id: str,
    split: int,
    request_id: str,
    wire_dtype: str = "float32",
    head: str | None = None,
    budget_ms: float | None = None,
    request_ids: list[str] | None = None,
    budgets_ms: list[float] | None = None,
) -> bytes:
    """Serialise the tensor at a split into the safetensors wire payload.

    Parameters
    ----------
    tensor : array-like of float, shape (n, *stage_output_shape)
        The output of stage ``split`` on the edge, batch dimension first
        (normally n = 1). Floating point and finite.
    model_id : str
        The model's id (sha256 hex of spec + weights).
    split : int
        Number of stages run on the edge, 0..N-1.
    request_id : str
        The edge's id of the request; the cloud echoes it.
    wire_dtype : {"float32", "float16", "int8"}
        Precision on the wire: float16 halves the bytes, int8 quarters them
        (symmetric per-tensor quantisation, see the module docstring).
    head : str, optional
        Name of an expert head set (see :mod:`popex.nets.experts`); sent as
        metadata when given, omitted for the pristine heads.
    budget_ms, request_ids, budgets_ms : optional
        Time left to a one-sample request (ms); a batch's id and ms left per sample.

    Returns
    -------
    bytes
        The payload: raw tensor bytes plus a ~280-byte header.

    Raises
    ------
    WireError
        If the tensor is not floating point, has no batch dimension, is empty,
        or holds NaN or infinity; or an id or the split is malformed.
    ConfigError
        If ``wire_dtype`` is not one of :data:`WIRE_DTYPES`.

    Examples
    --------
    >>> payload = encode_offload(np.ones((1, 4), np.float32), model_id="m", split=1, request_id="r")
    >>> decode_offload(payload).tensor.shape
    (1, 4)
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ConfigError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {wire_dtype!r}")
    try:
        x = np.asarray(tensor)
    except (TypeError, ValueError, RuntimeError) as err:
        raise WireError(f"the offloaded tensor must be a floating-point array, got {type(tensor).__name__}") from err
    if not np.issubdtype(x.dtype, np.floating):
        raise WireError(f"the offloaded tensor must be a floating-point array, got {type(tensor).__name__} of {x.dtype}")
    if not 1 <= x.ndim <= _MAX_NDIM or x.size == 0:
        raise WireError(f"the offloaded tensor needs a batch dimension and values, got shape {list(x.shape)}")
    if isinstance(split, bool) or not isinstance(split, int) or not 0 <= split <= _MAX_SPLIT:
        raise WireError(f"split must be a non-negative int, got {split!r}")
    metadata = {
        "popex_wire": WIRE_FORMAT_VERSION,
        "model_id": _check_id(model_id, "model_id"),
        "split": str(split),
        "wire_dtype": wire_dtype,
        "request_id": _check_id(request_id, "request_id"),
    }
    if head is not None:
        metadata["head"] = _check_id(head, "head")
    metadata.update(batch_metadata(budget_ms=budget_ms, request_ids=request_ids, budgets_ms=budgets_ms,
                                   n_batch=x.shape[0]))
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise WireError("the offloaded tensor holds NaN or infinity")
    if wire_dtype == "float16":
        x = x.astype(np.float16)
    elif wire_dtype == "int8":
        x, scale = _quantise_int8(x)
        metadata["scale"] = repr(scale)
    return safetensors_save({TENSOR_KEY: x}, metadata=metadata)


def decode_offload(data: bytes, *, max_bytes: int = MAX_WIRE_BYTES) -> OffloadRequest:
    """Parse and check a wire payload received from the network.

    Only safetensors parses the bytes; nothing is unpickled. Every field is
    checked, so a payload that decodes is well formed; whether its shape fits
    the model at its split is for the cloud runner to check.

    Parameters
    ----------
    data : bytes
        The request body.
    max_bytes : int
        Largest accepted payload, in bytes.

    Returns
    -------
    OffloadRequest
        With the tensor as float32 (dequantised for int8).

    Raises
    ------
    WireError
        If the body is empty or larger than ``max_bytes``, not safetensors
        (a pickle or JSON is named as such), holds any key but ``"tensor"``,
        lacks or has unexpected metadata, has a dtype other than its
        ``wire_dtype``, a non-integer split, or NaN or infinite values.

    Examples
    --------
    >>> decode_offload(b"")
    Traceback (most recent call last):
    ...
    popex.wire.WireError: empty payload: expected a safetensors tensor
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise WireError("empty payload: expected a safetensors tensor")
    if len(data) > max_bytes:
        raise WireError(f"payload is {len(data)} bytes; at most {max_bytes} are accepted")
    header = read_header(data)  # cheap checks and clear messages before the full parse
    entries = deserialize(data)
    metadata = _check_metadata(header.get("__metadata__"))
    names = [name for name, _ in entries]
    if names != [TENSOR_KEY]:
        raise WireError(f"payload must hold exactly one tensor named {TENSOR_KEY!r}, it holds {names[:5]}")
    view = entries[0][1]
    wire_dtype = metadata["wire_dtype"]
    if view["dtype"] != _SAFETENSORS_DTYPES[wire_dtype]:
        raise WireError(f"tensor dtype {view['dtype']} does not match wire_dtype {wire_dtype!r} "
                        f"(expected {_SAFETENSORS_DTYPES[wire_dtype]})")
    shape = [int(n) for n in view["shape"]]
    if not 1 <= len(shape) <= _MAX_NDIM or 0 in shape:
        raise WireError(f"tensor needs a batch dimension and values, got shape {shape}")
    split = _parse_split(metadata["split"])
    scale = _parse_scale(metadata)
    values = np.frombuffer(view["data"], dtype=_NUMPY_DTYPES[wire_dtype]).reshape(shape)
    x = values.astype(np.float32)  # a copy: writable and native-endian
    with np.errstate(over="ignore"):  # int8: q * a huge scale overflows float32 to inf, refused just below
        x *= np.float32(1.0 if scale is None else scale)
    if not np.isfinite(x).all():  # int8 too: q * scale overflows float32 for a scale near 1e38
        raise WireError("tensor holds NaN or infinity" + (f" once dequantised (scale {scale:g})" if scale else ""))
    return OffloadRequest(
        tensor=x,
        model_id=_check_id(metadata["model_id"], "model_id"),
        split=split,
        wire_dtype=wire_dtype,
        request_id=_check_id(metadata["request_id"], "request_id"),
        head=_check_id(metadata["head"], "head") if "head" in metadata else None,
        n_bytes=len(data),
        **parse_batch_metadata(metadata, n_batch=shape[0]),
    )


def replies_from_dict(body: object, *, request_ids: tuple[str, ...]) -> list[OffloadReply]:
    """The cloud's answer to a batch, ``{"results": [...]}``: one checked :class:`OffloadReply` per id (else WireError).

    Parameters
    ----------
    body : object
        The parsed JSON body.
    request_ids : tuple of str
        The payload's ids, which the replies must echo in order.

    Returns
    -------
    list of OffloadReply
    """
    results = body.get("results") if isinstance(body, dict) else None
    if not isinstance(results, list) or len(results) != len(request_ids):
        raise WireError(f"the cloud's batch reply must hold {len(request_ids)} results under 'results'")
    replies = [OffloadReply.from_dict(result) for result in results]
    if tuple(reply.request_id for reply in replies) != tuple(request_ids):
        raise WireError("the cloud's batch reply does not echo the request ids in order")
    return replies
