"""A model's files from a multipart upload: named fields, ``files`` with relative paths, or one ``archive``.

Both services take a model the same three ways, so both read uploads here:

- ``files`` (repeated): each part's filename is its path in the model
  directory (``model.json``, ``stages/1.onnx``, ``calibration.npz``);
- ``archive``: one zip or tar(.gz) of the model directory, each member
  checked (:func:`popex.runtime.model_archive.read_model_archive`);
- named fields (``spec``, ``weights``, ``calibration``, ...), mapped to
  their file names by the caller's table.
"""

from __future__ import annotations

from collections.abc import Mapping

from flask import request
from werkzeug.exceptions import BadRequest

from popex.errors import SpecError
from popex.runtime.model_archive import read_model_archive
from popex.runtime.model_files import check_file_path

__all__ = ["uploaded_model_files"]


def uploaded_model_files(named_fields: Mapping[str, str], *, prefixed: Mapping[str, str] | None = None,
                         max_bytes: int) -> dict[str, bytes]:
    """Every file of the upload, by its path in the model directory.

    Parameters
    ----------
    named_fields : mapping of str to str
        Field name -> file path (e.g. ``"spec" -> "spec.json"``).
    prefixed : mapping of str to str, optional
        Field prefix -> path pattern with ``{}`` for the rest of the name
        (``"calibration_" -> "calibration_{}.npz"``).
    max_bytes : int
        Largest total, archives unpacked.

    Returns
    -------
    dict of str to bytes

    Raises
    ------
    BadRequest
        If a path is unsafe, a file is sent twice, or nothing was sent.
    """
    files: dict[str, bytes] = {}

    def add(path: str, data: bytes) -> None:
        try:
            check_file_path(path)
        except SpecError as err:
            raise BadRequest(str(err)) from err
        if path in files:
            raise BadRequest(f"file {path[:80]!r} is sent twice")
        files[path] = data

    for field, storage in request.files.items(multi=True):
        if field == "files":
            add(storage.filename or "", storage.read())
        elif field == "archive":
            try:
                unpacked = read_model_archive(storage.read(), max_bytes=max_bytes)
            except SpecError as err:
                raise BadRequest(str(err)) from err
            for path, data in unpacked.items():
                add(path, data)
        elif field in named_fields:
            add(named_fields[field], storage.read())
        else:
            for prefix, pattern in (prefixed or {}).items():
                if field.startswith(prefix) and field != prefix:
                    add(pattern.format(field[len(prefix):]), storage.read())
                    break
            else:
                raise BadRequest(f"unknown multipart field {field[:40]!r}: send the model's files as 'files' "
                                 f"(filename = path in the model directory), one 'archive', or the fields "
                                 f"{sorted(named_fields)}")
    if not files:
        raise BadRequest("no files were sent: send the model's files as multipart 'files' (filename = path in "
                         "the model directory) or one 'archive' (zip or tar of the model directory)")
    return files
