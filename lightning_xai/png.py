"""PNG encoding of uint8 pictures, written for speed: the callback encodes about 36 pictures per event inside the
training loop (one per probe and method for TensorBoard), and PIL's encoder spent about 2 ms on each.

The file is a plain PNG (signature, ``IHDR``, one ``IDAT``, ``IEND``; 8 bits per channel, no interlacing) whose
rows all use the "Up" filter (each byte minus the byte above it, modulo 256; the first row is kept as it is, its
row above being zero by definition), compressed by zlib at level 1. Our pictures are heat maps, photographs and
flat caption bands, whose rows resemble the row above: "Up" compresses them about as well as PIL's per-row choice
of filter, and costs one vectorised subtraction instead of trying five filters per row. Any PNG reader decodes
the file to exactly the input pixels.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

#: zlib level of the PNGs we write: 1 is several times faster than the default 6 for about 10 % more bytes.
PNG_COMPRESS_LEVEL = 1

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type: grey, grey+alpha, RGB, RGBA
_FILTER_UP = 2


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data and the CRC-32 of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image: np.ndarray, level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """uint8 ``(H, W)`` or ``(H, W, 1)`` (grey), ``(H, W, 2)`` (grey and alpha), ``(H, W, 3)`` (RGB) or
    ``(H, W, 4)`` (RGBA) -> PNG bytes.

    Other dtypes are cast to uint8 (as ``np.asarray(image, dtype=np.uint8)`` does); ``level`` is zlib's (0-9).
    """
    pixels = np.asarray(image, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[2] not in _COLOUR_TYPES or 0 in pixels.shape[:2]:
        raise ValueError(f"a PNG needs a non-empty (H, W) or (H, W, 1|2|3|4) image, got shape {tuple(image.shape)}")
    height, width, channels = pixels.shape
    rows = pixels.reshape(height, width * channels)
    filtered = np.empty((height, 1 + width * channels), dtype=np.uint8)
    filtered[:, 0] = _FILTER_UP
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # uint8 arithmetic wraps modulo 256, as PNG's does
    header = struct.pack(">IIBBBBB", width, height, 8, _COLOUR_TYPES[channels], 0, 0, 0)
    return b"".join((_SIGNATURE, _chunk(b"IHDR", header), _chunk(b"IDAT", zlib.compress(filtered.tobytes(), level)),
                     _chunk(b"IEND", b"")))
