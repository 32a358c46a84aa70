"""The near-duplicate threshold's calibration (issue 15, pipeline/near_threshold.py): the copies it makes, the rule
on synthetic vectors, its record, and once on real photos through the default engine."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poolwatch.pipeline import near_threshold
from poolwatch.pipeline.near_threshold import MIN_IMAGES, SAMPLE_IMAGES, ThresholdCalibration, calibrate, copies_of

from .conftest import FAST, encode, photo


def decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ---- copies_of -------------------------------------------------------------------------------------------

def test_copies_are_deterministic_decodable_jpegs_no_larger_than_the_original() -> None:
    original = encode(photo(1, (160, 120)), "JPEG", quality=95)
    copies = copies_of(original)
    assert copies == copies_of(original)  # byte for byte: a calibration can be repeated
    assert len(copies) == len(near_threshold.COPIES) >= 2
    assert len(set(copies)) == len(copies)
    src = np.asarray(decoded(original), dtype=np.float64)
    for data, (scale, _quality) in zip(copies, near_threshold.COPIES, strict=True):
        image = decoded(data)
        assert image.format == "JPEG" and image.mode == "RGB"
        assert image.size == (round(160 * scale), round(120 * scale))
        assert data != original
        if scale == 1.0:  # recompressed only: close to the original, not the same
            diff = np.abs(np.asarray(image, dtype=np.float64) - src).mean()
            assert 0 < diff < 10
    assert any(decoded(c).size < (160, 120) for c in copies)  # some are smaller


def test_copies_of_a_png_are_jpegs_and_keep_the_picture() -> None:
    image = photo(2, (96, 72))
    copies = copies_of(encode(image, "PNG"))
    assert copies and all(decoded(c).format == "JPEG" for c in copies)
    full = [c for c, (s, _q) in zip(copies, near_threshold.COPIES, strict=True) if s == 1.0]
    for c in full:
        assert np.abs(np.asarray(decoded(c), dtype=np.float64) - np.asarray(image, dtype=np.float64)).mean() < 10


def test_copies_are_upright_and_rgb() -> None:
    """A copy shows what the store's decode shows: EXIF orientation applied (and not written again), RGB."""
    image = photo(3, (80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    rotated = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    for c in copies_of(rotated):
        out = decoded(c)
        w, h = out.size
        assert h > w  # upright: 40x80 (scaled)
        assert out.getexif().get(0x0112) in (None, 1)
    for c in copies_of(rotated, apply_exif=False):  # a store with check.apply_exif_orientation=false
        w, h = decoded(c).size
        assert w > h
    grey = encode(image.convert("L"), "PNG")
    assert all(decoded(c).mode == "RGB" for c in copies_of(grey))
    rgba = encode(image.convert("RGBA"), "PNG")
    assert all(decoded(c).mode == "RGB" for c in copies_of(rgba))


def test_copies_of_a_16_bit_png_keep_its_range() -> None:
    """Decoded as the store decodes it (`check.to_rgb` scales 16 bits down, Pillow's own conversion clips)."""
    ramp = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    copies = copies_of(encode(Image.fromarray(ramp), "PNG"))
    full = np.asarray(decoded(copies[[s for s, _q in near_threshold.COPIES].index(1.0)]), dtype=np.float64)
    assert full.max() > 200 and full.min() < 20


@pytest.mark.parametrize("data", [b"", b"not an image at all" * 10, np.random.default_rng(0).bytes(4000)],
                         ids=["empty", "text", "random"])
def test_copies_of_bytes_that_do_not_decode_is_empty(data: bytes) -> None:
    assert copies_of(data) == []


def test_copies_of_a_truncated_file_is_empty() -> None:
    png = encode(photo(4, (96, 72)), "PNG")
    assert copies_of(png[: len(png) // 2]) == []


def test_copies_of_a_one_pixel_image() -> None:
    copies = copies_of(encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"))
    assert copies and all(decoded(c).size == (1, 1) for c in copies)


# ---- calibrate on synthetic vectors ------------------------------------------------------------------------

def clusters(n: int = 16, copies: int = 3, d: int = 32, spread: float = 1.0, jitter: float = 0.01,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n originals far apart (~spread), each with `copies` copies ~jitter away."""
    rng = np.random.default_rng(seed)
    originals = rng.normal(0, spread / np.sqrt(2 * d), (n, d)).astype(np.float32)
    owner = np.repeat(np.arange(n), copies)
    noise = rng.normal(0, jitter / np.sqrt(d), (n * copies, d)).astype(np.float32)
    return originals, originals[owner] + noise, owner


def dists(originals: np.ndarray, copies: np.ndarray, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    copy_d = np.linalg.norm(copies - originals[owner], axis=1)
    pair = np.linalg.norm(originals[:, None] - originals[None], axis=-1)
    return copy_d, pair[np.triu_indices(len(originals), 1)]


def test_threshold_lies_between_the_copies_and_distinct_images() -> None:
    originals, copies, owner = clusters()
    copy_d, pairs = dists(originals, copies, owner)
    cal = calibrate(originals, copies, owner)
    assert np.quantile(copy_d, 0.95) < cal.threshold < pairs.min()
    assert cal.threshold == pytest.approx(near_threshold.MARGIN * np.quantile(copy_d, 0.95), rel=1e-6)
    assert (copy_d < cal.threshold).mean() == 1.0
    assert cal.images == len(originals)
    assert set(cal.copy_distances) == {"p50", "p95", "max"}
    assert set(cal.distinct_distances) == {"p01", "p05", "p50"}
    assert cal.copy_distances["p50"] <= cal.copy_distances["p95"] <= cal.copy_distances["max"]
    assert cal.distinct_distances["p01"] <= cal.distinct_distances["p05"] <= cal.distinct_distances["p50"]
    assert cal.copy_distances["max"] == pytest.approx(copy_d.max(), rel=1e-6)
    assert cal.rule and "\n" not in cal.rule and "copy p95" in cal.rule


def test_threshold_scales_with_the_model() -> None:
    """No fixed distance: the same images under a model with 1000x the scale get 1000x the threshold."""
    originals, copies, owner = clusters()
    small = calibrate(originals, copies, owner)
    big = calibrate(originals * 1000, copies * 1000, owner)
    assert big.threshold == pytest.approx(small.threshold * 1000, rel=1e-4)


def test_distinct_images_bound_a_threshold_the_copies_would_set_too_high() -> None:
    """Copies almost as far as other images (a model that barely tells photos apart): the threshold stops at
    half the distinct distance, so that different photos are not linked."""
    originals, copies, owner = clusters(jitter=0.15)
    copy_d, pairs = dists(originals, copies, owner)
    cal = calibrate(originals, copies, owner)
    nearest = np.sort(np.linalg.norm(originals[:, None] - originals[None], axis=-1), axis=1)[:, 1]
    assert cal.threshold == pytest.approx(near_threshold.CAP * np.quantile(nearest, 0.05), rel=1e-6)
    assert np.quantile(copy_d, 0.95) <= cal.threshold < near_threshold.MARGIN * np.quantile(copy_d, 0.95)
    assert cal.threshold < pairs.min()
    assert "distinct p05" in cal.rule


def test_near_duplicates_among_the_originals_do_not_push_the_threshold_below_the_copies() -> None:
    """A store of video frames: the sampled originals come in pairs closer than the copies. Its 'distinct'
    distances are near-duplicates too, so the threshold rests on the copies (their p95) alone."""
    base, copies, owner = clusters(n=8, copies=3, jitter=0.05)
    originals = np.concatenate([base, base + 0.001])  # 16 originals: 8 pairs of frames
    copies = np.concatenate([copies, copies + 0.001])
    owner = np.concatenate([owner, owner + 8])
    copy_d = np.linalg.norm(copies - originals[owner], axis=1)
    cal = calibrate(originals, copies, owner)
    assert cal.threshold == pytest.approx(np.quantile(copy_d, 0.95), rel=1e-6)
    assert cal.distinct_distances["p05"] < cal.copy_distances["p50"]
    assert "near-duplicates among them" in cal.rule


def test_one_odd_copy_does_not_move_the_threshold() -> None:
    originals, copies, owner = clusters(n=16, copies=3)
    before = calibrate(originals, copies, owner).threshold
    odd = copies.copy()
    odd[0] = originals[5]  # one copy as far as another image
    after = calibrate(originals, odd, owner)
    assert after.copy_distances["max"] > 10 * before
    assert after.threshold < 1.5 * before


def test_copies_identical_to_their_originals_link_identical_vectors_only() -> None:
    originals, _copies, owner = clusters()
    cal = calibrate(originals, originals[owner], owner)
    assert 0 < cal.threshold < 1e-30
    assert "identical" in cal.rule


def test_calibration_needs_min_images() -> None:
    assert 2 <= MIN_IMAGES <= SAMPLE_IMAGES
    originals, copies, owner = clusters(n=MIN_IMAGES - 1)
    with pytest.raises(ValueError, match=str(MIN_IMAGES)):
        calibrate(originals, copies, owner)
    originals, copies, owner = clusters(n=MIN_IMAGES)
    assert calibrate(originals, copies, owner).images == MIN_IMAGES


@pytest.mark.parametrize("case", ["no copies", "owner out of range", "owner length", "dims", "nan", "float owner"])
def test_bad_input_is_a_value_error(case: str) -> None:
    originals, copies, owner = clusters()
    if case == "no copies":
        copies, owner = copies[:0], owner[:0]
    elif case == "owner out of range":
        owner = owner.copy()
        owner[0] = len(originals)
    elif case == "owner length":
        owner = owner[:-1]
    elif case == "dims":
        copies = copies[:, :-1]
    elif case == "nan":
        copies = copies.copy()
        copies[1, 1] = np.nan
    else:
        owner = owner.astype(np.float64)
    with pytest.raises(ValueError):
        calibrate(originals, copies, owner)


def test_record_roundtrips_through_json() -> None:
    originals, copies, owner = clusters()
    cal = calibrate(originals, copies, owner)
    d = cal.as_dict()
    again = ThresholdCalibration.from_dict(json.loads(json.dumps(d)))
    assert again == cal
    assert set(d) == {"threshold", "images", "copy_distances", "distinct_distances", "rule"}
    assert all(type(v) is float for v in [d["threshold"], *d["copy_distances"].values(), *d["distinct_distances"].values()])
    assert type(d["images"]) is int
    # an older or hand-written record without the optional parts still reads
    assert ThresholdCalibration.from_dict({"threshold": 0.5, "images": 9}).copy_distances == {}


# ---- real photos, the default engine ---------------------------------------------------------------------

def real_photos(size: tuple[int, int]) -> list[tuple[str, bytes]]:
    """Different real photographs (scikit-image's and scikit-learn's wheels) as JPEGs of `size`."""
    sk = pytest.importorskip("skimage.data")
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    arrays = [(n, getattr(sk, n)()) for n in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
                                               "immunohistochemistry", "retina", "camera", "coins", "clock", "page")]
    sample = sklearn_datasets.load_sample_images()
    arrays += [(Path(f).stem, im) for f, im in zip(sample.filenames, sample.images, strict=True)]
    out = []
    for name, arr in arrays:
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        image = Image.fromarray(np.ascontiguousarray(arr[..., :3]), "RGB").resize(size, Image.Resampling.BICUBIC)
        out.append((name, encode(image, "JPEG", quality=90)))
    return out


def test_real_photos_through_the_default_engine(tmp_path: Path) -> None:
    """The default offline model (random-init resnet-18 on OpenVINO, at input 32 here): a calibration on 10 real
    photos catches every copy of every photo and links no two different photos (normalised and raw)."""
    from poolwatch.daemon import runtime
    from poolwatch.pipeline.check import inspect_image
    from poolwatch.pipeline.config import load_config
    from poolwatch.pipeline.decode import preprocess
    from poolwatch.pipeline.sampling import normalize
    from poolwatch.pipeline.store import Store

    photos = real_photos((320, 240))
    config = load_config([f"shared_dir={tmp_path / 'shared'}", f"input_dir={tmp_path / 'in'}", *FAST,
                          "check.exact_decode=true"])
    with Store.open(config.store_path) as store:
        engine = runtime.load_engine(config, store=store)
    started = time.monotonic()

    def pixels(data: bytes) -> np.ndarray:
        verdict, image = inspect_image(data, "x.jpg")
        assert verdict.ok and image is not None
        return preprocess(image, engine.input_size)

    made = [copies_of(data) for _name, data in photos]
    owner = np.repeat(np.arange(len(photos)), [len(c) for c in made])
    vectors = engine.embed(np.stack([pixels(d) for _n, d in photos] + [pixels(c) for cs in made for c in cs]))
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"{len(vectors)} images copied, decoded and embedded in {elapsed:.1f} s"
    n = len(photos)
    for prep in (normalize, lambda v: v):
        v = prep(vectors)
        originals, copies = v[:n], v[n:]
        sample = np.arange(10)
        in_sample = np.isin(owner, sample)
        cal = calibrate(originals[sample], copies[in_sample], owner[in_sample])
        copy_d = np.linalg.norm(copies - originals[owner], axis=1)
        pair = np.linalg.norm(originals[:, None] - originals[None], axis=-1)[np.triu_indices(n, 1)]
        assert (copy_d < cal.threshold).all(), (cal.rule, copy_d.max())  # also the copies of the 3 photos not sampled
        assert (pair >= cal.threshold).all(), (cal.rule, pair.min())
        assert cal.threshold < pair.min() / 2, cal.rule
