"""IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

An IDX file is two zero bytes, a dtype code, the number of dimensions, one
big-endian uint32 per dimension, then the values in big-endian C order.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from popex.data.dataset import Dataset
from popex.errors import DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "read_idx",
    "write_idx",
    "load_fashion_mnist",
]

DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` installs the files."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""Split name -> (images file, labels file), as named by the original distribution."""

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_BYTES = 4
_DIM_BYTES = 4

# IDX dtype code -> big-endian numpy dtype, as in the format's definition.
_CODE_TO_DTYPE: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_KIND_SIZE_TO_CODE: dict[tuple[str, int], int] = {
    (dtype.kind, dtype.itemsize): code for code, dtype in _CODE_TO_DTYPE.items()
}


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(f"IDX file {path} does not exist") from err
    except OSError as err:
        raise DataError(f"cannot read IDX file {path}: {err}") from err
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"IDX file {path} is a damaged or truncated gzip stream: {err}") from err


def _parse_idx(data: bytes, path: Path) -> np.ndarray:
    if len(data) < _HEADER_BYTES:
        raise DataError(f"IDX file {path} is {len(data)} bytes long, too short for the 4-byte header")
    zero0, zero1, code, n_dims = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(
            f"IDX file {path} has a bad magic number {data[:4].hex()} (must start with 0000): not an IDX file"
        )
    if code not in _CODE_TO_DTYPE:
        known = ", ".join(f"0x{c:02X}" for c in _CODE_TO_DTYPE)
        raise DataError(f"IDX file {path} has unknown dtype code 0x{code:02X} (known: {known})")
    if n_dims == 0:
        raise DataError(f"IDX file {path} declares 0 dimensions")
    header_bytes = _HEADER_BYTES + _DIM_BYTES * n_dims
    if len(data) < header_bytes:
        raise DataError(
            f"IDX file {path} is truncated: {len(data)} bytes, but its header alone needs {header_bytes}"
        )
    dims = struct.unpack(f">{n_dims}I", data[_HEADER_BYTES:header_bytes])
    dtype = _CODE_TO_DTYPE[code]
    n_values = int(np.prod(dims, dtype=object))
    expected_bytes = header_bytes + n_values * dtype.itemsize
    if len(data) != expected_bytes:
        problem = "truncated" if len(data) < expected_bytes else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {problem}: dims {list(dims)} of {dtype.name} need "
            f"{expected_bytes} bytes, the file has {len(data)}"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header_bytes)
    # astype copies into native byte order, so the result is writable and fast.
    return values.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, plain or gzip-compressed (detected from its first bytes).

    Parameters
    ----------
    path : str or path-like
        The file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns
    -------
    numpy.ndarray
        Array of the declared shape and dtype (uint8, int8, int16, int32,
        float32 or float64), native byte order.

    Raises
    ------
    DataError
        If the file is missing or unreadable, the gzip stream is damaged, the
        magic number or dtype code is invalid, or its length does not match
        the declared dimensions.

    See Also
    --------
    write_idx

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x-idx2-ubyte.gz")
    >>> write_idx(path, np.arange(6, dtype=np.uint8).reshape(2, 3))
    >>> read_idx(path).tolist()
    [[0, 1, 2], [3, 4, 5]]
    """
    file_path = Path(path)
    return _parse_idx(_read_bytes(file_path), file_path)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write ``array`` as an IDX file; gzip-compressed when ``path`` ends in ``.gz``.

    The gzip header carries no time stamp, so the same array always gives
    the same bytes.

    Parameters
    ----------
    path : str or path-like
        Destination file; its folder must exist.
    array : numpy.ndarray, at least 1-D
        uint8, int8, int16, int32, float32 or float64 values.

    Raises
    ------
    DataError
        If the dtype has no IDX code, the array is 0-D or has more than 255
        dimensions, or the file cannot be written.

    See Also
    --------
    read_idx
    """
    values = np.asarray(array)
    code = _KIND_SIZE_TO_CODE.get((values.dtype.kind, values.dtype.itemsize))
    if code is None:
        raise DataError(f"cannot write {values.dtype} to IDX file {path}: no IDX dtype code for it")
    if not 1 <= values.ndim <= 255:
        raise DataError(f"cannot write a {values.ndim}-D array to IDX file {path}: needs 1 to 255 dimensions")
    if any(d > 0xFFFFFFFF for d in values.shape):
        raise DataError(f"cannot write shape {values.shape} to IDX file {path}: a dimension exceeds 2**32 - 1")
    header = bytes((0, 0, code, values.ndim)) + struct.pack(f">{values.ndim}I", *values.shape)
    payload = header + np.ascontiguousarray(values, dtype=_CODE_TO_DTYPE[code]).tobytes()
    file_path = Path(path)
    if file_path.name.endswith(".gz"):
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    try:
        file_path.write_bytes(payload)
    except OSError as err:
        raise DataError(f"cannot write IDX file {file_path}: {err}") from err


def load_fashion_mnist(
    root: str | os.PathLike[str] = DEFAULT_FASHION_MNIST_ROOT, *, split: str = "train"
) -> Dataset:
    """Load one split of Fashion-MNIST from its four IDX files.

    Parameters
    ----------
    root : str or path-like, default ``/usr/share/datasets/fashion-mnist``
        Folder holding ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
        ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``
        (only the two of the requested split are needed).
    split : {"train", "test"}
        ``"train"`` (60,000 images) or ``"test"`` (10,000 images).

    Returns
    -------
    Dataset
        images uint8 (n_samples, 28, 28), labels int64 (n_samples,),
        class names :data:`FASHION_MNIST_CLASSES`.

    Raises
    ------
    DataError
        If ``split`` is unknown, a file is missing (the message says how to
        install it), or the files are malformed or inconsistent.
    """
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root_path = Path(root)
    images_name, labels_name = FASHION_MNIST_FILES[split]
    images_path, labels_path = root_path / images_name, root_path / labels_name
    missing = [p.name for p in (images_path, labels_path) if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST {split} split not found: {', '.join(missing)} missing in {root_path}. "
            "Install it with `apt-get install dataset-fashion-mnist` or pass --data-root "
            "pointing to a folder with the IDX files"
        )
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise DataError(
            f"Fashion-MNIST images file {images_path} must hold uint8 (n, H, W), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"Fashion-MNIST labels file {labels_path} must hold uint8 (n,), got {labels.dtype} {labels.shape}"
        )
    if labels.shape[0] != images.shape[0]:
        raise DataError(
            f"Fashion-MNIST {split} split is inconsistent: {images.shape[0]} images in {images_path.name} "
            f"but {labels.shape[0]} labels in {labels_path.name}"
        )
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(
            f"Fashion-MNIST labels file {labels_path} has label {int(labels.max())}; "
            f"labels must lie in 0..{len(FASHION_MNIST_CLASSES) - 1}"
        )
    return Dataset(images, labels.astype(np.int64), FASHION_MNIST_CLASSES)
