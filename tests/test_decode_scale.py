"""Decoding at the model's scale (DecodeSettings.exact_decode=False) and libjpeg-turbo's strict truncation check.

Scaled decode: a JPEG is decoded DCT-scaled to the smallest n/8 size >= input_size on both axes, then resized
like the exact path; its pixels are close to the exact path's, not equal.  Exact decode: today's pixels, byte
for byte.  In both modes a JPEG whose scan data ends early is `truncated`, also when an end-of-image marker
was appended after the cut, which plain Pillow (and the Pillow-driven checker alone) accepts.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps

from poolwatch.pipeline.check import Reason, inspect_image
from poolwatch.pipeline.decode import Decoded, DecodeSettings, FileRef, preprocess, read_and_decode

from .corrupt_images import EOI, cut, encode, jpeg_scans

INPUT = 64
EXACT = DecodeSettings(input_size=INPUT, exact_decode=True)
SCALED = DecodeSettings(input_size=INPUT, exact_decode=False)
MODES = {"exact": EXACT, "scaled": SCALED}

# Measured on these images (uint8, after the resize to 64x64): mean |scaled - exact| 0.19-0.66 per file,
# largest single difference 19 (4:2:2 at 640x480, on a hard edge); the bounds leave room for other builds.
MEAN_TOLERANCE = 1.0
MAX_TOLERANCE = 32


@functools.cache
def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like: smooth colour fields, a few discs and rectangles with hard edges, sensor noise."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (5, 7, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(0.05, 0.2) * width
        disc = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        base[disc] = base[disc] * 0.3 + rng.uniform(0, 255, 3) * 0.7
        x0, y0 = int(rng.uniform(0, width * 0.8)), int(rng.uniform(0, height * 0.8))
        base[y0 : y0 + height // 6, x0 : x0 + width // 5] = rng.uniform(0, 255, 3)
    base += rng.normal(0, 5, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


KINDS: dict[str, dict[str, object]] = {
    "444": dict(quality=90, subsampling=0),
    "422": dict(quality=90, subsampling=1),
    "420": dict(quality=85, subsampling=2),
    "progressive": dict(quality=90, progressive=True),
    "grayscale": dict(quality=90),
}
SIZES = [(640, 480), (1920, 1080)]


@functools.cache
def jpeg(kind: str, size: tuple[int, int]) -> bytes:
    image = photo(*size, seed=size[0] + len(kind))
    return encode(image.convert("L") if kind == "grayscale" else image, "JPEG", **KINDS[kind])


def through(tmp_path: Path, data: bytes, settings: DecodeSettings, name: str = "a.jpg") -> Decoded:
    path = tmp_path / name
    path.write_bytes(data)
    return read_and_decode(FileRef(str(tmp_path), name, 0, 0), settings)


def pixels_of(decoded: Decoded) -> np.ndarray:
    assert decoded.verdict is not None and decoded.verdict.ok, decoded.verdict
    assert decoded.pixels is not None and decoded.pixels.shape == (INPUT, INPUT, 3)
    return decoded.pixels


def assert_close(scaled: np.ndarray, exact: np.ndarray) -> None:
    diff = np.abs(scaled.astype(np.int16) - exact.astype(np.int16))
    assert diff.mean() <= MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE, (diff.mean(), diff.max())


def today(data: bytes, *, exif: bool = True) -> np.ndarray:
    """The pixels of the path before scaled decoding: Pillow's full decode, upright, then the bilinear resize."""
    image = Image.open(io.BytesIO(data))
    return preprocess((ImageOps.exif_transpose(image) if exif else image).convert("RGB"), INPUT)


# --------------------------------------------------------------------------------------------------------
# Pixels


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", list(KINDS))
def test_exact_is_todays_pixels_and_scaled_is_close(tmp_path: Path, kind: str, size: tuple[int, int]) -> None:
    data = jpeg(kind, size)
    exact = pixels_of(through(tmp_path, data, EXACT))
    assert np.array_equal(exact, today(data))
    scaled = through(tmp_path, data, SCALED)
    assert scaled.verdict is not None and (scaled.verdict.width, scaled.verdict.height) == size
    assert_close(pixels_of(scaled), exact)


@pytest.mark.parametrize(
    ("size", "decoded_size"),
    [((1920, 1080), (240, 135)), ((640, 480), (160, 120)), ((500, 100), (375, 75)), ((17, 13), (17, 13))],
)
def test_scaled_decode_is_the_smallest_scale_at_least_the_input_on_both_axes(
    size: tuple[int, int], decoded_size: tuple[int, int]
) -> None:
    data = encode(photo(*size), "JPEG", quality=90)
    verdict, image = inspect_image(data, "a.jpg", scale_to=INPUT)
    assert verdict.ok and (verdict.width, verdict.height) == size
    assert image is not None and image.mode == "RGB" and image.size == decoded_size


def test_cmyk_jpeg_scaled_is_close(tmp_path: Path) -> None:
    data = encode(photo(640, 480, seed=5).convert("CMYK"), "JPEG", quality=90)
    exact = pixels_of(through(tmp_path, data, EXACT))
    assert np.array_equal(exact, today(data))
    assert_close(pixels_of(through(tmp_path, data, SCALED)), exact)


def test_other_formats_decode_in_full_in_both_modes(tmp_path: Path) -> None:
    data = encode(photo(640, 480), "PNG")
    verdict, image = inspect_image(data, "a.png", scale_to=INPUT)
    assert verdict.ok and image is not None and image.size == (640, 480)
    for settings in MODES.values():
        assert np.array_equal(pixels_of(through(tmp_path, data, settings, "a.png")), today(data))


@pytest.mark.parametrize("mode", list(MODES))
def test_exif_orientation_6_is_applied(tmp_path: Path, mode: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo(640, 480, seed=9), "JPEG", quality=90, exif=exif)
    decoded = through(tmp_path, data, MODES[mode])
    assert decoded.verdict is not None and (decoded.verdict.width, decoded.verdict.height) == (480, 640)
    upright = today(data)
    assert not np.allclose(upright, today(data, exif=False), atol=30)  # turned or not is told apart
    if mode == "exact":
        assert np.array_equal(pixels_of(decoded), upright)
    else:
        assert_close(pixels_of(decoded), upright)
    verdict, image = inspect_image(data, "a.jpg", scale_to=INPUT)
    assert image is not None and image.size == (120, 160) and (verdict.width, verdict.height) == (480, 640)
    raw = read_and_decode(FileRef(str(tmp_path), "a.jpg", 0, 0), DecodeSettings(input_size=INPUT, apply_exif=False))
    assert raw.verdict is not None and (raw.verdict.width, raw.verdict.height) == (640, 480)
    assert_close(pixels_of(raw), today(data, exif=False))


# --------------------------------------------------------------------------------------------------------
# Truncation: cut 1 to 8 bytes of scan data and append an end-of-image marker


def short_by(data: bytes, lost: int) -> bytes:
    assert data.endswith(EOI)
    return data[: -2 - lost] + EOI


def test_plain_pillow_accepts_a_jpeg_short_by_one_byte() -> None:
    """The premise: libjpeg only warns and Pillow drops the warning; libjpeg-turbo strict refuses."""
    damaged = short_by(jpeg("420", (640, 480)), 1)
    Image.open(io.BytesIO(damaged)).load()
    with pytest.raises(ValueError, match="premature end of data segment"):
        simplejpeg.decode_jpeg(damaged, colorspace="RGB", strict=True)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", list(KINDS))
def test_jpeg_short_by_1_to_8_bytes_with_eoi_is_truncated(tmp_path: Path, kind: str, size: tuple[int, int], mode: str) -> None:
    data = jpeg(kind, size)
    for lost in range(1, 9):
        decoded = through(tmp_path, short_by(data, lost), MODES[mode])
        verdict = decoded.verdict
        assert verdict is not None and verdict.reason == Reason.TRUNCATED.value, (lost, verdict)
        assert (verdict.width, verdict.height) == size and decoded.pixels is None


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("kind", ["420", "progressive", "grayscale"])
def test_extraneous_bytes_before_eoi_stay_ok(tmp_path: Path, kind: str, mode: str) -> None:
    data = jpeg(kind, (640, 480))
    padded = data[:-2] + b"camera junk" + EOI
    with pytest.raises(ValueError, match="extraneous bytes before marker 0xd9"):
        simplejpeg.decode_jpeg(padded, colorspace="RGB", strict=True)
    assert np.array_equal(pixels_of(through(tmp_path, padded, MODES[mode])), pixels_of(through(tmp_path, data, MODES[mode])))


@pytest.mark.parametrize("kind", ["420", "progressive"])
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.97])
@pytest.mark.parametrize("append", [EOI, b""], ids=["eoi-appended", "plain-cut"])
def test_scaled_decode_keeps_the_truncation_verdicts(kind: str, fraction: float, append: bytes) -> None:
    verdict, image = inspect_image(cut(jpeg(kind, (640, 480)), fraction, append=append), "a.jpg", scale_to=INPUT)
    assert verdict.reason == Reason.TRUNCATED.value and image is None


def test_scaled_decode_keeps_the_damage_verdicts() -> None:
    data = jpeg("420", (640, 480))
    scan = jpeg_scans(data)[0]
    middle = scan.start + (scan.end - scan.start) // 2
    while data[middle - 1] == 0xFF:
        middle += 1
    spliced = data[:middle] + b"\xff\xfe\x00\x04hi" + data[middle:]
    assert inspect_image(spliced, "a.jpg", scale_to=INPUT)[0].reason == Reason.DECODE_ERROR.value
    progressive = jpeg("progressive", (640, 480))
    between_scans = progressive[: jpeg_scans(progressive)[4].sos] + EOI
    assert inspect_image(between_scans, "a.jpg", scale_to=INPUT)[0].reason == Reason.TRUNCATED.value


@pytest.mark.parametrize("mode", list(MODES))
def test_a_cut_behind_a_harmless_warning_is_still_truncated(tmp_path: Path, mode: str) -> None:
    """libjpeg-turbo stops at its first warning; the Pillow-driven decode then judges the rest of the file."""
    data = jpeg("progressive", (640, 480))
    scans = jpeg_scans(data)
    damaged = data[: scans[1].sos] + b"junk" + data[scans[1].sos : scans[-1].end - 300] + EOI
    with pytest.raises(ValueError, match="extraneous bytes"):
        simplejpeg.decode_jpeg(damaged, colorspace="RGB", strict=True)
    verdict = through(tmp_path, damaged, MODES[mode]).verdict
    assert verdict is not None and verdict.reason == Reason.TRUNCATED.value, verdict


def test_permissive_scaled_decode_returns_what_can_be_decoded(tmp_path: Path) -> None:
    damaged = cut(jpeg("420", (640, 480)), 0.5, append=EOI)
    settings = DecodeSettings(input_size=INPUT, check_corruptness=False)
    pixels_of(through(tmp_path, damaged, settings))
    assert not through(tmp_path, damaged, SCALED).verdict.ok  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------------------
# A JPEG libjpeg-turbo refuses: 4:1:0 chroma subsampling (luma 4x2 per chroma sample).  Neither Pillow
# nor cjpeg-less tooling writes one, so a minimal baseline encoder does: every block flat (its DC value
# only), which is a valid JPEG whatever the sampling factors.


def _huffman_codes(bits: list[int], values: list[int]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length) of a canonical Huffman table given as JPEG's BITS/HUFFVAL lists."""
    codes, code, k = {}, 0, 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            codes[values[k]] = (code, length)
            code, k = code + 1, k + 1
        code <<= 1
    return codes


DC_BITS, DC_VALUES = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0], list(range(12))  # ITU T.81 K.3
AC_BITS, AC_VALUES = [1] + [0] * 15, [0x00]  # end-of-block only


def jpeg_dc_only(image: Image.Image, sampling: list[tuple[int, int]]) -> bytes:
    """A baseline JPEG of `image` (YCbCr) with the given (h, v) sampling factors per component, flat blocks."""
    ycc = np.asarray(image.convert("YCbCr"), dtype=np.float64)
    height, width = ycc.shape[:2]
    hmax, vmax = max(h for h, _ in sampling), max(v for _, v in sampling)
    mcus_x, mcus_y = -(-width // (8 * hmax)), -(-height // (8 * vmax))
    padded_w, padded_h = mcus_x * 8 * hmax, mcus_y * 8 * vmax
    dc = []
    for c, (h, v) in enumerate(sampling):
        plane = np.pad(ycc[..., c], ((0, padded_h - height), (0, padded_w - width)), mode="edge")
        bw, bh = 8 * hmax // h, 8 * vmax // v  # pixels one block of this component covers
        means = plane.reshape(padded_h // bh, bh, padded_w // bw, bw).mean(axis=(1, 3))
        dc.append(np.rint(means - 128).astype(int))  # the quantiser of 8 cancels the DCT's factor of 8
    dc_codes, ac_codes = _huffman_codes(DC_BITS, DC_VALUES), _huffman_codes(AC_BITS, AC_VALUES)
    bits: list[str] = []
    predictors = [0] * len(sampling)
    for my in range(mcus_y):
        for mx in range(mcus_x):
            for c, (h, v) in enumerate(sampling):
                for by in range(v):
                    for bx in range(h):
                        value = int(dc[c][my * v + by, mx * h + bx])
                        diff, predictors[c] = value - predictors[c], value
                        category = abs(diff).bit_length()
                        code, length = dc_codes[category]
                        bits.append(format(code, f"0{length}b"))
                        if category:
                            bits.append(format(diff if diff > 0 else diff + (1 << category) - 1, f"0{category}b"))
                        code, length = ac_codes[0x00]
                        bits.append(format(code, f"0{length}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)
    entropy = bytes(int(stream[i : i + 8], 2) for i in range(0, len(stream), 8)).replace(b"\xff", b"\xff\x00")

    def segment(marker: int, body: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body

    components = b"".join(bytes([c + 1, (h << 4) | v, 0]) for c, (h, v) in enumerate(sampling))
    huffman = bytes([0x00, *DC_BITS, *DC_VALUES]) + bytes([0x10, *AC_BITS, *AC_VALUES])
    return (
        b"\xff\xd8"
        + segment(0xDB, bytes([0]) + bytes([8] * 64))
        + segment(0xC0, bytes([8]) + height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([len(sampling)]) + components)
        + segment(0xC4, huffman)
        + segment(0xDA, bytes([len(sampling)]) + b"".join(bytes([c + 1, 0x00]) for c in range(len(sampling))) + b"\x00\x3f\x00")
        + entropy
        + EOI
    )


SAMPLING_410 = [(4, 2), (1, 1), (1, 1)]


def test_the_4_1_0_encoder_makes_a_valid_jpeg() -> None:
    source = photo(640, 480, seed=2)
    data = jpeg_dc_only(source, [(2, 2), (1, 1), (1, 1)])  # 4:2:0, which libjpeg-turbo accepts
    simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)
    data = jpeg_dc_only(source, SAMPLING_410)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.int16)
    assert np.abs(decoded - np.asarray(source, np.int16)).mean() < 20  # 8x8 luma blocks, 32x16 chroma


def test_a_4_1_0_jpeg_falls_back_to_pillow(tmp_path: Path) -> None:
    data = jpeg_dc_only(photo(640, 480, seed=2), SAMPLING_410)
    with pytest.raises(ValueError, match="subsampling"):
        simplejpeg.decode_jpeg_header(data)
    exact = pixels_of(through(tmp_path, data, EXACT))
    assert np.array_equal(exact, today(data))
    scaled = through(tmp_path, data, SCALED)
    assert scaled.verdict is not None and (scaled.verdict.width, scaled.verdict.height) == (640, 480)
    assert_close(pixels_of(scaled), exact)
    verdict, image = inspect_image(data, "a.jpg", scale_to=INPUT)
    assert verdict.ok and image is not None and image.size == (160, 120)  # Pillow's draft scaled it
    for settings in MODES.values():
        for damaged in (cut(data, 0.5, append=EOI), cut(data, 0.5), data[:-2]):
            truncated = through(tmp_path, damaged, settings).verdict
            assert truncated is not None and truncated.reason == Reason.TRUNCATED.value, truncated
