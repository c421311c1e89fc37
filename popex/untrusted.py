"""Reading bytes that came from outside: JSON of bounded size and depth, ``.npz`` checked before allocation.

Python's ``json`` recurses once per nesting level, so a body of ten thousand
``[`` ends in ``RecursionError`` (in the parser, or later in whatever walks the
result); ``np.load`` allocates what an ``.npy`` header declares before it
reads a byte of data, so a 100-byte member declaring ``(2**40, 3)`` ends in
``MemoryError``. Both are refused here first, as the caller's 4xx error:

- :func:`loads_json` measures the nesting depth with a scan that does not
  recurse (strings removed, brackets counted) and refuses NaN and Infinity,
  which are not JSON;
- :func:`check_npz_headers` reads each member's header alone and refuses
  object arrays, a declared size larger than the member holds, and a total
  over a bound.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from os import PathLike
from typing import Any

import numpy as np

from popex.errors import CalibrationError, DataError, PopexError

__all__ = ["MAX_DOCUMENT_BYTES", "MAX_JSON_DEPTH", "MAX_NPZ_BYTES", "check_npz_headers", "json_depth", "loads_json"]

#: Largest JSON document taken from outside (a spec, a model.json): text about layers, never weights.
MAX_DOCUMENT_BYTES = 16 * 2**20
#: Deepest nesting any POPEX document needs (a spec is about 6 levels deep).
MAX_JSON_DEPTH = 64
#: Largest total of the arrays an uploaded .npz may declare (a calibration of a million samples fits).
MAX_NPZ_BYTES = 256 * 2**20

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = (ord("["), ord("{"))
_CLOSE = (ord("]"), ord("}"))


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text, without recursing.

    Parameters
    ----------
    data : bytes
        UTF-8 JSON text (not necessarily valid).

    Returns
    -------
    int
        0 for a scalar.

    Examples
    --------
    >>> json_depth(b'{"a": [1, {"b": "[[["}]}'), json_depth(b'"x"')
    (3, 0)
    """
    codes = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    steps = np.isin(codes, _OPEN).astype(np.int64) - np.isin(codes, _CLOSE)
    return int(np.cumsum(steps).max(initial=0))


def loads_json(data: bytes | str, *, name: str, max_bytes: int, max_depth: int = MAX_JSON_DEPTH,
               error: type[PopexError] = DataError) -> Any:
    """Parse untrusted JSON, refusing what is too big, too deep, not JSON, NaN or Infinity.

    Parameters
    ----------
    data : bytes or str
        The text.
    name : str
        What it is ("spec.json", "the request body"), for the message.
    max_bytes : int
        Largest text taken.
    max_depth : int
        Deepest nesting taken.
    error : type of PopexError
        What is raised (``SpecError`` for a spec, ...); a 4xx at the boundary.

    Returns
    -------
    object
        What the JSON holds.

    Raises
    ------
    PopexError
        Of type ``error``, naming ``name`` and the bound.

    Examples
    --------
    >>> loads_json(b'{"n_repeats": 3}', name="the body", max_bytes=100)
    {'n_repeats': 3}
    >>> loads_json(b"[" * 100 + b"]" * 100, name="the body", max_bytes=1000)
    Traceback (most recent call last):
    ...
    popex.errors.DataError: the body nests 100 levels deep; at most 64 are taken
    """
    raw = data.encode("utf-8", errors="surrogatepass") if isinstance(data, str) else bytes(data)
    if len(raw) > max_bytes:
        raise error(f"{name} is {len(raw)} bytes; at most {max_bytes} are taken")
    depth = json_depth(raw)
    if depth > max_depth:
        raise error(f"{name} nests {depth} levels deep; at most {max_depth} are taken")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise error(f"{name} is not valid JSON: {err}") from err


def _member_arrays_bytes(archive: zipfile.ZipFile, info: zipfile.ZipInfo, what: str) -> int:
    with archive.open(info) as member:
        try:
            version = np.lib.format.read_magic(member)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = reader(member, max_header_size=10_000)
        except (ValueError, EOFError, SyntaxError, TypeError) as err:
            raise CalibrationError(f"{what}: member {info.filename!r} is not an .npy array: {err}") from err
        header_bytes = member.tell()
    if dtype.hasobject:
        raise CalibrationError(f"{what}: member {info.filename!r} holds Python objects (a pickle); "
                               "only numeric and string arrays are taken")
    n_bytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if n_bytes > info.file_size - header_bytes:
        raise CalibrationError(f"{what}: member {info.filename!r} declares shape {tuple(shape)} of {dtype} "
                               f"({n_bytes} bytes) but holds {info.file_size - header_bytes} bytes of data")
    return n_bytes


def check_npz_headers(source: bytes | str | PathLike[str], *, what: str, max_bytes: int = MAX_NPZ_BYTES) -> None:
    """Check every member header of an ``.npz`` before anything reads its arrays.

    Parameters
    ----------
    source : bytes or path-like
        The archive's bytes or its path.
    what : str
        How to name it in messages ("calibration").
    max_bytes : int
        Largest total of the arrays' declared sizes.

    Raises
    ------
    CalibrationError
        If it is not a zip archive, an ``.npy`` member holds objects, declares
        more data than it holds, or the total is over ``max_bytes``.

    Examples
    --------
    >>> buffer = io.BytesIO()
    >>> np.savez(buffer, x=np.zeros(3))
    >>> check_npz_headers(buffer.getvalue(), what="calibration")
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (OSError, zipfile.BadZipFile, ValueError) as err:
        raise CalibrationError(f"{what} is not an .npz archive: {err}") from err
    total_bytes = 0
    with archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue  # never read as an array (np.load maps only .npy members to arrays)
            try:
                total_bytes += _member_arrays_bytes(archive, info, what)
            except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError) as err:
                raise CalibrationError(f"{what}: member {info.filename!r} cannot be read: {err}") from err
            if total_bytes > max_bytes:
                raise CalibrationError(f"{what} declares more than {max_bytes} bytes of arrays; "
                                       f"at most {max_bytes} are taken")
