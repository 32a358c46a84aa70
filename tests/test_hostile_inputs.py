"""Hostile bytes through the real per-file path (read → hash → verdict → model input): never a crash,
never a hang, always a verdict; bounded time per file. Fuzzing with hypothesis (bounded in CI)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from poolwatch.pipeline.check import Reason
from poolwatch.pipeline.decode import DecodeSettings, FileRef, read_and_decode

from .corrupt_images import cut, encode, encode_frames, photo

SETTINGS = DecodeSettings(input_size=32, max_pixels=50_000_000)
REASONS = {r.value for r in Reason}
SEEDS = {fmt: encode(photo(96, 72, seed=3), fmt) for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "BMP")}
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "TIFF": "tif", "BMP": "bmp"}


def through_pipeline(tmp: Path, name: str, data: bytes) -> tuple[object, float]:
    path = tmp / name
    path.write_bytes(data)
    start = time.perf_counter()
    decoded = read_and_decode(FileRef(str(tmp), name, len(data), 0), SETTINGS)
    return decoded, time.perf_counter() - start


def assert_sane(decoded, data: bytes) -> None:
    v = decoded.verdict
    assert v is not None
    if v.ok:
        assert decoded.pixels is not None and decoded.pixels.shape == (32, 32, 3) and decoded.pixels.dtype == np.uint8
    else:
        assert v.reason in REASONS and v.detail and decoded.pixels is None
    assert decoded.hash is not None and len(decoded.hash) == 64


def corpus() -> dict[str, bytes]:
    rgb = photo(120, 90, seed=1)
    jpeg = encode(rgb, "JPEG", quality=90)
    items: dict[str, bytes] = {}
    for fmt, data in SEEDS.items():
        for frac in (0.05, 0.3, 0.5, 0.8, 0.97):
            items[f"cut{int(frac * 100)}_{fmt}.{EXT[fmt]}"] = cut(data, frac)
    items["zero.jpg"] = b""
    items["random.png"] = np.random.default_rng(0).bytes(4096)
    items["wrong_ext.png"] = jpeg
    items["garbage_after_header.jpg"] = jpeg[:400] + np.random.default_rng(1).bytes(6000)
    png = encode(rgb, "PNG")
    crc_at = png.index(b"IDAT") + 4 + int.from_bytes(png[png.index(b"IDAT") - 4: png.index(b"IDAT")], "big")
    items["bad_crc.png"] = png[:crc_at] + bytes(b ^ 0xFF for b in png[crc_at:crc_at + 4]) + png[crc_at + 4:]
    # a decompression bomb: a tiny PNG that claims 100,000 x 100,000 pixels
    bomb = Image.new("1", (20_000, 20_000))
    items["bomb.png"] = encode(bomb, "PNG", optimize=True)
    items["tall.png"] = encode(Image.new("L", (1, 65_535), 128), "PNG")
    items["cmyk.jpg"] = encode(rgb.convert("CMYK"), "JPEG")
    items["sixteen.png"] = encode(Image.fromarray(np.arange(90 * 120, dtype=np.uint16).reshape(90, 120) * 7), "PNG")
    items["palette_alpha.png"] = encode(rgb.convert("P"), "PNG", transparency=3)
    items["animated.webp"] = encode_frames([photo(40, 30, seed=s) for s in range(3)], "WEBP")
    items["multipage.tif"] = encode_frames([photo(40, 30, seed=s) for s in range(3)], "TIFF")
    exif = Image.Exif()
    exif[0x0112] = 99  # an orientation that does not exist
    items["broken_exif.jpg"] = encode(rgb, "JPEG", exif=exif.tobytes())
    return items


@pytest.mark.parametrize("name, data", sorted(corpus().items()))
def test_hostile_corpus_gets_a_verdict(tmp_path: Path, name: str, data: bytes) -> None:
    decoded, seconds = through_pipeline(tmp_path, name, data)
    assert_sane(decoded, data)
    assert seconds < 10, f"{name} took {seconds:.1f}s"
    expected_bad = {"zero.jpg": "empty", "random.png": "not_an_image", "wrong_ext.png": "format_mismatch",
                    "bomb.png": "too_large"}
    if name in expected_bad:
        assert decoded.verdict.reason == expected_bad[name]
    if name.startswith("cut"):
        assert not decoded.verdict.ok
    if name in ("cmyk.jpg", "sixteen.png", "palette_alpha.png", "animated.webp", "multipage.tif", "broken_exif.jpg", "tall.png"):
        assert decoded.verdict.ok, decoded.verdict


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(sorted(SEEDS)),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255), st.sampled_from(["flip", "insert", "delete", "cut"])),
                   min_size=1, max_size=6),
)
def test_fuzzed_images_never_crash(tmp_path: Path, fmt: str, edits: list[tuple[float, int, str]]) -> None:
    data = bytearray(SEEDS[fmt])
    for where, value, op in edits:
        i = int(where * (len(data) - 1)) if data else 0
        if op == "flip" and data:
            data[i] ^= value or 1
        elif op == "insert":
            data[i:i] = bytes([value]) * (value % 17 + 1)
        elif op == "delete" and data:
            del data[i:i + value % 64 + 1]
        elif op == "cut":
            del data[i:]
    decoded, seconds = through_pipeline(tmp_path, f"fuzz.{EXT[fmt]}", bytes(data))
    assert_sane(decoded, bytes(data))
    assert seconds < 10
