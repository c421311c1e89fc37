"""Safe decoding of untrusted image bytes (e.g. an HTTP upload), and PNG encoding.

Only PNG, JPEG and BMP are accepted. Before OpenCV sees a byte, the header is
parsed here to learn the format and the declared size, so that an image
declaring more than ``max_pixels`` is refused without allocating anything,
and the container is walked to its end marker so that a truncated file is
refused instead of being decoded into a partial picture.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from popex.errors import DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_FORMATS",
    "ImageHeader",
    "read_image_header",
    "decode_image",
    "encode_png",
]

DEFAULT_MAX_PIXELS = 4096 * 4096
"""Largest width * height :func:`decode_image` accepts unless told otherwise."""

SUPPORTED_FORMATS = ("png", "jpeg", "bmp")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_BMP_MAGIC = b"BM"
# Real encoders write a few thousand chunks/segments at most; the caps bound
# the Python-level walk over hostile input made of many tiny chunks.
_MAX_PNG_CHUNKS = 100_000
_MAX_JPEG_SEGMENTS = 10_000
# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM and the restart markers RST0-RST7.
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})
_JPEG_SOS = 0xDA
_BMP_UNCOMPRESSED = frozenset({0, 3, 6})  # BI_RGB, BI_BITFIELDS, BI_ALPHABITFIELDS
_BMP_RLE = frozenset({1, 2})  # BI_RLE8, BI_RLE4; BI_JPEG / BI_PNG payloads are refused


def _png_header(data: bytes) -> ImageHeader:
    # Signature (8) + IHDR length (4) + "IHDR" (4) + width (4) + height (4).
    if len(data) < 24:
        raise DataError(f"truncated PNG: {len(data)} bytes, the header alone needs 24")
    length, chunk_type = struct.unpack(">I4s", data[8:16])
    if chunk_type != b"IHDR" or length != 13:
        raise DataError("corrupt PNG: the first chunk is not a 13-byte IHDR")
    width_px, height_px = struct.unpack(">II", data[16:24])
    return ImageHeader("png", width_px, height_px)


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """Yield (marker, payload_start, payload_end) up to and including SOS."""
    pos, n_bytes = 2, len(data)
    for _ in range(_MAX_JPEG_SEGMENTS):
        if pos >= n_bytes:
            raise DataError("truncated JPEG: the data ends before the image scan starts")
        if data[pos] != 0xFF:
            raise DataError(f"corrupt JPEG: expected a marker at byte {pos}, found 0x{data[pos]:02X}")
        while pos < n_bytes and data[pos] == 0xFF:  # fill bytes may precede a marker
            pos += 1
        if pos >= n_bytes:
            raise DataError("truncated JPEG: the data ends inside a marker")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE_MARKERS:
            continue
        if marker in (0xD8, 0xD9):
            raise DataError(f"corrupt JPEG: unexpected marker 0xFF{marker:02X} before the image scan")
        if pos + 2 > n_bytes:
            raise DataError("truncated JPEG: the data ends inside a segment length")
        (segment_bytes,) = struct.unpack(">H", data[pos : pos + 2])
        if segment_bytes < 2:
            raise DataError(f"corrupt JPEG: segment 0xFF{marker:02X} declares length {segment_bytes}")
        end = pos + segment_bytes
        if end > n_bytes:
            raise DataError(f"truncated JPEG: segment 0xFF{marker:02X} runs past the end of the data")
        yield marker, pos + 2, end
        if marker == _JPEG_SOS:
            return
        pos = end
    raise DataError(f"corrupt JPEG: more than {_MAX_JPEG_SEGMENTS} segments before the image scan")


def _jpeg_header(data: bytes) -> ImageHeader:
    for marker, start, end in _jpeg_segments(data):
        if marker == _JPEG_SOS:
            break
        if marker in _JPEG_SOF_MARKERS:
            # precision (1), height (2), width (2), number of components (1)
            if end - start < 6:
                raise DataError("corrupt JPEG: start-of-frame segment too short")
            height_px, width_px = struct.unpack(">HH", data[start + 1 : start + 5])
            return ImageHeader("jpeg", width_px, height_px)
    raise DataError("corrupt JPEG: no start-of-frame segment before the image scan")


def _bmp_header(data: bytes) -> ImageHeader:
    if len(data) < 26:
        raise DataError(f"truncated BMP: {len(data)} bytes, the header alone needs 26")
    (dib_bytes,) = struct.unpack("<I", data[14:18])
    if dib_bytes == 12:  # OS/2 BITMAPCOREHEADER: 16-bit unsigned sizes
        width_px, height_px = struct.unpack("<HH", data[18:22])
    elif dib_bytes >= 40:
        width_px, height_px = struct.unpack("<ii", data[18:26])
        height_px = abs(height_px)  # negative height means rows stored top-down
    else:
        raise DataError(f"corrupt BMP: unknown info header size {dib_bytes}")
    if width_px < 0:
        raise DataError(f"corrupt BMP: negative width {width_px}")
    return ImageHeader("bmp", width_px, height_px)


def _check_png_complete(data: bytes) -> None:
    pos, n_bytes, seen_idat = 8, len(data), False
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 12 > n_bytes:
            raise DataError("truncated PNG: the data ends before the IEND chunk")
        length, chunk_type = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > n_bytes:
            raise DataError(f"truncated PNG: chunk {chunk_type!r} runs past the end of the data")
        (crc,) = struct.unpack(">I", data[end - 4 : end])
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise DataError(f"corrupt PNG: checksum mismatch in chunk {chunk_type!r}")
        if chunk_type == b"IDAT":
            seen_idat = True
        elif chunk_type == b"IEND":
            if not seen_idat:
                raise DataError("corrupt PNG: no image data (IDAT) before IEND")
            return
        pos = end
    raise DataError(f"corrupt PNG: more than {_MAX_PNG_CHUNKS} chunks")


def _check_jpeg_complete(data: bytes) -> None:
    scan_start = None
    for marker, _, end in _jpeg_segments(data):
        if marker == _JPEG_SOS:
            scan_start = end
    # Entropy-coded data escapes 0xFF as FF00 and only RST markers (FFD0-FFD7)
    # and further scans appear inside it, so FFD9 after the first scan is the
    # real end of image; without it the file was cut short.
    if scan_start is None or data.find(_JPEG_EOI, scan_start) < 0:
        raise DataError("truncated JPEG: no end-of-image marker after the image data")


def _check_bmp_complete(data: bytes, header: ImageHeader) -> None:
    (pixel_offset,) = struct.unpack("<I", data[10:14])
    (dib_bytes,) = struct.unpack("<I", data[14:18])
    if dib_bytes == 12:
        (bits_per_pixel,) = struct.unpack("<H", data[24:26])
        compression = 0
    else:
        if len(data) < 34:
            raise DataError(f"truncated BMP: {len(data)} bytes, the info header needs 34")
        (bits_per_pixel,) = struct.unpack("<H", data[28:30])
        (compression,) = struct.unpack("<I", data[30:34])
    if compression in _BMP_RLE:
        return  # run-length data has no fixed size; OpenCV reports it if broken
    if compression not in _BMP_UNCOMPRESSED:
        raise DataError(f"unsupported BMP compression {compression}: send PNG, JPEG or plain BMP")
    row_bytes = (bits_per_pixel * header.width_px + 31) // 32 * 4
    needed_bytes = pixel_offset + row_bytes * header.height_px
    if len(data) < needed_bytes:
        raise DataError(f"truncated BMP: {len(data)} bytes, its pixel data needs {needed_bytes}")


@dataclass(frozen=True)
class ImageHeader:
    """Format and size an image declares in its header (nothing decoded yet)."""

    format: str
    width_px: int
    height_px: int

    @property
    def n_pixels(self) -> int:
        """Declared ``width_px * height_px``."""
        return self.width_px * self.height_px


def read_image_header(data: bytes) -> ImageHeader:
    """Read the format and declared size of a PNG, JPEG or BMP image without decoding it.

    Parameters
    ----------
    data : bytes
        The encoded image (may be untrusted).

    Returns
    -------
    ImageHeader
        ``format`` (one of :data:`SUPPORTED_FORMATS`), ``width_px``, ``height_px``.

    Raises
    ------
    DataError
        If ``data`` is empty, not PNG/JPEG/BMP, too short for its header,
        or declares a zero width or height.

    Examples
    --------
    >>> import numpy as np
    >>> read_image_header(encode_png(np.zeros((2, 3), np.uint8)))
    ImageHeader(format='png', width_px=3, height_px=2)
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"image data must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise DataError("empty image: 0 bytes received")
    if data.startswith(_PNG_SIGNATURE):
        header = _png_header(data)
    elif data.startswith(_JPEG_SOI):
        header = _jpeg_header(data)
    elif data.startswith(_BMP_MAGIC):
        header = _bmp_header(data)
    else:
        raise DataError(
            f"not a supported image: the first bytes {data[:8].hex()} are not PNG, JPEG or BMP"
        )
    if header.width_px == 0 or header.height_px == 0:
        raise DataError(f"{header.format.upper()} declares an empty image ({header.width_px}x{header.height_px})")
    return header


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, channels: int | None = None) -> np.ndarray:
    """Decode untrusted PNG, JPEG or BMP bytes into an RGB or grayscale uint8 array.

    The header is checked against ``max_pixels`` and the container is
    checked to be complete before OpenCV decodes anything.

    Parameters
    ----------
    data : bytes
        The encoded image.
    max_pixels : int, default 4096 * 4096
        Largest declared ``width * height`` accepted.
    channels : {None, 1, 3}, default None
        None keeps the image as stored (grayscale stays (H, W), colour becomes
        RGB); 1 forces grayscale, 3 forces RGB. An alpha channel is dropped
        and 16-bit images are scaled to 8 bits.

    Returns
    -------
    numpy.ndarray of uint8
        Shape (H, W) for grayscale, (H, W, 3) RGB for colour.

    Raises
    ------
    DataError
        If the data is empty, not PNG/JPEG/BMP, declares more than
        ``max_pixels`` pixels, is truncated or corrupt, or OpenCV cannot
        decode it.

    Examples
    --------
    >>> import numpy as np
    >>> rgb = np.zeros((2, 3, 3), np.uint8); rgb[..., 0] = 255
    >>> decode_image(encode_png(rgb))[0, 0].tolist()
    [255, 0, 0]
    """
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be None, 1 or 3, got {channels!r}")
    if max_pixels < 1:
        raise DataError(f"max_pixels must be positive, got {max_pixels}")
    header = read_image_header(data)
    data = bytes(data)
    if header.n_pixels > max_pixels:
        raise DataError(
            f"image too large: the {header.format.upper()} header declares "
            f"{header.width_px}x{header.height_px} = {header.n_pixels} pixels, the limit is {max_pixels}"
        )
    if header.format == "png":
        _check_png_complete(data)
    elif header.format == "jpeg":
        _check_jpeg_complete(data)
    else:
        _check_bmp_complete(data, header)
    flags = {None: cv2.IMREAD_ANYCOLOR, 1: cv2.IMREAD_GRAYSCALE, 3: cv2.IMREAD_COLOR}[channels]
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as err:
        raise DataError(f"{header.format.upper()} image could not be decoded: {err}") from err
    if decoded is None:
        raise DataError(f"{header.format.upper()} image could not be decoded: corrupt or truncated data")
    # EXIF orientation may swap height and width; the pixel count must still agree.
    if decoded.shape[0] * decoded.shape[1] != header.n_pixels or decoded.dtype != np.uint8:
        raise DataError(
            f"{header.format.upper()} image decoded to {decoded.shape} {decoded.dtype}, "
            f"but its header declares {header.width_px}x{header.height_px}"
        )
    if decoded.ndim == 3:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    return np.ascontiguousarray(decoded)


def encode_png(image: np.ndarray) -> bytes:
    """Encode a uint8 image as PNG bytes (lossless).

    Parameters
    ----------
    image : numpy.ndarray of uint8
        Shape (H, W) grayscale, (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA.

    Returns
    -------
    bytes
        The PNG file.

    Raises
    ------
    DataError
        If the dtype or shape is not one of the above.

    Examples
    --------
    >>> import numpy as np
    >>> encode_png(np.zeros((1, 1), np.uint8))[:4]
    b'\\x89PNG'
    """
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise DataError(f"encode_png needs a uint8 image, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    elif array.ndim == 3 and array.shape[2] == 4:
        array = cv2.cvtColor(array, cv2.COLOR_RGBA2BGRA)
    elif array.ndim != 2:
        raise DataError(f"encode_png needs shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise DataError(f"encode_png cannot encode an empty image of shape {array.shape}")
    ok, encoded = cv2.imencode(".png", np.ascontiguousarray(array))
    if not ok:
        raise DataError(f"OpenCV could not encode an image of shape {array.shape} as PNG")
    return encoded.tobytes()
