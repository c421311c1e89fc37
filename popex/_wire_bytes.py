"""Untrusted offload bytes before they are a payload: inflating them, reading their header.

Both are bounded, and neither runs code. Public as :mod:`popex.wire`'s
:func:`~popex.wire.compress_payload` and :func:`~popex.wire.decompress_payload`.

Deflate on the HTTP hop: post-ReLU feature maps are a third to a half zeros and a normalised image
has a constant background, so a zlib stream (level 1) takes the bytes on
the wire to 0.4-0.6x of the raw fp32 tensor for ~0.2 ms of CPU (see
benchmarks/transport.py). Inflating stops at ``max_bytes``, so a small "zip
bomb" body cannot make the cloud allocate more than the payload limit.
"""

from __future__ import annotations

import zlib

import safetensors

from popex._wire_errors import UnsupportedEncodingError, WireError
from popex.checks import pickled_kind
from popex.untrusted import loads_json

__all__ = [
    "CONTENT_ENCODINGS",
    "WIRE_COMPRESSIONS",
    "MAX_WIRE_BYTES",
    "compress_payload",
    "decompress_payload",
    "read_header",
    "deserialize",
]

#: Largest offload payload, bytes (after inflating).
MAX_WIRE_BYTES = 64 * 2**20
#: HTTP Content-Encoding values the cloud accepts on an offload ("identity" = as is).
CONTENT_ENCODINGS = ("identity", "deflate")
#: What an edge may do to payloads on the HTTP hop (its ``wire_compression`` setting).
WIRE_COMPRESSIONS = ("deflate", "none")
_DEFLATE_LEVEL = 1  # level 6 saves another 2-5% of the bytes for 1.5x the time
_MAX_HEADER_BYTES = 64 * 1024  # a real header is ~300 bytes; refuse to JSON-parse more


def _describe_not_safetensors(data: bytes) -> str:
    kind = pickled_kind(data)
    if kind is not None:
        return f"it looks like {kind}, which POPEX never reads; send a safetensors payload"
    if data[:1] in (b"{", b"["):
        return "it looks like JSON; tensors travel as safetensors, never as JSON lists"
    return "it is not a valid safetensors payload"


def compress_payload(payload: bytes) -> bytes | None:
    """Deflate a wire payload for the HTTP hop; None when that would not shrink it.

    Parameters
    ----------
    payload : bytes
        The safetensors payload (:func:`popex.wire.encode_offload`).

    Returns
    -------
    bytes or None
        The zlib stream to send with ``Content-Encoding: deflate``, or None:
        send the payload as it is.

    Examples
    --------
    >>> payload = bytes(1024)
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

    Returns
    -------
    bytes
        The payload, inflated if it was deflated.

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


def read_header(data: bytes) -> dict:
    """The JSON header of a safetensors payload, after checking its length field.

    safetensors re-checks all of it; this gives the clear messages (a pickle
    or JSON named as such) before the full parse.

    Parameters
    ----------
    data : bytes
        The payload.

    Returns
    -------
    dict

    Raises
    ------
    WireError
        If the bytes are too short, the header is too long or not a JSON object.
    """
    if len(data) < 8:
        raise WireError(f"payload is {len(data)} bytes, too short for safetensors: {_describe_not_safetensors(data)}")
    n_header_bytes = int.from_bytes(data[:8], "little")
    if n_header_bytes > min(_MAX_HEADER_BYTES, len(data) - 8):
        raise WireError(f"cannot read the payload: {_describe_not_safetensors(data)} "
                        f"(header length field says {n_header_bytes} bytes)")
    try:
        header = loads_json(data[8:8 + n_header_bytes], name="the payload's header", max_bytes=_MAX_HEADER_BYTES,
                            error=WireError)
    except WireError as err:
        raise WireError(f"cannot read the payload: {_describe_not_safetensors(data)} ({err})") from err
    if not isinstance(header, dict):
        raise WireError("cannot read the payload: its safetensors header is not a JSON object")
    return header


def deserialize(data: bytes) -> list:
    """safetensors' own parse of ``data``: (name, view) pairs.

    Parameters
    ----------
    data : bytes

    Returns
    -------
    list of (str, dict)

    Raises
    ------
    WireError
        For anything safetensors refuses, a Rust panic included.
    """
    try:
        return safetensors.deserialize(data)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # SafetensorError, or a Rust panic surfaced as a BaseException
        raise WireError(f"cannot read the payload: {_describe_not_safetensors(data)} ({err})") from err
