"""Near-duplicates on arrival: each new `ok` image's nearest stored neighbour under the current model.

`NearDuplicates` is the check of one model (and one choice of `normalize_embeddings`) in one process. Its
index (pipeline/vector_index.py, under `<shared_dir>/index/<model id>`) is a cache of the store's vectors:
opened, it is compared key by key (with each vector's fingerprint) against the store and repaired, or
rebuilt when it is missing or unreadable; folders of other models are removed. The caller looks a batch
up before the batch's transaction (`lookup`), so links land in the same transaction, and hands the
committed vectors back afterwards (`committed`). A link names the earliest-seen image of the group (ids
grow with first sight), so a copy of a copy points at the original.

The threshold is per model: a number from `near_duplicate.threshold`, or (`auto`) a calibration recorded
in the store once it holds `near_threshold.MIN_IMAGES` images of the model (`ensure_calibrated`): until
then lookups wait, and the images stored meanwhile are linked by `backfill` right after it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .check import inspect_image
from .decode import DecodeSettings, preprocess
from .near_threshold import MIN_IMAGES, SAMPLE_IMAGES, ThresholdCalibration, calibrate, copies_of
from .store import Store, vector_hash, vector_tag
from .vector_index import VectorIndex

if TYPE_CHECKING:
    from .config import Config
    from .engine import Engine

INDEX_DIR = "index"
NEIGHBOURS = 4  # looked up per image; the nearest of them that is still `ok` (and earlier, in a backfill) counts
SAVE_SECONDS = 300.0  # an index with unsaved additions is written at most this often (and when closed)
BACKFILL_CHUNK = 2048


@dataclass(frozen=True)
class Link:
    """A near copy's link: the group's earliest image (an image id, or "pos:<i>" for an image earlier in the
    same batch, whose id comes with its insert) and the distance to the neighbour that was found."""

    target: int | str
    distance: float


@dataclass
class Lookup:
    links: dict[int, Link] = field(default_factory=dict)  # batch position -> link
    novelty: dict[int, float] = field(default_factory=dict)  # batch position -> distance to the pool (see `novelty`)
    seconds: float = 0.0


def threshold_key(model_id: int, normalized: bool) -> str:
    return f"near_duplicate.threshold {model_id} {'normalized' if normalized else 'raw'}"


def recorded_calibration(store: Store, model_id: int, normalized: bool) -> ThresholdCalibration | None:
    value = store.setting(threshold_key(model_id, normalized))
    return ThresholdCalibration.from_dict(value) if value else None


def effective_threshold(config: Config, calibration: ThresholdCalibration | None) -> float | None:
    """The distance below which an image is a near copy; None: no check (off, or `auto` not calibrated yet)."""
    t = config.near_duplicate.threshold
    if t == "auto":
        return calibration.threshold if calibration is not None else None
    return None if t == -1 else float(t)


def normalized(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, as sampling does (pipeline/sampling.normalize); zero rows stay zero."""
    v = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    out: np.ndarray = np.divide(v, norms, out=np.zeros_like(v), where=norms > 0)
    return out


def for_config(store: Store, model_id: int, config: Config) -> NearDuplicates | None:
    """The check of this model as the configuration asks for it; None with `near_duplicate.threshold=-1` (and then
    no index is kept)."""
    if config.near_duplicate.threshold == -1:
        return None
    near = NearDuplicates.open(store, model_id, config.shared_path, config.normalize_embeddings)
    near.configure(config)
    return near


def index_folder(shared: Path, model_id: int) -> Path:
    return shared / INDEX_DIR / str(model_id)


class NearDuplicates:
    def __init__(self, model_id: int, weights_hash: str, dim: int, folder: Path, normalize: bool, index: VectorIndex,
                 calibration: ThresholdCalibration | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.model_id, self.weights_hash, self.dim, self.folder, self.normalize = model_id, weights_hash, dim, folder, normalize
        self.index, self.calibration, self.clock = index, calibration, clock
        self.repaired = 0  # vectors added, replaced or removed when the index was opened
        self.rebuilt = False
        self.backfilled = 0  # links made for earlier images when the threshold was calibrated
        self._calibrate_at = 0  # index size at which the next calibration is tried
        self.threshold: float | None = None  # set by `configure` from the configuration and the calibration
        self.auto = False
        self.pool: str | None = None
        self._unsaved = 0
        self._saved_at = clock()
        self._pool_key: tuple[Any, ...] | None = None
        self._pool: VectorIndex | None = None
        self.seq = 0  # the store's vector commits (of this model) the index holds up to
        self._recent: dict[int, int] = {}  # id -> tag of the vectors this process added since the last catch-up
        self.caught_up = 0  # vectors other processes (nodes) committed that the index took in since it opened

    # ---- opening: load, repair or rebuild ------------------------------------------------------
    @classmethod
    def open(cls, store: Store, model_id: int, shared: Path, normalize: bool,
             clock: Callable[[], float] = time.monotonic) -> NearDuplicates:
        model = store.model(model_id)
        if model is None:
            raise ValueError(f"no model with id {model_id}")
        folder = index_folder(shared, model_id)
        remove_other_indexes(shared, keep=model_id)
        loaded = VectorIndex.load(folder, model.dim)
        meta_ok = loaded is not None and loaded[1].get("normalized") == normalize \
            and loaded[1].get("weights_hash") == model.weights_hash
        index = loaded[0] if loaded is not None and meta_ok else VectorIndex(model.dim)
        calibration = recorded_calibration(store, model_id, normalize)
        near = cls(model_id, model.weights_hash, model.dim, folder, normalize, index, calibration, clock)
        near.rebuilt = not meta_ok
        near.seq = store.last_seq(model_id)  # before the repair reads the store: a commit in between is caught up on
        near.repaired = near.repair(store)
        if near.repaired or near.rebuilt:
            near.save()
        return near

    def repair(self, store: Store) -> int:
        """Make the index hold exactly the store's `ok` vectors of the model; returns the changes made."""
        want_ids, want_tags = store.embedding_tags(self.model_id)
        have_ids, have_tags = self.index.keys_and_tags()
        have = dict(zip(have_ids.tolist(), have_tags.tolist(), strict=True))
        want = dict(zip(want_ids.tolist(), want_tags.tolist(), strict=True))
        stale = [k for k in have if k not in want]
        todo = sorted(k for k, tag in want.items() if have.get(k) != tag)
        if stale:
            self.index.remove(np.asarray(stale, dtype=np.int64))
        for start in range(0, len(todo), 50_000):
            ids, vectors, tags = store.vectors_of(self.model_id, todo[start:start + 50_000])
            self.index.add(ids, self._prepare(vectors), tags)
        return len(stale) + len(todo)

    def catch_up(self, store: Store) -> int:
        """Take in the vectors other processes (other nodes of a shared store) committed since the last call: an
        incremental query by commit sequence. Returns how many were added."""
        ids, tags, self.seq = store.tags_since(self.model_id, self.seq)
        recent, self._recent = self._recent, {}
        missing = [int(i) for i, t in zip(ids.tolist(), tags.tolist(), strict=True) if recent.get(i) != t]
        if missing:
            found, vectors, found_tags = store.vectors_of(self.model_id, missing)
            self.index.add(found, self._prepare(vectors), found_tags)
            self._unsaved += len(found)
            self.caught_up += len(found)
        return len(missing)

    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        return normalized(v) if self.normalize else v

    # ---- the check of one batch ----------------------------------------------------------------
    def configure(self, config: Config) -> None:
        """Take the threshold and the pool from the current configuration (it may have been reloaded)."""
        self.auto = config.near_duplicate.threshold == "auto"
        self.threshold = effective_threshold(config, self.calibration)
        self.pool = config.datapool.name or None

    def lookup(self, store: Store, vectors: Mapping[int, np.ndarray], exclude: Mapping[int, int] | None = None) -> Lookup:
        """Links and novelty for a batch's new images (position -> vector, in batch order). `exclude` maps a
        position to the id its file already has (a changed file must not find its own older vector)."""
        start = time.perf_counter()
        out = Lookup()
        self.catch_up(store)
        positions = sorted(vectors)
        if not positions:
            return out
        queries = self._prepare(np.stack([vectors[p] for p in positions]))
        nearest_id, nearest_d, known = self._nearest_stored(store, queries, [(exclude or {}).get(p) for p in positions])
        roots = _roots(store, [int(i) for i in nearest_id if i >= 0], known)
        # Earlier images of the same batch: exact, a (batch x batch) block.
        inner = _pairwise(queries)
        for row, pos in enumerate(positions):
            target: int | str = roots.get(int(nearest_id[row]), int(nearest_id[row]))
            best_d = float(nearest_d[row])
            if row:
                j = int(np.argmin(inner[row, :row]))
                if inner[row, j] < best_d:
                    earlier = positions[j]
                    best_d = float(inner[row, j])
                    target = out.links[earlier].target if earlier in out.links else f"pos:{earlier}"
            if self.threshold is not None and np.isfinite(best_d) and best_d <= self.threshold and target != -1:
                out.links[pos] = Link(target, best_d)
            if np.isfinite(best_d):
                out.novelty[pos] = best_d
        if self.pool:
            pool_index = self._pool_index(store, self.pool)
            if pool_index is not None and len(pool_index):
                _keys, d = pool_index.search(queries, 1)
                out.novelty = {pos: float(d[row, 0]) for row, pos in enumerate(positions)}
        out.seconds = time.perf_counter() - start
        return out

    def _nearest_stored(self, store: Store, queries: np.ndarray,
                        own: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray, dict[int, tuple[str, int | None]]]:
        """Per query, the nearest indexed image that is still `ok` and not the query's own row: (ids, distances),
        and the (status, link) rows read for the neighbours considered."""
        ids = np.full(len(queries), -1, dtype=np.int64)
        dists = np.full(len(queries), np.inf, dtype=np.float32)
        if not len(self.index):
            return ids, dists, {}
        keys, d = self.index.search(queries, NEIGHBOURS)
        status = store.near_links(int(k) for k in np.unique(keys) if k >= 0)
        for row in range(len(queries)):
            for k, dist in zip(keys[row], d[row], strict=True):
                if k >= 0 and int(k) != own[row] and status.get(int(k), ("gone", None))[0] == "ok":
                    ids[row], dists[row] = k, dist
                    break
        return ids, dists, status

    def committed(self, ids: Sequence[int], vectors: Sequence[np.ndarray]) -> None:
        """The batch's new `ok` vectors are in the store now: add them to the index."""
        if not len(ids):
            return
        matrix = np.stack([np.asarray(v, dtype=np.float32) for v in vectors])
        tags = np.fromiter((vector_tag(vector_hash(v)) for v in matrix), dtype=np.int64, count=len(matrix))
        self.index.add(np.asarray(ids, dtype=np.int64), self._prepare(matrix), tags)
        self._unsaved += len(ids)
        self._recent.update(zip((int(i) for i in ids), tags.tolist(), strict=True))

    def _pool_index(self, store: Store, pool: str) -> VectorIndex | None:
        key = (pool, *store.pool_version(pool))
        if key != self._pool_key:
            members = store.pool_members(pool)
            ids, vectors, tags = store.vectors_of(self.model_id, members)
            self._pool = VectorIndex(self.dim)
            if len(ids):
                self._pool.add(ids, self._prepare(vectors), tags)
            self._pool_key = key
        return self._pool

    # ---- persistence ---------------------------------------------------------------------------
    def save(self) -> None:
        meta = {"model_id": self.model_id, "weights_hash": self.weights_hash, "normalized": self.normalize, "dim": self.dim}
        self.index.save(self.folder, meta)
        self._unsaved = 0
        self._saved_at = self.clock()

    def save_if_due(self) -> bool:
        if self._unsaved and self.clock() - self._saved_at >= SAVE_SECONDS:
            self.save()
            return True
        return False

    def close(self) -> None:
        if self._unsaved:
            self.save()

    # ---- the automatic threshold ---------------------------------------------------------------
    def ensure_calibrated(self, store: Store, engine: Engine, settings: DecodeSettings) -> ThresholdCalibration | None:
        """With `near_duplicate.threshold=auto` (see `configure`): calibrate once the store holds enough images of
        the model, record it, and link the images stored before. Returns the new calibration (None: nothing done).
        A calibration that finds too few usable images is tried again when MIN_IMAGES more are stored."""
        if not self.auto or self.calibration is not None:
            return None
        recorded = recorded_calibration(store, self.model_id, self.normalize)  # another process (node) may have done it
        if recorded is None:
            if len(self.index) < max(MIN_IMAGES, self._calibrate_at):
                return None
            mine = calibrate_from_store(store, engine, settings, self.normalize)
            if mine is None:
                self._calibrate_at = len(self.index) + MIN_IMAGES
                return None
            # One threshold for every node of a shared store: the first node's to record it.
            store.setting_once(threshold_key(self.model_id, self.normalize), mine.as_dict())
            recorded = recorded_calibration(store, self.model_id, self.normalize) or mine
        self.calibration = recorded
        self.threshold = recorded.threshold
        self.catch_up(store)  # another node's calibration: link against its images too
        self.backfilled = self.backfill(store, recorded.threshold)
        return recorded

    def backfill(self, store: Store, threshold: float) -> int:
        """Link every stored image without a link to the nearest earlier image within `threshold`; returns links made."""
        ids = np.sort(self.index.keys_and_tags()[0])
        group: dict[int, int] = {}
        made = 0
        for start in range(0, len(ids), BACKFILL_CHUNK):
            chunk = ids[start:start + BACKFILL_CHUNK]
            got, vectors, _tags = store.vectors_of(self.model_id, chunk.tolist())
            links = store.near_links(got.tolist())
            keys, d = self.index.search(self._prepare(vectors), NEIGHBOURS + 1)
            neighbours = {int(k) for k in np.unique(keys) if k >= 0}
            known = store.near_links(neighbours - set(links))
            known.update(links)
            found: list[tuple[int, int, float, int]] = []
            for row, image_id in enumerate(got.tolist()):
                status, linked = links.get(image_id, ("gone", None))
                if status != "ok" or linked is not None:
                    if linked is not None:
                        group[image_id] = int(linked)
                    continue
                for k, dist in zip(keys[row].tolist(), d[row].tolist(), strict=True):
                    if 0 <= k < image_id and dist <= threshold and known.get(k, ("gone", None))[0] == "ok":
                        of = known[k][1]
                        root = group.get(k, k if of is None else int(of))
                        group[image_id] = root
                        found.append((image_id, root, float(dist), self.model_id))
                        break
            if found:
                with store.transaction():
                    made += store.set_near_duplicates(found)
        return made


def _roots(store: Store, ids: Sequence[int], known: Mapping[int, tuple[str, int | None]]) -> dict[int, int]:
    """id -> the earliest image of its group (itself unless it is linked to an `ok` original); `known`: the
    (status, link) rows already read, so only the others are queried."""

    def links_of(some: Iterable[int]) -> dict[int, tuple[str, int | None]]:
        wanted = set(some)
        got = {i: known[i] for i in wanted & known.keys()}
        return got | store.near_links(wanted - got.keys()) if len(got) < len(wanted) else got

    links = links_of(ids)
    originals = links_of(int(of) for _s, of in links.values() if of is not None)
    return {i: (int(of) if of is not None and originals.get(int(of), ("gone", None))[0] == "ok" else i)
            for i, (_s, of) in links.items()}


def _pairwise(queries: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", queries, queries)
    d2 = sq[:, None] - 2.0 * (queries @ queries.T) + sq[None, :]
    out: np.ndarray = np.sqrt(np.maximum(d2, 0.0))
    return out


def remove_other_indexes(shared: Path, keep: int) -> list[str]:
    """Index folders of models other than `keep` (and temp folders left by a crash) are removed."""
    removed = []
    root = shared / INDEX_DIR
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if entry.name != str(keep) and not entry.name.startswith(f"{keep}."):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(entry.name)
    return removed


def calibrate_from_store(store: Store, engine: Engine, settings: DecodeSettings, normalize: bool) -> ThresholdCalibration | None:
    """Re-read a sample of the store's images (content-hash order), make copies, embed both: the threshold.
    Images the model fails on are left out (ingest.embed_resilient); None when fewer than MIN_IMAGES remain."""
    from .ingest import embed_resilient

    pixels: dict[int, np.ndarray] = {}
    samples: list[tuple[int, list[int]]] = []  # (key of the original, keys of its copies)
    for root, relpath, _hash in store.ok_images_by_hash(SAMPLE_IMAGES):
        try:
            data = Path(os.path.join(root, relpath)).read_bytes()
        except OSError:
            continue
        original = _model_input(data, relpath, settings)
        made = [p for p in (_model_input(c, "copy.jpg", settings) for c in copies_of(data, apply_exif=settings.apply_exif))
                if p is not None]
        if original is None or not made:
            continue
        keys = list(range(len(pixels), len(pixels) + 1 + len(made)))
        pixels.update(zip(keys, [original, *made], strict=True))
        samples.append((keys[0], keys[1:]))
    vectors, _failed = embed_resilient(engine, pixels)
    originals: list[np.ndarray] = []
    copies: list[np.ndarray] = []
    owner: list[int] = []
    for key, copy_keys in samples:
        embedded = [vectors[k] for k in copy_keys if k in vectors]
        if key in vectors and embedded:
            owner += [len(originals)] * len(embedded)
            originals.append(vectors[key])
            copies += embedded
    if len(originals) < MIN_IMAGES:
        return None
    o, c = np.asarray(originals, dtype=np.float32), np.asarray(copies, dtype=np.float32)
    if normalize:
        o, c = normalized(o), normalized(c)
    return calibrate(o, c, np.asarray(owner, dtype=np.int64))


def _model_input(data: bytes, name: str, settings: DecodeSettings) -> np.ndarray | None:
    verdict, image = inspect_image(data, name, max_pixels=settings.max_pixels,
                                   check_corruptness=settings.check_corruptness, apply_exif=settings.apply_exif,
                                   scale_to=None if settings.exact_decode else settings.input_size)
    return preprocess(image, settings.input_size) if verdict.ok and image is not None else None
