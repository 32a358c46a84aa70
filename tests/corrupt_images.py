"""Test helpers: photo-like images generated with numpy, encoded with Pillow, and ways to damage them.

Photo-like (gradients plus noise) rather than flat colour, so that every block carries entropy-coded data
and a cut actually loses image content.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import NamedTuple

import numpy as np
from PIL import Image

EOI = b"\xff\xd9"


def photo(width: int = 64, height: int = 48, *, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack(
        [x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) * 255 // max(width + height, 1)], -1
    )
    noisy = base.astype(np.int16) + rng.integers(-40, 40, (height, width, 3))
    image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def encode_frames(frames: list[Image.Image], fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, fmt, save_all=True, append_images=frames[1:], **params)
    return buf.getvalue()


def decode_plain(data: bytes) -> Image.Image:
    """What plain Pillow makes of `data`: the reference the checker's output must match."""
    return Image.open(io.BytesIO(data)).convert("RGB")


def cut(data: bytes, fraction: float, *, append: bytes = b"") -> bytes:
    return data[: int(len(data) * fraction)] + append


class JpegScan(NamedTuple):
    sos: int  # offset of the SOS marker
    start: int  # first byte of the entropy-coded data
    end: int  # offset of the marker that ends it


def jpeg_scans(data: bytes) -> list[JpegScan]:
    """Scans of a well-formed JPEG written by Pillow (restart markers are part of the scan data)."""
    scans = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xD9:
            break
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker != 0xDA:
            pos += 2 + length
            continue
        start = end = pos + 2 + length
        while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
            end += 1
        scans.append(JpegScan(pos, start, end))
        pos = end
    return scans


def restart_offsets(data: bytes, scan: JpegScan) -> list[int]:
    """Offsets of the RSTn markers inside `scan`."""
    found = []
    pos = data.find(b"\xff", scan.start, scan.end)
    while pos != -1:
        if 0xD0 <= data[pos + 1] <= 0xD7:
            found.append(pos)
        pos = data.find(b"\xff", pos + 2, scan.end)
    return found


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims `width` x `height` (RGB) but that holds almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def png_chunk_offset(data: bytes, kind: bytes) -> int:
    """Offset of the length field of the first `kind` chunk."""
    return data.index(kind) - 4


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a baseline JPEG) with the frame header rewritten to claim `width` x `height`."""
    sof = data.index(b"\xff\xc0")
    return data[: sof + 5] + struct.pack(">HH", height, width) + data[sof + 9 :]


def exif_block(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """A little-endian EXIF APP1 payload with one IFD of raw (tag, type, count, 4-byte value) entries."""
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        ifd += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")[:4]
    return b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0)


def flip_bit(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0x01
    return bytes(damaged)


def gif_frame_offsets(data: bytes) -> list[int]:
    """Offsets of the image descriptors (0x2C blocks) of a well-formed GIF."""

    def table(flags: int) -> int:
        return 3 << ((flags & 7) + 1) if flags & 0x80 else 0

    def skip_sub_blocks(pos: int) -> int:
        while data[pos]:
            pos += 1 + data[pos]
        return pos + 1

    offsets = []
    pos = 13 + table(data[10])
    while data[pos] != 0x3B:
        if data[pos] == 0x21:
            pos = skip_sub_blocks(pos + 2)
        else:
            offsets.append(pos)
            pos = skip_sub_blocks(pos + 11 + table(data[pos + 9]))
    return offsets
