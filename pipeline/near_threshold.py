"""The near-duplicate threshold of a model (`near_duplicate.threshold=auto`), calibrated on a store's own images.

A fixed distance does not carry from one model to another (random weights, lightly's pretrained weights and an
ONNX model have different scales), so each model's threshold is measured: a sample of the store's images is
copied the way a user's near-duplicates are made (`copies_of`: downscaled, JPEG re-encoded), originals and
copies are embedded by the same engine, and `calibrate` derives the threshold from the distances between each
copy and its original, with the distances between the originals as a sanity bound (a store may hold real
near-duplicates of its own, e.g. video frames, so those are not a reliable "distinct" set).

Pure: no logging set-up, no threads, no torch; the caller reads the files and embeds.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from .check import to_rgb

MIN_IMAGES = 8  # fewest ok images (originals) a calibration needs
# Most images sampled: each is re-read, copied len(COPIES) times, and 1 + len(COPIES) images embedded: 96 images,
# 2.7 s on 2 shared cores with the default model at 640x480 (bf16; 6.4 s under a load of 6); 10 already give a steady threshold.
SAMPLE_IMAGES = 24

# (scale of each side, JPEG quality): the copies a user calls near-duplicates of a photo (a thumbnail, a resized
# upload, a re-save at lower quality). Resampled with Pillow's LANCZOS, 4:2:0 chroma (Pillow's default), always
# JPEG (a PNG becomes a JPEG). Measured (bench/near_duplicate_threshold.py): of 50-75 % and q60-85 these move a
# vector the most; a fourth copy (75 %, q85) moved it the least and only added embedding time.
COPIES: tuple[tuple[float, int], ...] = ((0.5, 75), (0.6, 70), (1.0, 60))

# The rule (docs/BENCHMARKS.md): threshold = max(copy p95, min(MARGIN x copy p95, CAP x distinct p05)).
MARGIN = 4.0  # how much further than the calibration's own copies a near-duplicate may be (a 33 % q50 thumbnail)
CAP = 0.5  # at most half the distance at which the closest 5 % of the sampled originals have another original
COPY_QUANTILE = 0.95
DISTINCT_QUANTILE = 0.05


def copies_of(data: bytes, *, apply_exif: bool = True) -> list[bytes]:
    """Resized, recompressed copies of an image file's bytes (deterministic): the kinds of copy a user calls a
    near-duplicate (`COPIES`: 50 % + JPEG q75, 60 % + q70, full size + q60; a PNG or any other format becomes a
    JPEG). Each is the first frame as RGB, made upright by its EXIF orientation when `apply_exif` (as the store
    decodes it: `check.to_rgb`), with no EXIF of its own. [] when the bytes do not decode."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            opened.load()
            image = to_rgb(opened, apply_exif=apply_exif)
    except Exception:  # noqa: BLE001 - any input that does not decode (damaged, unsupported, a bomb) has no copies
        return []
    width, height = image.size
    out: list[bytes] = []
    for scale, quality in COPIES:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        copy = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        copy.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _stats(values: np.ndarray, quantiles: Mapping[str, float]) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {name: float(np.quantile(values, q)) if q < 1 else float(values.max()) for name, q in quantiles.items()}


COPY_STATS = {"p50": 0.5, "p95": COPY_QUANTILE, "max": 1.0}
DISTINCT_STATS = {"p01": 0.01, "p05": DISTINCT_QUANTILE, "p50": 0.5}


@dataclass(frozen=True)
class ThresholdCalibration:
    threshold: float
    images: int  # originals used
    copy_distances: dict[str, float] = field(default_factory=dict)  # copy to its original: p50, p95, max
    distinct_distances: dict[str, float] = field(default_factory=dict)  # nearest other original: p01, p05, p50
    rule: str = ""  # how threshold was derived, one line (`poolwatch status`)

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "images": self.images, "copy_distances": dict(self.copy_distances),
                "distinct_distances": dict(self.distinct_distances), "rule": self.rule}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ThresholdCalibration:
        return cls(threshold=float(d["threshold"]), images=int(d["images"]),
                   copy_distances={str(k): float(v) for k, v in dict(d.get("copy_distances") or {}).items()},
                   distinct_distances={str(k): float(v) for k, v in dict(d.get("distinct_distances") or {}).items()},
                   rule=str(d.get("rule", "")))


def _pairwise(a: np.ndarray) -> np.ndarray:
    x = a.astype(np.float64)
    sq = (x * x).sum(1)
    d2 = sq[:, None] - 2.0 * (x @ x.T) + sq[None, :]  # float64: exact enough for distances 1e-6 of the norms
    out: np.ndarray = np.sqrt(np.maximum(d2, 0.0))
    return out


def calibrate(original_vectors: np.ndarray, copy_vectors: np.ndarray, copy_owner: np.ndarray) -> ThresholdCalibration:
    """The threshold from `original_vectors` (N, d) and `copy_vectors` (M, d), copy i being a copy of original
    `copy_owner[i]`. The vectors are the ones lookups use (normalised or not: the caller decides).

    threshold = max(copy p95, min(MARGIN x copy p95, CAP x distinct p05)), where copy p95 is the 95th percentile
    of the distances from each copy to its original and distinct p05 the 5th percentile of the distances from
    each original to the nearest other original. The copies carry the rule: MARGIN times them catches copies a
    little further than the ones made here (another resizer, a smaller thumbnail, a lower quality). The
    originals only bound it: at most half the distance at which the closest few originals have a neighbour, so
    that different photos stay apart; but never below the copies themselves, since originals that close are
    near-duplicates of each other (video frames, bursts), not distinct photos. Percentiles, not extremes: one
    odd copy or one pair of frames in the sample does not move the threshold.
    Raises ValueError when N < MIN_IMAGES, when there is no copy, or on bad shapes or values.
    """
    originals = np.asarray(original_vectors)
    copies = np.asarray(copy_vectors)
    owner = np.asarray(copy_owner)
    if originals.ndim != 2:
        raise ValueError(f"original_vectors must be (N, d), got shape {originals.shape}")
    n = originals.shape[0]
    if n < MIN_IMAGES:
        raise ValueError(f"a near-duplicate calibration needs at least {MIN_IMAGES} images, got {n}")
    if copies.ndim != 2 or copies.shape[1] != originals.shape[1]:
        raise ValueError(f"copy_vectors must be (M, {originals.shape[1]}), got shape {copies.shape}")
    if owner.shape != (copies.shape[0],):
        raise ValueError(f"copy_owner must be ({copies.shape[0]},), got shape {owner.shape}")
    if copies.shape[0] == 0:
        raise ValueError("a near-duplicate calibration needs copies of the images, got none")
    if not np.issubdtype(owner.dtype, np.integer) or owner.min() < 0 or owner.max() >= n:
        raise ValueError(f"copy_owner must hold indices of original_vectors (0..{n - 1})")
    if not (np.isfinite(originals).all() and np.isfinite(copies).all()):
        raise ValueError("the vectors hold NaN or infinity")

    copy_d = np.linalg.norm(copies.astype(np.float64) - originals[owner].astype(np.float64), axis=1)
    pair = _pairwise(originals)
    np.fill_diagonal(pair, np.inf)
    nearest = pair.min(axis=1)
    copy_stats = _stats(copy_d, COPY_STATS)
    distinct_stats = _stats(nearest, DISTINCT_STATS)

    copy_q = float(np.quantile(copy_d, COPY_QUANTILE))
    distinct_q = float(np.quantile(nearest, DISTINCT_QUANTILE))
    wanted, bound = MARGIN * copy_q, CAP * distinct_q
    if wanted <= bound:
        threshold = wanted
        how = f"{MARGIN:g} x copy p95 {copy_q:.4g} (distinct p05 {distinct_q:.4g})"
    elif bound >= copy_q:
        threshold = bound
        how = f"{CAP:g} x distinct p05 {distinct_q:.4g}, below {MARGIN:g} x copy p95 {copy_q:.4g}"
    else:
        threshold = copy_q
        how = (f"copy p95 {copy_q:.4g}: the sampled images' nearest others (p05 {distinct_q:.4g}) are as close as copies,"
               " near-duplicates among them (or a model that barely tells them apart)")
    if threshold <= 0.0:  # the copies embed exactly as their originals: link identical vectors only
        threshold = float(np.finfo(np.float32).tiny)
        how += "; copies embed identically, only identical vectors are linked"
    rule = f"{threshold:.4g} = {how}; {copies.shape[0]} copies of {n} images"
    return ThresholdCalibration(threshold, n, copy_stats, distinct_stats, rule)
