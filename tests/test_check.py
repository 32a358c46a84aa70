"""Tests for poolwatch.pipeline.check: verdicts for good, damaged and hostile image bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import struct
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from poolwatch.pipeline.check import (
    IMAGE_EXTENSIONS,
    Reason,
    Verdict,
    content_hash,
    inspect_image,
    to_rgb,
)

from .corrupt_images import (
    EOI,
    cut,
    decode_plain,
    encode,
    encode_frames,
    exif_block,
    flip_bit,
    gif_frame_offsets,
    jpeg_scans,
    jpeg_with_size,
    photo,
    png_chunk,
    png_chunk_offset,
    png_header_only,
    restart_offsets,
)

PHOTO = photo(64, 48)


def assert_ok(data: bytes, filename: str, **kwargs: object) -> Image.Image:
    verdict, image = inspect_image(data, filename, **kwargs)
    assert verdict.ok, verdict
    assert verdict.reason is None and verdict.detail == ""
    assert image is not None and image.mode == "RGB"
    assert (verdict.width, verdict.height) == image.size
    image.load()
    return image


def assert_bad(data: bytes, filename: str, reason: Reason, **kwargs: object) -> Verdict:
    verdict, image = inspect_image(data, filename, **kwargs)
    assert not verdict.ok
    assert verdict.reason == reason.value, verdict
    assert verdict.detail
    assert image is None
    return verdict


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------------------------------------
# Interface


def test_public_constants() -> None:
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
    assert {r.value for r in Reason} >= {
        "empty",
        "unreadable",
        "not_an_image",
        "format_mismatch",
        "truncated",
        "decode_error",
        "too_large",
    }
    assert Reason.TRUNCATED == "truncated"  # str enum: stored as text


def test_verdict_is_frozen() -> None:
    verdict, _ = inspect_image(encode(PHOTO, "PNG"), "a.png")
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.ok = False  # type: ignore[misc]


def test_content_hash() -> None:
    data = encode(PHOTO, "PNG")
    assert content_hash(data) == hashlib.sha256(data).hexdigest()
    assert content_hash(data) == content_hash(bytes(data))
    assert content_hash(data) != content_hash(data + b"\x00")


# --------------------------------------------------------------------------------------------------------
# Valid images must pass, decoded exactly as Pillow decodes them


JPEG_VARIANTS = [
    pytest.param(dict(quality=q, subsampling=s, progressive=p), id=f"q{q}-ss{s}-{'prog' if p else 'base'}")
    for q in (5, 30, 75, 95, 100)
    for s in (0, 1, 2)
    for p in (False, True)
] + [
    pytest.param(dict(quality=90, optimize=True), id="optimized"),
    pytest.param(dict(quality=90, optimize=True, progressive=True), id="optimized-prog"),
    pytest.param(dict(quality=90, restart_marker_blocks=1), id="rst-every-mcu"),
    pytest.param(dict(quality=90, restart_marker_blocks=5), id="rst-5-mcus"),
    pytest.param(dict(quality=90, restart_marker_rows=1), id="rst-every-row"),
    pytest.param(dict(quality=90, restart_marker_blocks=3, progressive=True), id="rst-prog"),
    pytest.param(dict(quality=90, keep_rgb=True), id="rgb-no-ycc"),
    pytest.param(dict(quality=90, smooth=50), id="smoothed"),
    pytest.param(dict(quality=90, comment=b"hello", icc_profile=b"\x00" * 3000), id="com-icc"),
    pytest.param(dict(quality=90, exif=exif_block([(0x010F, 2, 4, b"cam")])), id="exif"),
]


@pytest.mark.parametrize("params", JPEG_VARIANTS)
@pytest.mark.parametrize("size", [(64, 48), (17, 13)], ids=["64x48", "17x13"])
def test_valid_jpeg_variants(params: dict, size: tuple[int, int]) -> None:
    data = encode(photo(*size, seed=size[0]), "JPEG", **params)
    image = assert_ok(data, "photo.jpg")
    assert same_pixels(image, decode_plain(data))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
@pytest.mark.parametrize("progressive", [False, True])
def test_valid_jpeg_grayscale_and_cmyk(mode: str, progressive: bool) -> None:
    data = encode(photo(mode=mode), "JPEG", quality=85, progressive=progressive)
    image = assert_ok(data, "photo.jpeg")
    assert same_pixels(image, decode_plain(data))


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        pytest.param(encode(Image.new("RGB", (1, 1), (9, 8, 7)), "JPEG"), "a.jpg", id="jpeg-1x1"),
        pytest.param(encode(Image.new("RGB", (1, 1), (9, 8, 7)), "PNG"), "a.png", id="png-1x1"),
        pytest.param(encode(photo(1, 4000), "JPEG", quality=80), "a.jpg", id="jpeg-1x4000"),
        pytest.param(encode(Image.new("L", (1, 65535), 77), "PNG"), "a.png", id="png-1x65535"),
        pytest.param(encode(Image.new("L", (65535, 1), 77), "PNG"), "a.png", id="png-65535x1"),
    ],
)
def test_extreme_shapes(data: bytes, filename: str) -> None:
    image = assert_ok(data, filename)
    assert image.size == Image.open(io.BytesIO(data)).size


def test_jpeg_with_fill_bytes_and_trailing_data() -> None:
    data = encode(PHOTO, "JPEG", progressive=True)
    padded = data.replace(b"\xff\xda", b"\xff\xff\xff\xda").replace(b"\xff\xd9", b"\xff\xff\xd9")
    assert_ok(padded, "a.jpg")
    assert_ok(data + b"appended by some camera" * 50, "a.jpg")


def test_jpeg_with_embedded_thumbnail() -> None:
    thumbnail = encode(photo(16, 12), "JPEG")  # SOI...EOI inside APP1 must not end the walk
    exif = exif_block([(0x010F, 2, 4, b"cam")]) + thumbnail
    assert_ok(encode(PHOTO, "JPEG", exif=exif), "a.jpg")


def test_mpo_is_a_jpeg() -> None:
    data = encode_frames([photo(seed=1), photo(seed=2)], "MPO")
    verdict, image = inspect_image(data, "stereo.JPG")
    assert verdict.ok and verdict.format == "MPO"
    assert same_pixels(image, decode_plain(data))


PNG_16 = Image.fromarray(np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21)
PALETTE = PHOTO.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)

VALID_FILES = [
    pytest.param(encode(PHOTO, "PNG"), "a.png", id="png-rgb"),
    pytest.param(encode(PHOTO.convert("RGBA"), "PNG"), "a.png", id="png-rgba"),
    pytest.param(encode(PHOTO.convert("LA"), "PNG"), "a.png", id="png-la"),
    pytest.param(encode(PHOTO.convert("1"), "PNG"), "a.png", id="png-1bit"),
    pytest.param(encode(PNG_16, "PNG"), "a.png", id="png-16bit"),
    pytest.param(encode(PALETTE, "PNG", transparency=bytes([0, 128] + [255] * 30)), "a.png", id="png-trns"),
    pytest.param(encode(PALETTE, "PNG", transparency=3), "a.png", id="png-trns-index"),
    pytest.param(encode(PHOTO, "WEBP", quality=80), "a.webp", id="webp-lossy"),
    pytest.param(encode(PHOTO, "WEBP", lossless=True), "a.webp", id="webp-lossless"),
    pytest.param(encode(PHOTO.convert("RGBA"), "WEBP"), "a.webp", id="webp-alpha"),
    pytest.param(encode(PHOTO, "BMP"), "a.bmp", id="bmp"),
    pytest.param(encode(PHOTO, "PPM"), "a.ppm", id="ppm"),
    pytest.param(encode(PHOTO.convert("L"), "PPM"), "a.pgm", id="pgm"),
    pytest.param(encode(PHOTO, "TIFF"), "a.tif", id="tiff-raw"),
    pytest.param(encode(PHOTO, "TIFF", compression="tiff_lzw"), "a.tiff", id="tiff-lzw"),
    pytest.param(encode(PHOTO, "TIFF", compression="tiff_deflate"), "a.tiff", id="tiff-deflate"),
    pytest.param(encode(PHOTO, "TIFF", compression="jpeg"), "a.tif", id="tiff-jpeg"),
    pytest.param(encode(PHOTO, "TIFF", compression="packbits"), "a.tif", id="tiff-packbits"),
    pytest.param(encode(PHOTO, "GIF"), "a.gif", id="gif"),
]


@pytest.mark.parametrize(("data", "filename"), VALID_FILES)
def test_valid_other_formats(data: bytes, filename: str) -> None:
    image = assert_ok(data, filename)
    assert image.size == (64, 48)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    image = assert_ok(encode(PNG_16, "PNG"), "a.png")
    expected = (np.asarray(PNG_16) >> 8).astype(np.uint8)
    assert np.array_equal(np.asarray(image)[..., 0], expected)


FRAMES = [photo(seed=s) for s in range(3)]


@pytest.mark.parametrize(
    ("fmt", "filename", "params"),
    [
        ("GIF", "anim.gif", dict(duration=100, loop=0)),
        ("WEBP", "anim.webp", dict(duration=100, lossless=True)),
        ("TIFF", "pages.tif", {}),
    ],
)
def test_multi_frame_files_give_their_first_frame(fmt: str, filename: str, params: dict) -> None:
    data = encode_frames(FRAMES, fmt, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = assert_ok(data, filename)
    assert same_pixels(image, decode_plain(data))  # Image.open starts at frame 0


# --------------------------------------------------------------------------------------------------------
# EXIF orientation


def test_exif_orientation_6_is_applied() -> None:
    wide = photo(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(wide, "JPEG", quality=95, exif=exif)
    image = assert_ok(data, "rotated.jpg")
    assert image.size == (48, 64)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert same_pixels(image, expected)
    raw = assert_ok(data, "rotated.jpg", apply_exif=False)
    assert raw.size == (64, 48)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_ends_upright(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(PHOTO, "PNG", exif=exif)
    image = assert_ok(data, "a.png")
    assert image.size == ((48, 64) if orientation >= 5 else (64, 48))


@pytest.mark.parametrize(
    "exif",
    [
        pytest.param(exif_block([(0x0112, 2, 4, b"six")]), id="orientation-as-text"),
        pytest.param(exif_block([(0x0112, 3, 1, struct.pack("<H", 9))]), id="orientation-9"),
        pytest.param(exif_block([(0x0112, 3, 200, struct.pack("<I", 5000))]), id="value-out-of-range"),
        pytest.param(b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff", id="cut-ifd"),
        pytest.param(b"Exif\x00\x00II*\x00\xff\xff\xff\x7f", id="ifd-offset-beyond"),
        pytest.param(b"Exif\x00\x00garbage", id="not-tiff"),
    ],
)
def test_broken_exif_keeps_the_stored_orientation(exif: bytes) -> None:
    data = encode(PHOTO, "JPEG", exif=exif)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the corrupt EXIF; that is fine
        image = assert_ok(data, "a.jpg")
    assert image.size == (64, 48)


def test_failing_exif_transpose_keeps_the_unrotated_image(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(image: Image.Image) -> Image.Image:
        raise ValueError("cannot write EXIF back")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    exif = Image.Exif()
    exif[0x0112] = 6
    image = assert_ok(encode(PHOTO, "JPEG", exif=exif), "a.jpg")
    assert image.size == (64, 48)


def test_to_rgb_returns_an_independent_upright_copy() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    for data, size in ((encode(PHOTO, "JPEG"), (64, 48)), (encode(PHOTO, "PNG", exif=exif), (48, 64))):
        with Image.open(io.BytesIO(data)) as source:
            source.load()
            image = to_rgb(source)
            assert image is not source
        assert image.mode == "RGB" and image.size == size
        image.getpixel((0, 0))  # still usable after the source was closed


# --------------------------------------------------------------------------------------------------------
# empty / not an image / format mismatch


def test_empty() -> None:
    verdict = assert_bad(b"", "a.jpg", Reason.EMPTY)
    assert (verdict.format, verdict.width, verdict.height) == (None, None, None)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes(), id="random"),
        pytest.param(b"this is a text file, not a picture\n" * 40, id="text"),
        pytest.param(b"<html><body>404 not found</body></html>", id="html"),
        pytest.param(b"\x00", id="one-byte"),
        pytest.param(b"\x89PN", id="png-signature-fragment"),
    ],
)
def test_not_an_image(data: bytes) -> None:
    assert_bad(data, "photo.jpg", Reason.NOT_AN_IMAGE)


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        (encode(PHOTO, "PNG"), "a.jpg"),
        (encode(PHOTO, "JPEG"), "a.png"),
        (encode(PHOTO, "JPEG"), "a.webp"),
        (encode(PHOTO, "BMP"), "a.tiff"),
        (encode(PHOTO, "TIFF"), "a.bmp"),
        (encode(PHOTO, "WEBP"), "a.ppm"),
        (encode(PHOTO, "GIF"), "a.jpeg"),
    ],
)
def test_format_mismatch(data: bytes, filename: str) -> None:
    verdict = assert_bad(data, filename, Reason.FORMAT_MISMATCH)
    assert (verdict.width, verdict.height) == (64, 48)
    ok, image = inspect_image(data, filename, check_corruptness=False)
    assert ok.ok and image is not None


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        (encode(PHOTO, "JPEG"), "A.JPG"),
        (encode(PHOTO, "JPEG"), "dir.png/a.jpeg"),
        (encode(PHOTO.convert("L"), "PPM"), "a.pgm"),
        (encode(PHOTO, "PPM"), "a.pgm"),
        (encode(PHOTO, "PNG"), "a.gif"),  # extensions outside the table are not checked
        (encode(PHOTO, "PNG"), "no_extension"),
    ],
)
def test_extension_matching_rules(data: bytes, filename: str) -> None:
    assert_ok(data, filename)


def test_damage_is_reported_before_a_mismatch() -> None:
    png = encode(PHOTO, "PNG")
    assert_bad(cut(png, 0.5), "a.jpg", Reason.TRUNCATED)


# --------------------------------------------------------------------------------------------------------
# too large


def test_too_large_is_decided_from_the_header() -> None:
    verdict = assert_bad(png_header_only(100_000, 100_000), "huge.png", Reason.TOO_LARGE)
    assert (verdict.format, verdict.width, verdict.height) == ("PNG", 100_000, 100_000)


def test_too_large_jpeg_header() -> None:
    data = jpeg_with_size(encode(PHOTO, "JPEG"), 65_000, 65_000)
    assert_bad(data, "huge.jpg", Reason.TOO_LARGE)


def test_max_pixels_is_the_limit() -> None:
    data = encode(PHOTO, "JPEG")
    assert_bad(data, "a.jpg", Reason.TOO_LARGE, max_pixels=64 * 48 - 1)
    assert_ok(data, "a.jpg", max_pixels=64 * 48)
    assert_bad(data, "a.jpg", Reason.TOO_LARGE, max_pixels=100, check_corruptness=False)


def test_pillow_global_pixel_limit_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(PHOTO, "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow would raise DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor may a DecompressionBombWarning be emitted
        assert_ok(data, "a.png")
        assert_ok(encode(PHOTO, "JPEG"), "a.jpg")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    assert_bad(data, "a.png", Reason.TOO_LARGE, max_pixels=1000)


def test_pillow_globals_are_left_alone() -> None:
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    jpeg = encode(PHOTO, "JPEG")
    inspect_image(cut(jpeg, 0.5, append=EOI), "a.jpg")
    inspect_image(cut(jpeg, 0.5), "a.jpg", check_corruptness=False)
    inspect_image(png_header_only(100_000, 100_000), "a.png")
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)


# --------------------------------------------------------------------------------------------------------
# Truncated JPEGs: the hard case is a cut followed by an end-of-image marker

JPEG_KINDS = {
    "baseline": dict(quality=90),
    "baseline-444": dict(quality=95, subsampling=0),
    "optimized": dict(quality=75, optimize=True),
    "progressive": dict(quality=90, progressive=True),
    "restarts": dict(quality=90, restart_marker_blocks=2),
    "grayscale-prog": dict(quality=90, progressive=True),
}


def jpeg_of_kind(kind: str) -> bytes:
    image = photo(160, 120, seed=3, mode="L" if kind.startswith("grayscale") else "RGB")
    return encode(image, "JPEG", **JPEG_KINDS[kind])


def test_pillow_alone_accepts_a_cut_jpeg_with_eoi() -> None:
    """The premise: libjpeg only warns, so plain Pillow decodes the damaged file without complaint."""
    damaged = cut(jpeg_of_kind("baseline"), 0.5, append=EOI)
    Image.open(io.BytesIO(damaged)).load()


@pytest.mark.parametrize("kind", list(JPEG_KINDS))
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.8, 0.95, 0.99])
@pytest.mark.parametrize("append", [EOI, b""], ids=["eoi-appended", "plain-cut"])
def test_truncated_jpeg(kind: str, fraction: float, append: bytes) -> None:
    data = jpeg_of_kind(kind)
    assert_ok(data, "a.jpg")
    damaged = cut(data, fraction, append=append)
    verdict = assert_bad(damaged, "a.jpg", Reason.TRUNCATED)
    assert verdict.format == "JPEG"
    if len(damaged) > jpeg_scans(data)[0].start:  # header complete: its size is reported
        assert (verdict.width, verdict.height) == (160, 120)


@pytest.mark.parametrize("kind", ["baseline", "progressive", "restarts"])
def test_jpeg_cut_in_the_last_scan_tail(kind: str) -> None:
    data = jpeg_of_kind(kind)
    last = jpeg_scans(data)[-1]
    for lost in (2000, 500, 200, 100):  # bytes lost from the end of the final scan
        if last.end - lost > last.start:
            assert_bad(data[: last.end - lost] + EOI, "a.jpg", Reason.TRUNCATED)


def test_jpeg_header_cut() -> None:
    data = jpeg_of_kind("baseline")
    for length in (3, 10, 100, jpeg_scans(data)[0].sos + 3):
        assert_bad(data[:length], "a.jpg", Reason.TRUNCATED)


def test_jpeg_missing_only_its_eoi() -> None:
    data = jpeg_of_kind("baseline")
    assert_bad(data[:-2], "a.jpg", Reason.TRUNCATED)
    assert_bad(jpeg_of_kind("progressive")[:-2], "a.jpg", Reason.TRUNCATED)


@pytest.mark.parametrize("kept", [1, 3, 6, 9])
def test_progressive_jpeg_cut_exactly_between_scans(kept: int) -> None:
    data = jpeg_of_kind("progressive")
    scans = jpeg_scans(data)
    assert len(scans) == 10
    assert_bad(data[: scans[kept].sos] + EOI, "a.jpg", Reason.TRUNCATED)


def test_restart_jpeg_cut_exactly_at_a_restart_marker() -> None:
    data = jpeg_of_kind("restarts")
    markers = restart_offsets(data, jpeg_scans(data)[0])
    for rst in (markers[0], markers[len(markers) // 2], markers[-1]):
        assert_bad(data[:rst] + EOI, "a.jpg", Reason.TRUNCATED)


# --------------------------------------------------------------------------------------------------------
# Damaged JPEG scan data


def test_marker_spliced_into_scan_data() -> None:
    """libjpeg ends the scan at the marker and fills the rest with grey; plain Pillow accepts it."""
    data = jpeg_of_kind("baseline")
    scan = jpeg_scans(data)[0]
    middle = scan.start + (scan.end - scan.start) // 2
    middle = data.index(b"\xff", middle) if data[middle - 1] == 0xFF else middle
    damaged = data[:middle] + b"\xff\xfe\x00\x04hi" + data[middle:]
    Image.open(io.BytesIO(damaged)).load()
    assert_bad(damaged, "a.jpg", Reason.DECODE_ERROR)


def test_stray_restart_marker_without_restart_interval() -> None:
    data = jpeg_of_kind("baseline")
    scan = jpeg_scans(data)[0]
    middle = scan.start + (scan.end - scan.start) // 3
    while data[middle - 1] == 0xFF:
        middle += 1
    assert_bad(data[:middle] + b"\xff\xd0" + data[middle:], "a.jpg", Reason.DECODE_ERROR)


def test_restart_markers_out_of_sequence() -> None:
    data = jpeg_of_kind("restarts")
    first, second = restart_offsets(data, jpeg_scans(data)[0])[:2]
    damaged = bytearray(data)
    damaged[first + 1], damaged[second + 1] = data[second + 1], data[first + 1]
    assert_bad(bytes(damaged), "a.jpg", Reason.DECODE_ERROR)


@pytest.mark.parametrize("seed", range(4))
def test_garbage_with_markers_over_scan_data(seed: int) -> None:
    data = jpeg_of_kind("baseline")
    scan = jpeg_scans(data)[0]
    rng = np.random.default_rng(seed)
    garbage = bytearray(rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
    garbage[100:102] = b"\xff\xc4"  # at least one marker in the overwritten stretch
    start = scan.start + (scan.end - scan.start) // 3
    verdict, _ = inspect_image(data[:start] + bytes(garbage) + data[start + 400 :], "a.jpg")
    assert not verdict.ok
    assert verdict.reason in (Reason.TRUNCATED.value, Reason.DECODE_ERROR.value)


def test_too_many_scans() -> None:
    data = jpeg_of_kind("progressive")
    last = jpeg_scans(data)[-1]
    repeated = data[last.sos : last.end] * 600
    assert_bad(data[: last.end] + repeated + EOI, "a.jpg", Reason.DECODE_ERROR)


def test_invalid_frame_header() -> None:
    data = encode(PHOTO, "JPEG")
    sof = data.index(b"\xff\xc0")
    damaged = data[: sof + 2] + b"\x00\x01" + data[sof + 4 :]  # segment length 1
    verdict, _ = inspect_image(damaged, "a.jpg")
    assert verdict.reason in (Reason.DECODE_ERROR.value, Reason.NOT_AN_IMAGE.value)


# --------------------------------------------------------------------------------------------------------
# Other formats: truncation and damage

PNG = encode(photo(160, 120, seed=4), "PNG")


@pytest.mark.parametrize("fraction", [0.001, 0.02, 0.3, 0.5, 0.8, 0.99])
def test_truncated_png(fraction: float) -> None:
    assert_bad(cut(PNG, fraction), "a.png", Reason.TRUNCATED)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.8])
def test_truncated_png_with_iend_appended(fraction: float) -> None:
    assert_bad(cut(PNG, fraction) + png_chunk(b"IEND", b""), "a.png", Reason.TRUNCATED)


def test_png_missing_iend() -> None:
    assert_bad(PNG[:-12], "a.png", Reason.TRUNCATED)


def test_png_idat_damage_fails_the_crc() -> None:
    idat = png_chunk_offset(PNG, b"IDAT")
    assert_bad(flip_bit(PNG, idat + 8 + 500), "a.png", Reason.DECODE_ERROR)  # inside the data
    length = int.from_bytes(PNG[idat : idat + 4], "big")
    assert_bad(flip_bit(PNG, idat + 8 + length), "a.png", Reason.DECODE_ERROR)  # the CRC itself


def test_png_damaged_ancillary_chunk_after_the_pixels_is_tolerated() -> None:
    """Decoders skip a damaged optional chunk (Pillow itself only checks those before IDAT)."""
    text = png_chunk(b"tEXt", b"Comment\x00hello")
    damaged_text = text[:-1] + bytes([text[-1] ^ 0xFF])
    assert_ok(PNG[:-12] + damaged_text + PNG[-12:], "a.png")


def test_png_zlib_damage_without_crc_check_is_a_decode_error() -> None:
    """Damage with a recomputed CRC (as a buggy writer would produce) still fails in zlib."""
    idat = png_chunk_offset(PNG, b"IDAT")
    length = int.from_bytes(PNG[idat : idat + 4], "big")
    payload = bytearray(PNG[idat + 8 : idat + 8 + length])
    payload[2:40] = b"\xff" * 38
    rebuilt = PNG[:idat] + png_chunk(b"IDAT", bytes(payload)) + PNG[idat + 12 + length :]
    assert_bad(rebuilt, "a.png", Reason.DECODE_ERROR)


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        pytest.param(encode(photo(160, 120), "WEBP", quality=80), "a.webp", id="webp-lossy"),
        pytest.param(encode(photo(160, 120), "WEBP", lossless=True), "a.webp", id="webp-lossless"),
        pytest.param(encode_frames(FRAMES, "WEBP", duration=50), "a.webp", id="webp-animated"),
        pytest.param(encode(photo(160, 120), "BMP"), "a.bmp", id="bmp"),
        pytest.param(encode(photo(160, 120), "PPM"), "a.ppm", id="ppm"),
        pytest.param(encode(photo(160, 120, mode="L"), "PPM"), "a.pgm", id="pgm"),
        pytest.param(encode(photo(160, 120), "TIFF"), "a.tif", id="tiff-raw"),
        pytest.param(encode(photo(160, 120), "TIFF", compression="tiff_lzw"), "a.tif", id="tiff-lzw"),
        pytest.param(encode(photo(160, 120), "TIFF", compression="jpeg"), "a.tif", id="tiff-jpeg"),
        pytest.param(encode_frames(FRAMES, "TIFF"), "a.tif", id="tiff-pages"),
        pytest.param(encode(photo(160, 120), "GIF"), "a.gif", id="gif"),
        pytest.param(encode_frames(FRAMES, "GIF", duration=50), "a.gif", id="gif-animated"),
    ],
)
@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_truncated_other_formats(data: bytes, filename: str, fraction: float) -> None:
    assert_ok(data, filename)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow's TIFF reader warns about the cut directory
        assert_bad(cut(data, fraction), filename, Reason.TRUNCATED)


def test_gif_cut_inside_a_frame_header() -> None:
    data = encode_frames(FRAMES, "GIF", duration=50)
    frames = gif_frame_offsets(data)
    assert len(frames) == 3
    assert_bad(data[: frames[1] + 5], "a.gif", Reason.TRUNCATED)
    assert_ok(data[: frames[0]] + data[frames[2] :], "a.gif")  # whole frames removed: nothing is cut


def test_gif_without_trailer_is_tolerated() -> None:
    data = encode(PHOTO, "GIF")
    assert data.endswith(b";")
    assert_ok(data[:-1], "a.gif")


# --------------------------------------------------------------------------------------------------------
# Permissive mode


@pytest.mark.parametrize(
    ("data", "filename"),
    [
        pytest.param(cut(jpeg_of_kind("baseline"), 0.5, append=EOI), "a.jpg", id="jpeg-cut-eoi"),
        pytest.param(cut(jpeg_of_kind("baseline"), 0.5), "a.jpg", id="jpeg-cut"),
        pytest.param(cut(jpeg_of_kind("progressive"), 0.5), "a.jpg", id="jpeg-prog-cut"),
        pytest.param(cut(PNG, 0.5), "a.png", id="png-cut"),
        pytest.param(cut(encode(photo(160, 120), "BMP"), 0.5), "a.bmp", id="bmp-cut"),
        pytest.param(encode(PHOTO, "PNG"), "a.jpg", id="mismatch"),
    ],
)
def test_permissive_mode_returns_what_can_be_decoded(data: bytes, filename: str) -> None:
    assert not inspect_image(data, filename)[0].ok
    assert_ok(data, filename, check_corruptness=False)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.EMPTY),
        (b"plain text" * 10, Reason.NOT_AN_IMAGE),
        (png_header_only(100_000, 100_000), Reason.TOO_LARGE),
        (cut(encode(photo(160, 120), "WEBP"), 0.5), Reason.TRUNCATED),
    ],
)
def test_permissive_mode_still_fails_without_an_image(data: bytes, reason: Reason) -> None:
    assert_bad(data, "a.webp", reason, check_corruptness=False)


# --------------------------------------------------------------------------------------------------------
# Never raises


SEEDS = {
    "jpeg": encode(PHOTO, "JPEG"),
    "jpeg-prog": encode(PHOTO, "JPEG", progressive=True),
    "jpeg-rst": encode(PHOTO, "JPEG", restart_marker_blocks=2),
    "png": encode(PHOTO, "PNG"),
    "webp": encode(PHOTO, "WEBP"),
    "gif": encode(PHOTO, "GIF"),
    "tiff": encode(PHOTO, "TIFF", compression="tiff_lzw"),
    "bmp": encode(PHOTO, "BMP"),
}


@pytest.mark.parametrize("name", list(SEEDS))
def test_mutated_inputs_never_raise(name: str) -> None:
    rng = np.random.default_rng(sum(name.encode()))
    seed = SEEDS[name]
    for _ in range(60):
        data = bytearray(seed)
        for _ in range(int(rng.integers(1, 6))):
            pos = int(rng.integers(0, len(data)))
            operation = rng.integers(0, 3)
            if operation == 0:
                data[pos] = int(rng.integers(0, 256))
            elif operation == 1:
                data[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 16)), dtype=np.uint8).tobytes()
            else:
                del data[pos : pos + int(rng.integers(1, 64))]
        for strict in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                verdict, image = inspect_image(bytes(data), f"x.{name}", check_corruptness=strict)
            assert isinstance(verdict, Verdict)
            assert verdict.ok == (image is not None)
            if verdict.ok:
                assert image.mode == "RGB"
            else:
                assert verdict.reason in {r.value for r in Reason}
