"""The images an int8 model is calibrated on, decoded exactly as ingest decodes them for that model.

Two deterministic choices: the store's first `count` ok images in content-hash order (a store that has
them), or the first `count` good images of a pass's plan (a one-shot ingest over a backlog, which then
calibrates before it embeds anything, so nothing is embedded twice). The calibration's hash (over how the
pixels were decoded and the chosen images' content hashes, in order) is part of the int8 model's identity.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .decode import DecodeSettings, FileRef, read_and_decode
from .store import Store

# How model_build.quantize quantizes; part of the calibration's hash, so another scheme is another model.
QUANTIZATION = "nncf minmax mixed"


@dataclass
class Calibration:
    pixels: np.ndarray  # N×s×s×3 uint8
    hashes: list[str] = field(default_factory=list)  # content hashes of the images, in order
    decoded: str = ""  # how the pixels were made (input size, decode mode): other pixels, another calibration

    @property
    def hash(self) -> str:
        return hashlib.sha256("\n".join([QUANTIZATION, self.decoded, *self.hashes]).encode()).hexdigest()

    def __len__(self) -> int:
        return len(self.hashes)


def _decode_first(refs: Iterable[FileRef], settings: DecodeSettings, count: int) -> Calibration:
    pixels: list[np.ndarray] = []
    hashes: list[str] = []
    for ref in refs:
        decoded = read_and_decode(ref, settings)
        if decoded.verdict is None or not decoded.verdict.ok or decoded.pixels is None or decoded.hash is None:
            continue
        if decoded.hash in hashes:  # an exact copy adds nothing
            continue
        pixels.append(decoded.pixels)
        hashes.append(decoded.hash)
        if len(hashes) >= count:
            break
    size = settings.input_size
    stacked = np.stack(pixels) if pixels else np.zeros((0, size, size, 3), dtype=np.uint8)
    return Calibration(stacked, hashes, describe(settings))


def describe(settings: DecodeSettings) -> str:
    return f"{settings.input_size}px {'exact' if settings.exact_decode else 'scaled'} exif={settings.apply_exif}"


def from_store(store: Store, settings: DecodeSettings, count: int) -> Calibration:
    """The store's first `count` ok images by content hash that can still be read (None of them read twice)."""
    rows = store.ok_images_by_hash(count * 2)
    refs = (FileRef(root, relpath, 0, 0) for root, relpath, _hash in rows if (Path(root) / relpath).is_file())
    return _decode_first(refs, settings, count)


def from_hashes(store: Store, settings: DecodeSettings, hashes: Sequence[str]) -> Calibration:
    """A recorded calibration's images again (by content hash, in its order); those gone are left out."""
    refs: list[FileRef] = []
    for content_hash in hashes:
        image_id = store.first_ok_with_hash(content_hash)
        row = store.image(image_id) if image_id is not None else None
        if row is not None:
            refs.append(FileRef(str(row["root"]), str(row["relpath"]), 0, 0))
    calib = _decode_first(refs, settings, len(hashes))
    wanted = set(hashes)
    keep = [i for i, h in enumerate(calib.hashes) if h in wanted]
    return Calibration(calib.pixels[keep], [calib.hashes[i] for i in keep], calib.decoded)


def from_plan(refs: Sequence[FileRef], settings: DecodeSettings, count: int) -> Calibration:
    """The first `count` good, distinct images of a pass's plan."""
    return _decode_first(refs, settings, count)
