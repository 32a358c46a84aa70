"""Reading and decoding one file: bytes read once → content hash → verdict → model input.

Kept free of torch so that decode workers in a process pool start fast and stay small.
"""

from __future__ import annotations

import os
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .check import Reason, Verdict, content_hash, inspect_image
from .quality import Quality, measure


@dataclass(frozen=True)
class FileRef:
    root: str
    relpath: str
    size: int
    mtime_ns: int

    @property
    def path(self) -> Path:
        return Path(self.root) / self.relpath


@dataclass(frozen=True)
class DecodeSettings:
    """How files become model input.

    exact_decode: True gives lightly-embed's pixels exactly (full decode, then the bilinear resize); False
    decodes a JPEG DCT-scaled to the smallest size >= input_size on both axes before the same resize (other
    formats in full): 2.5-3.5x faster on 640x480-1920x1080 photos at input 64, pixels close (docs/BENCHMARKS.md).

    measure_quality: the quality signals (pipeline/quality.py) of every ok image, from the decoded image before
    the resize, at the scale it was decoded at. With exact_decode=False a JPEG is DCT-scaled near input_size
    (1920x1080 at 64: 240x135), where sharpness barely tells a blurred photo from a sharp one (8 of 63 copies
    blurred by 0.5 % of the long side flagged blurry, against 63 at full decode; bench/quality_thresholds.py).
    """

    input_size: int = 64
    max_pixels: int = 178_956_970
    check_corruptness: bool = True
    apply_exif: bool = True
    exact_decode: bool = False
    measure_quality: bool = True


@dataclass
class Decoded:
    ref: FileRef
    verdict: Verdict | None  # None: the file vanished before it could be read
    hash: str | None = None
    pixels: np.ndarray | None = None
    quality: Quality | None = None  # with DecodeSettings.measure_quality, for an ok image


def preprocess(image: Image.Image, input_size: int) -> np.ndarray:
    """An image → input_size×input_size×3 uint8, resized exactly as torchvision's Resize does on PIL images."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image.resize((input_size, input_size), Image.Resampling.BILINEAR), dtype=np.uint8)


def read_and_decode(ref: FileRef, settings: DecodeSettings) -> Decoded:
    """Read the file once; hash, verdict and model input from the same bytes."""
    try:
        with open(ref.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            data = fh.read()
    except FileNotFoundError:
        return Decoded(ref, None)
    except OSError as exc:
        verdict = Verdict(False, "unreadable", exc.strerror or str(exc), None, None, None)
        return Decoded(ref, verdict)
    # The identity that is recorded is the one of the bytes actually read.
    ref = FileRef(ref.root, ref.relpath, st.st_size, st.st_mtime_ns)
    verdict, image = inspect_image(
        data, ref.relpath, max_pixels=settings.max_pixels,
        check_corruptness=settings.check_corruptness, apply_exif=settings.apply_exif,
        scale_to=None if settings.exact_decode else settings.input_size,
    )
    if image is None:
        return Decoded(ref, verdict, content_hash(data))
    quality = measure(image) if settings.measure_quality else None
    return Decoded(ref, verdict, content_hash(data), preprocess(image, settings.input_size), quality)


def collect(future: Future[Decoded], ref: FileRef) -> Decoded:
    """A pooled decode's result. A worker that ran past its time limit (and was stopped) or died on the
    file gives that file a verdict, not an error, so one hostile file never stops a batch."""
    try:
        return future.result()
    except CancelledError:
        raise
    except FutureTimeout:
        return Decoded(ref, Verdict(False, Reason.DECODE_TIMEOUT.value,
                                    "decoding ran past check.decode_timeout; the worker was stopped", None, None, None))
    except Exception as exc:  # noqa: BLE001 - the worker process died (a crash in a native decoder) or raised
        detail = f"the decode worker failed on this file: {type(exc).__name__}: {exc}"[:300]
        return Decoded(ref, Verdict(False, Reason.DECODER_CRASHED.value, detail, None, None, None))


def warm_up() -> int:
    """A no-op a process pool can run to start its workers (and import this module) ahead of work."""
    return os.getpid()
