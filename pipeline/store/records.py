"""What the store hands out and takes in: rows as small frozen records, and the vector fingerprints."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PoolwatchError

STATUSES = ("pending", "ok", "corrupt", "duplicate", "missing")
QUALITY_COLUMNS = ("sharpness", "brightness", "contrast", "entropy", "colorfulness", "aspect")


class StoreError(PoolwatchError, RuntimeError):
    """The store cannot be opened or used (not a poolwatch database, newer schema, server gone, ...)."""


@dataclass(frozen=True)
class KnownFile:
    """What the rule that decides whether a file needs work (`discover.decide`) knows of its row."""

    id: int
    size: int
    mtime_ns: int
    status: str
    has_vector: bool = False  # of the model asked about (False when none was)


@dataclass(frozen=True)
class ImageRecord:
    """One image's row as the ingest pipeline writes it (the node is the store handle's own)."""

    root: str
    relpath: str
    size: int
    mtime_ns: int
    hash: str | None
    status: str
    reason: str | None = None
    detail: str | None = None
    duplicate_of: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    attempts: int = 0  # failed embedding attempts of a `pending` image
    quality: Mapping[str, float] | None = None  # QUALITY_COLUMNS -> value (pipeline/quality.Quality.as_dict)
    near_duplicate_of: int | None = None  # an `ok` image that is a near copy of this earlier-seen one
    near_distance: float | None = None
    near_model_id: int | None = None


@dataclass(frozen=True)
class ModelRecord:
    id: int
    weights_hash: str
    input_size: int
    source: str
    detail: str | None
    arch: dict[str, Any]
    dim: int
    path: str | None
    is_current: bool


@dataclass(frozen=True)
class CandidateFilter:
    """What keeps an embedded `ok` image out of a sampling run's candidates besides the pool rule."""

    near_duplicates: bool = False  # near copies of an earlier image that is still `ok`
    # quality flags: (column, "<" or ">", threshold) - pipeline/quality.FLAGS with the configured thresholds
    quality: tuple[tuple[str, str, float], ...] = ()


@dataclass(frozen=True)
class Location:
    """Where an image is: the node that holds it, its input root there and its path under that root."""

    node: str
    root: str
    relpath: str


def quality_condition(column: str, op: str, alias: str = "i") -> str:
    """SQL that is 1 when an image's signal crosses its flag's threshold (one `?`), else 0 (also when unmeasured)."""
    if column not in QUALITY_COLUMNS or op not in ("<", ">"):
        raise ValueError(f"not a quality rule: {column} {op}")
    return f"(CASE WHEN {alias}.{column} {op} ? THEN 1 ELSE 0 END)"


def vector_hash(vector: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(vector, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


def vector_tag(vhash: str) -> int:
    """A vector's hash as a signed 64-bit fingerprint (the near-duplicate index keeps one per vector)."""
    return int(vhash[:16], 16) - 2**63
