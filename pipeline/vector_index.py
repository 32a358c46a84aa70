"""Nearest stored neighbour of new vectors (near-duplicate lookups), exact or approximate.

A `VectorIndex` keeps every (key, vector, tag) in a float32 matrix that grows by doubling (removal: swap with
the last row) and answers exactly by brute force (||q||² - 2 q·x + ||x||², BLAS in blocks) while it holds fewer
than `exact_below` vectors. From `exact_below` on it also keeps a usearch HNSW graph over the same keys and
answers from it; it drops the graph again below `exact_below // 2` (the gap keeps a store that hovers around the
threshold from building the graph over and over). Either way the distances returned are recomputed from the
matrix, so they are exact for the neighbours found. bench/near_duplicates.py measured the crossover, the
library (usearch vs faiss HNSW vs hnswlib) and the parameters: docs/BENCHMARKS.md, *Near-duplicate lookups*.

`save` writes a folder (meta.json, keys/tags/vectors .npy and the graph) that `load` verifies (format, dim,
sizes, sha256 of each file, key set) before it trusts it; anything else is None and the caller rebuilds from
its store, which is the truth (the index is a cache).
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from .modelspec import file_sha256

if TYPE_CHECKING:
    from usearch.index import BatchMatches, Index

# measured (bench/near_duplicates.py): at d=32 brute force per batch of 64 / 512 is as fast as the graph up to ~255k /
# ~222k vectors (AMD Zen 4) and ~701k / > 1M (Intel Sapphire Rapids). At d=384 the graph was no faster than brute
# force up to 1M (504 vs 542 ms per 64, 3.5 vs 2.9 s per 512), with twice the memory, a 25-minute build and recall@1
# 0.54 on random vectors, so wide vectors stay exact up to EXACT_BELOW_WIDE.
EXACT_BELOW = 200_000
WIDE = 64  # dims above this are "wide"
EXACT_BELOW_WIDE = 1_000_000
FORMAT = 1
CONNECTIVITY = 16  # HNSW M
EXPANSION_ADD = 128  # ef_construction
EXPANSION_SEARCH = 512  # ef at search time (the saved graph does not depend on it)
_BLOCK = 1 << 22  # elements of one query × stored distance block (16 MB of float32)
_FILES = ("keys.npy", "tags.npy", "vectors.npy")


def exact_below_for(dim: int) -> int:
    """Stored vectors below which brute force answers (the graph is built from there on)."""
    return EXACT_BELOW if dim <= WIDE else EXACT_BELOW_WIDE


class VectorIndex:
    """Nearest neighbours by L2 distance over (key -> vector) with a per-key tag; exact (numpy) below
    `exact_below` vectors, the chosen ANN library above it (switches by itself as it grows or shrinks)."""

    def __init__(self, dim: int, *, exact_below: int | None = None) -> None:
        self.dim = int(dim)
        self.exact_below = exact_below_for(self.dim) if exact_below is None else int(exact_below)
        self._n = 0
        self._vecs = np.zeros((16, self.dim), np.float32)
        self._norms = np.zeros(16, np.float32)  # ||x||², slot-aligned like _keys and _tags
        self._keys = np.zeros(16, np.int64)
        self._tags = np.zeros(16, np.int64)
        self._slot: dict[int, int] = {}
        self._ann: Index | None = None

    def __len__(self) -> int:
        return self._n

    @property
    def exact(self) -> bool:
        return self._ann is None

    def add(self, keys: np.ndarray, vectors: np.ndarray, tags: np.ndarray) -> None:
        """keys int64 (N,), vectors float32 (N, dim), tags int64 (N,) (a fingerprint of each vector, e.g. a hash prefix).
        A key already present is replaced (its vector and tag)."""
        keys, vectors, tags = self._checked(keys, vectors, tags)
        last = len(keys) - 1 - np.unique(keys[::-1], return_index=True)[1]  # a key given twice: its last row wins
        keys, vectors, tags = keys[last], vectors[last], tags[last]
        slots = np.fromiter((self._slot.get(k, -1) for k in keys.tolist()), np.int64, len(keys))
        new = slots < 0
        if self._ann is not None and not new.all():
            self._ann.remove(keys[~new])
        count = int(new.sum())
        self._reserve(self._n + count)
        slots[new] = np.arange(self._n, self._n + count)
        self._slot.update(zip(keys[new].tolist(), slots[new].tolist(), strict=True))
        self._n += count
        self._vecs[slots], self._keys[slots], self._tags[slots] = vectors, keys, tags
        self._norms[slots] = np.einsum("ij,ij->i", vectors, vectors)
        if self._ann is not None:
            self._ann.add(keys, vectors)
        self._switch()

    def remove(self, keys: np.ndarray) -> None:
        """Unknown keys are ignored."""
        gone = list(dict.fromkeys(k for k in np.asarray(keys, np.int64).reshape(-1).tolist() if k in self._slot))
        for key in gone:
            slot, last = self._slot.pop(key), self._n - 1
            if slot != last:
                for a in (self._vecs, self._norms, self._keys, self._tags):
                    a[slot] = a[last]
                self._slot[int(self._keys[slot])] = slot
            self._n = last
        if self._ann is not None and gone:
            self._ann.remove(np.array(gone, np.int64))
        if self._n < len(self._keys) // 4:
            self._resize(max(16, len(self._keys) // 2))
        self._switch()

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(keys (M, k) int64, distances (M, k) float32 — L2, NOT squared), nearest first; missing slots are key -1,
        distance inf."""
        q = np.ascontiguousarray(np.atleast_2d(queries), np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim or k < 1:
            raise ValueError(f"queries must be (M, {self.dim}) and k >= 1, not {q.shape} and {k}")
        m, kk = len(q), min(k, self._n)
        slots = np.full((m, k), -1, np.int64)
        if kk and m:
            slots[:, :kk] = self._exact_slots(q, kk) if self._ann is None else self._ann_slots(q, kk)
        found = slots >= 0
        s = np.where(found, slots, 0)
        diff = self._vecs[s] - q[:, None, :]  # exact distances of what was found, from the matrix
        dist = np.where(found, np.sqrt(np.einsum("mkd,mkd->mk", diff, diff)), np.float32(np.inf)).astype(np.float32)
        order = np.argsort(dist, axis=1, kind="stable")
        dist, s, found = (np.take_along_axis(a, order, axis=1) for a in (dist, s, found))
        return np.where(found, self._keys[s], -1), dist

    def keys_and_tags(self) -> tuple[np.ndarray, np.ndarray]:
        """Every key and its tag."""
        return self._keys[: self._n].copy(), self._tags[: self._n].copy()

    def save(self, folder: Path, meta: Mapping[str, Any]) -> None:
        """Write atomically: a temp folder next to `folder`, fsync'd, then renamed over it (a crash leaves the old or the
        new, never half)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stray in folder.parent.glob(f".{glob.escape(folder.name)}.*-*"):  # left by a save that was killed
            _delete(stray)
        tmp = folder.with_name(f".{folder.name}.tmp-{secrets.token_hex(4)}")
        tmp.mkdir()
        try:
            n = self._n
            arrays: tuple[np.ndarray, ...] = (self._keys[:n], self._tags[:n], self._vecs[:n])
            for name, a in zip(_FILES, arrays, strict=True):
                np.save(tmp / name, a)
            files = list(_FILES)
            if self._ann is not None:
                self._ann.save(str(tmp / "graph.usearch"))
                files.append("graph.usearch")
            digests = {f: file_sha256(tmp / f) for f in files}
            info = {"format": FORMAT, "dim": self.dim, "count": n, "files": digests, "meta": dict(meta),
                    "ann": None if self._ann is None else {"library": "usearch", "connectivity": CONNECTIVITY,
                                                           "expansion_add": EXPANSION_ADD}}
            (tmp / "meta.json").write_text(json.dumps(info, indent=1))
            for f in [*files, "meta.json"]:
                _fsync(tmp / f)
            _fsync(tmp)
            if folder.exists():  # rename(2) cannot replace a non-empty folder: move the old one aside first
                old = folder.with_name(f".{folder.name}.old-{secrets.token_hex(4)}")
                os.rename(folder, old)
                os.rename(tmp, folder)
                _delete(old)
            else:
                os.rename(tmp, folder)
            _fsync(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, folder: Path, dim: int, *, exact_below: int | None = None) -> tuple[VectorIndex, dict[str, Any]] | None:
        """The saved index and its meta; None when the folder is missing, unreadable, of another format version or dim,
        or inconsistent (the caller rebuilds from the store)."""
        folder = Path(folder)
        try:
            info = json.loads((folder / "meta.json").read_text())
            if info["format"] != FORMAT or info["dim"] != dim:
                return None
            files, n = info["files"], int(info["count"])
            if any(file_sha256(folder / f) != digest for f, digest in files.items()) or not set(_FILES) <= set(files):
                return None
            keys, tags, vecs = (np.load(folder / f, allow_pickle=False) for f in _FILES)
            if (keys.shape, tags.shape, vecs.shape) != ((n,), (n,), (n, dim)) or len(np.unique(keys)) != n:
                return None
            self = cls(dim, exact_below=exact_below)
            self._reserve(n)
            self._n = n
            self._keys[:n], self._tags[:n], self._vecs[:n] = keys, tags, vecs
            self._norms[:n] = np.einsum("ij,ij->i", vecs, vecs)
            self._slot = dict(zip(keys.tolist(), range(n), strict=True))
            if "graph.usearch" in files:
                ann = _usearch().restore(str(folder / "graph.usearch"), expansion_search=EXPANSION_SEARCH)
                if ann is None or ann.ndim != dim or len(ann) != n or (n and not np.all(ann.contains(keys))):
                    return None
                self._ann = ann
            self._switch()
            return self, dict(info["meta"])
        except Exception:  # noqa: BLE001 - whatever cannot be read is rebuilt from the store
            return None

    # ---- internals ----------------------------------------------------------------------------------------

    def _checked(self, keys: np.ndarray, vectors: np.ndarray, tags: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = np.asarray(keys, np.int64).reshape(-1)
        tags = np.asarray(tags, np.int64).reshape(-1)
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.shape != (len(keys), self.dim) or tags.shape != keys.shape:
            raise ValueError(f"{len(keys)} keys need vectors ({len(keys)}, {self.dim}) and {len(keys)} tags, "
                             f"not {vectors.shape} and {tags.shape}")
        if len(keys) and keys.min() < 0:
            raise ValueError("keys must be >= 0 (-1 means 'none' in search results)")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors must be finite")
        return keys, vectors, tags

    def _reserve(self, n: int) -> None:
        if n > len(self._keys):
            self._resize(max(n, 2 * len(self._keys)))

    def _resize(self, cap: int) -> None:
        n = self._n
        for name in ("_vecs", "_norms", "_keys", "_tags"):
            old = getattr(self, name)
            new = np.zeros((cap, *old.shape[1:]), old.dtype)
            new[:n] = old[:n]
            setattr(self, name, new)

    def _switch(self) -> None:
        """Build the graph when the index reaches exact_below, drop it below exact_below // 2."""
        if self._ann is None and self._n >= self.exact_below:
            self._ann = _usearch()(ndim=self.dim, metric="l2sq", dtype="f32", connectivity=CONNECTIVITY,
                                   expansion_add=EXPANSION_ADD, expansion_search=EXPANSION_SEARCH)
            self._ann.add(self._keys[: self._n], self._vecs[: self._n])
        elif self._ann is not None and self._n < self.exact_below // 2:
            self._ann = None

    def _exact_slots(self, q: np.ndarray, k: int) -> np.ndarray:
        """The k nearest slots of each query by brute force, in blocks of stored vectors."""
        qn = np.einsum("ij,ij->i", q, q)[:, None]
        block = max(1024, _BLOCK // len(q))
        best_d = np.full((len(q), 0), np.inf, np.float32)
        best_s = np.zeros((len(q), 0), np.int64)
        for start in range(0, self._n, block):
            stop = min(self._n, start + block)
            d = q @ self._vecs[start:stop].T
            d *= -2
            d += qn
            d += self._norms[None, start:stop]
            if k == 1:
                part = d.argmin(axis=1)[:, None]
            elif stop - start > k:
                part = np.argpartition(d, k - 1, axis=1)[:, :k]
            else:
                part = np.broadcast_to(np.arange(stop - start), d.shape)
            d = np.take_along_axis(d, part, axis=1)
            best_d = np.concatenate([best_d, d], axis=1)
            best_s = np.concatenate([best_s, part + start], axis=1)
            if best_d.shape[1] > k:
                keep = np.argpartition(best_d, k - 1, axis=1)[:, :k]
                best_d, best_s = np.take_along_axis(best_d, keep, axis=1), np.take_along_axis(best_s, keep, axis=1)
        return best_s

    def _ann_slots(self, q: np.ndarray, k: int) -> np.ndarray:
        assert self._ann is not None
        found = self._ann.search(q, k)
        if len(q) == 1:  # one query: a Matches of the neighbours found, not a padded BatchMatches
            rows, counts = [np.asarray(found.keys).tolist()], [len(found.keys)]
        else:
            batch = cast("BatchMatches", found)
            rows, counts = np.asarray(batch.keys).tolist(), np.asarray(batch.counts).tolist()
        out = np.full((len(q), k), -1, np.int64)
        for i, (row, count) in enumerate(zip(rows, counts, strict=True)):
            out[i, :count] = [self._slot.get(key, -1) for key in row[:count]]
        return out


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _usearch() -> type[Index]:
    """usearch's Index, imported only when a graph is needed. Loaded into a process before OpenVINO, usearch's
    extension breaks OpenVINO's model compilation ("Exception from src/inference/src/cpp/core.cpp:" with no
    message); loaded after it, both work. The daemon and `poolwatch ingest` load their engine first."""
    from usearch.index import Index

    return Index
