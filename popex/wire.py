"""The edge -> cloud tensor wire format (DESIGN.md §6).

One offloaded request is one safetensors payload: the intermediate tensor
(batch dimension first) under the key ``"tensor"``, and string metadata::

    popex_wire  "1"           format version
    model_id    sha256 hex    which registered model continues the inference
    split       "0".."N-1"    stages already run on the edge
    wire_dtype  float32 | float16 | int8
    request_id  the edge's id of the request (echoed back)
    head        optional: the expert head set whose final stage the cloud runs (absent: pristine)
    scale       int8 only: repr() of the float step of the quantisation

safetensors is a JSON header plus raw little-endian tensor bytes, so the
payload is the raw tensor plus a fixed ~280-byte header, and parsing it can
never run code: nothing on this path is unpickled or evaluated, and tensor
values never travel as JSON lists.

On the HTTP hop the payload may travel deflate-compressed (``Content-Encoding:
deflate``, a zlib stream, level 1): post-ReLU feature maps are a third to a
half zeros and a normalised image has a constant background, so the bytes
on the wire drop to 0.4-0.6x of the raw fp32 tensor for ~0.2 ms of CPU
(see benchmarks/transport.py). :func:`decompress_payload` inflates at most
``max_bytes``, so a small "zip bomb" body cannot make the cloud allocate more
than the payload limit.

``int8`` is symmetric per-tensor quantisation: ``scale = max|x| / 127``,
``q = clamp(round(x / scale), -127, 127)``, decoded as ``q * scale``; every
value is reproduced within ``scale / 2``. An all-zero tensor gets scale 1.0.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass

import numpy as np
import safetensors
import torch
from safetensors.numpy import save as safetensors_save

from popex.errors import ConfigError, PopexError

__all__ = [
    "WIRE_DTYPES",
    "WIRE_FORMAT_VERSION",
    "TENSOR_KEY",
    "MAX_WIRE_BYTES",
    "CONTENT_ENCODINGS",
    "WIRE_COMPRESSIONS",
    "WireError",
    "UnsupportedEncodingError",
    "OffloadRequest",
    "encode_offload",
    "decode_offload",
    "compress_payload",
    "decompress_payload",
]

WIRE_DTYPES = ("float32", "float16", "int8")
WIRE_FORMAT_VERSION = "1"
TENSOR_KEY = "tensor"
MAX_WIRE_BYTES = 64 * 2**20
#: HTTP Content-Encoding values the cloud accepts on an offload ("identity" = as is).
CONTENT_ENCODINGS = ("identity", "deflate")
#: What an edge may do to payloads on the HTTP hop (its ``wire_compression`` setting).
WIRE_COMPRESSIONS = ("deflate", "none")
_DEFLATE_LEVEL = 1  # level 6 saves another 2-5% of the bytes for 1.5x the time

_MAX_HEADER_BYTES = 64 * 1024  # a real header is ~300 bytes; refuse to JSON-parse more
_MAX_ID_CHARS = 128
_MAX_SPLIT = 100_000
_MAX_NDIM = 8
_INT8_MAX = 127
_SPLIT_RE = re.compile(r"[0-9]{1,6}")
_REQUIRED_METADATA = ("popex_wire", "model_id", "split", "wire_dtype", "request_id")
_OPTIONAL_METADATA = ("head", "scale")
# safetensors dtype tag and the little-endian numpy dtype of each wire dtype
_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "int8": "I8"}
_NUMPY_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}


class WireError(PopexError):
    """An offload payload is malformed: not safetensors, wrong keys, metadata or values."""

    code = "bad_tensor"


class UnsupportedEncodingError(WireError):
    """An offload arrived with a Content-Encoding the cloud does not speak."""

    http_status = 415
    code = "unsupported_media_type"


# -- helpers -----------------------------------------------------------------------


def _describe_not_safetensors(data: bytes) -> str:
    if data[:1] == b"\x80":
        return "it looks like a Python pickle, which POPEX never reads; send a safetensors payload"
    if data[:4] == b"PK\x03\x04":
        return "it looks like a torch.save() zip (a pickle inside), which POPEX never reads"
    if data[:1] in (b"{", b"["):
        return "it looks like JSON; tensors travel as safetensors, never as JSON lists"
    return "it is not a valid safetensors payload"


def _check_id(value: object, name: str) -> str:
    if not isinstance(value, str) or not value or len(value) > _MAX_ID_CHARS or not value.isprintable():
        raise WireError(f"{name} must be a non-empty printable string of at most {_MAX_ID_CHARS} characters, "
                        f"got {str(value)[:40]!r}")
    return value


def _read_header(data: bytes) -> dict:
    """The JSON header, after checking its length field (safetensors re-checks all of it)."""
    if len(data) < 8:
        raise WireError(f"payload is {len(data)} bytes, too short for safetensors: {_describe_not_safetensors(data)}")
    n_header_bytes = int.from_bytes(data[:8], "little")
    if n_header_bytes > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise WireError(f"cannot read the payload: {_describe_not_safetensors(data)} "
                        f"(header length field says {n_header_bytes} bytes)")
    try:
        header = json.loads(data[8:8 + n_header_bytes])
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WireError(f"cannot read the payload: {_describe_not_safetensors(data)}") from err
    if not isinstance(header, dict):
        raise WireError("cannot read the payload: its safetensors header is not a JSON object")
    return header


def _deserialize(data: bytes) -> list:
    try:
        return safetensors.deserialize(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # SafetensorError, or a Rust panic surfaced as a BaseException
        raise WireError(f"cannot read the payload: {_describe_not_safetensors(data)} ({err})") from err


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


def _quantise_int8(x: np.ndarray) -> tuple[np.ndarray, float]:
    max_abs = float(np.abs(x).max())
    scale = max_abs / _INT8_MAX if max_abs > 0 else 1.0
    q = np.clip(np.rint(x / np.float32(scale)), -_INT8_MAX, _INT8_MAX).astype(np.int8)
    return q, scale


# -- request -----------------------------------------------------------------------


@dataclass(frozen=True)
class OffloadRequest:
    """A decoded offload: the float32 tensor and where it belongs.

    ``n_bytes`` is the size of the payload on the wire, for the uplink monitor.
    """

    tensor: torch.Tensor
    model_id: str
    split: int
    wire_dtype: str
    request_id: str
    head: str | None
    n_bytes: int


# -- public functions --------------------------------------------------------------


def encode_offload(
    tensor: torch.Tensor,
    *,
    model_id: str,
    split: int,
    request_id: str,
    wire_dtype: str = "float32",
    head: str | None = None,
) -> bytes:
    """Serialise the tensor at a split into the safetensors wire payload.

    Parameters
    ----------
    tensor : Tensor, shape (n, *stage_output_shape)
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
    >>> payload = encode_offload(torch.ones(1, 4), model_id="m", split=1, request_id="r")
    >>> decode_offload(payload).tensor.shape
    torch.Size([1, 4])
    """
    if wire_dtype not in WIRE_DTYPES:
        raise ConfigError(f"wire_dtype must be one of {list(WIRE_DTYPES)}, got {wire_dtype!r}")
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        raise WireError(f"the offloaded tensor must be a floating-point torch.Tensor, got {type(tensor).__name__}"
                        + (f" of {tensor.dtype}" if isinstance(tensor, torch.Tensor) else ""))
    if not 1 <= tensor.dim() <= _MAX_NDIM or tensor.numel() == 0:
        raise WireError(f"the offloaded tensor needs a batch dimension and values, got shape {list(tensor.shape)}")
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
    # numpy, not torch, from here on: these arrays are small, and torch's intra-op thread
    # pool can stall for milliseconds on a busy CPU where numpy runs single-threaded.
    x = np.ascontiguousarray(tensor.detach().to("cpu", torch.float32).numpy())
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
    header = _read_header(data)  # cheap checks and clear messages before the full parse
    entries = _deserialize(data)
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
    if scale is not None:
        x *= np.float32(scale)
    elif not np.isfinite(x).all():
        raise WireError("tensor holds NaN or infinity")
    return OffloadRequest(
        tensor=torch.from_numpy(x),
        model_id=_check_id(metadata["model_id"], "model_id"),
        split=split,
        wire_dtype=wire_dtype,
        request_id=_check_id(metadata["request_id"], "request_id"),
        head=_check_id(metadata["head"], "head") if "head" in metadata else None,
        n_bytes=len(data),
    )


def compress_payload(payload: bytes) -> bytes | None:
    """Deflate a wire payload for the HTTP hop; None when that would not shrink it.

    Examples
    --------
    >>> payload = encode_offload(torch.zeros(1, 256), model_id="m", split=1, request_id="r")
    >>> body = compress_payload(payload)
    >>> len(body) < len(payload), decompress_payload(body, encoding="deflate") == payload
    (True, True)
    """
    body = zlib.compress(payload, _DEFLATE_LEVEL)
    return body if len(body) < len(payload) else None


def decompress_payload(body: bytes, *, encoding: str | None, max_bytes: int = MAX_WIRE_BYTES) -> bytes:
    """The wire payload inside an HTTP body sent with ``Content-Encoding: encoding``.

    Parameters
    ----------
    body : bytes
        The request body as received.
    encoding : str or None
        The Content-Encoding header; None or "identity" for an uncompressed body.
    max_bytes : int
        Largest payload accepted after inflating.

    Raises
    ------
    UnsupportedEncodingError
        For an encoding other than :data:`CONTENT_ENCODINGS` (HTTP 415).
    WireError
        If the body is not a complete zlib stream or inflates beyond ``max_bytes``.
    """
    name = (encoding or "identity").strip().lower()
    if name == "identity":
        return bytes(body)
    if name != "deflate":
        raise UnsupportedEncodingError(f"Content-Encoding {encoding[:40]!r} is not supported; "
                                       f"use one of {list(CONTENT_ENCODINGS)}")
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(body, max_bytes + 1)
    except zlib.error as err:
        raise WireError(f"the body says Content-Encoding: deflate but is not a zlib stream ({err})") from err
    if len(payload) > max_bytes or inflater.unconsumed_tail:
        raise WireError(f"the deflated payload inflates beyond the {max_bytes}-byte limit")
    if not inflater.eof or inflater.unused_data:
        raise WireError("the deflated payload is truncated or has trailing bytes")
    return payload
