"""The wire contract's errors; public as :mod:`popex.wire`'s (they report themselves as ``popex.wire``).

They live apart only so that the compression of the HTTP hop
(``popex/_wire_bytes.py``) can raise them without importing the contract
it is part of.
"""

from __future__ import annotations

from popex.errors import PopexError

__all__ = ["WireError", "UnsupportedEncodingError"]


class WireError(PopexError):
    """An offload payload or reply is malformed: not safetensors, wrong keys, metadata or values."""

    __module__ = "popex.wire"
    code = "bad_tensor"


class UnsupportedEncodingError(WireError):
    """An offload arrived with a Content-Encoding the cloud does not speak."""

    __module__ = "popex.wire"
    http_status = 415
    code = "unsupported_media_type"
