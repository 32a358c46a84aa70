"""The worker: the one consumer of the ingest queue and the one writer of image rows.

Batches up to `lightly.loader.batch_size` items but waits at most `watch.max_batch_wait` for a batch
to fill, so a trickle is embedded promptly and a burst fills whole batches. Decoding runs in the
decode pool; while the model embeds batch k, batch k+1 is already decoding (`ingest.start_decoding`).
Which files need work is `discover.decide`'s decision, the same rule `poolwatch ingest` uses.
Settings are read from the daemon's current snapshot at every batch; the model from the model manager.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from poolwatch.pipeline.config import Config
from poolwatch.pipeline.decode import FileRef
from poolwatch.pipeline.discover import decide
from poolwatch.pipeline.ingest import MAX_EMBED_ATTEMPTS, BatchResult, InFlight, commit_batch, start_decoding
from poolwatch.pipeline.near_duplicates import NearDuplicates
from poolwatch.pipeline.quality import flags_of
from poolwatch.pipeline.sources import source_of
from poolwatch.pipeline.store import Store, open_store

from .component import ThreadComponent
from .decode_pool import DecodeWorkers
from .ingest_queue import IngestQueue, Item
from .metrics import Metrics
from .models import ModelManager, ModelState
from .near_check import log_calibrated, open_near
from .runtime import decode_settings, release_free_memory

log = logging.getLogger(__name__)

STALL_SECONDS = 300.0  # busy this long without finishing a batch: /healthz says unhealthy
IDLE_CHECK = 5.0  # seconds between idle looks for a near-duplicate threshold another node calibrated


@dataclass
class _Batch:
    model: ModelState
    in_flight: InFlight

    @property
    def keys(self) -> set[tuple[str, str]]:
        return {(r.root, r.relpath) for r in self.in_flight.refs}


class Worker(ThreadComponent):
    name = "worker"

    def __init__(self, settings: Callable[[], Config], queue: IngestQueue, models: ModelManager,
                 decoders: DecodeWorkers | None, metrics: Metrics,
                 is_outage: Callable[[str], bool] = lambda root: False) -> None:
        super().__init__()
        self.settings, self.queue, self.models = settings, queue, models
        self.decoders, self.metrics, self.is_outage = decoders, metrics, is_outage
        self.last_progress = time.monotonic()
        self.busy = False
        self.batches = 0
        self.near: NearDuplicates | None = None
        self._near_key: tuple[int, bool, bool] | None = None  # (model, normalised, on) the check was opened for
        self._idle_checked = 0.0

    def stalled(self) -> bool:
        return self.busy and time.monotonic() - self.last_progress > STALL_SECONDS

    def health(self) -> str:
        if not self.alive():
            return "DEAD"
        return "STALLED" if self.stalled() else ("busy" if self.busy else "idle")

    def run(self) -> None:
        cfg = self.settings()
        store = open_store(cfg)
        pending: _Batch | None = None
        try:
            while not self.stopping.is_set():
                cfg = self.settings()
                items = self.queue.get_batch(cfg.batch_size, 0.0 if pending else float(cfg.watch.max_batch_wait),
                                             0.0 if pending else 0.5)
                self.metrics.queue_depth.set(len(self.queue))
                was_busy, self.busy = self.busy, bool(items or pending)
                if was_busy and not self.busy:
                    release_free_memory()  # a burst is over: its batches' buffers go back to the OS
                if pending is not None and any((i.root, i.relpath) in pending.keys for i in items):
                    # A file of the batch in flight came again (changed, deleted, or the same event twice):
                    # commit that batch first, so the file is compared with its row, not checked twice,
                    # and a deletion is not overwritten by the older batch.
                    self._finish(store, pending, cfg)
                    pending = None
                model = self.models.current()
                if not items and pending is None:
                    self._idle(store, model, cfg)
                refs = self._prepare(store, items, model.model_id) if items else []
                following = None
                if refs:
                    executor = self.decoders.executor if self.decoders is not None else None
                    following = _Batch(model, start_decoding(refs, decode_settings(cfg, model.embedder), executor))
                if pending is not None:
                    self._finish(store, pending, cfg)
                pending = following
                self.last_progress = time.monotonic()
            if pending is not None:
                self._finish(store, pending, self.settings())
        finally:
            if self.near is not None:
                self.near.close()
                self.near = None
                self._near_key = None
            store.close()

    def _prepare(self, store: Store, items: list[Item], model_id: int) -> list[FileRef]:
        """Deletions and revivals are applied at once; files that need no work (`decide`) are skipped."""
        refs: list[FileRef] = []
        gone: dict[str, list[str]] = {}
        back: dict[str, list[FileRef]] = {}
        for item in items:
            path = os.path.join(item.root, item.relpath)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if not self.is_outage(item.root) and os.path.isdir(item.root):
                    gone.setdefault(item.root, []).append(item.relpath)
                continue
            except OSError:
                refs.append(FileRef(item.root, item.relpath, -1, -1))  # unreadable: its verdict says why
                continue
            ref = FileRef(item.root, item.relpath, st.st_size, st.st_mtime_ns)
            decision = decide(store.known_file(item.root, item.relpath, model_id), st.st_size, st.st_mtime_ns)
            if decision == "work":
                refs.append(ref)
            elif decision == "revive":
                back.setdefault(item.root, []).append(ref)
        if gone or back:
            with store.transaction():
                for root, rels in gone.items():
                    self.metrics.missing.inc(store.mark_missing(root, rels))
                for root, found in back.items():
                    revived = set(store.revive(root, [r.relpath for r in found], model_id))
                    refs += [r for r in found if r.relpath not in revived]
        return refs

    def _near_check(self, store: Store, model: ModelState, cfg: Config) -> NearDuplicates | None:
        """The near-duplicate check of the batch's model, (re)opened when the model or the configuration changed it."""
        key = (model.model_id, cfg.normalize_embeddings, cfg.near_duplicate.threshold != -1)
        if key != self._near_key:
            if self.near is not None:
                self.near.close()
            self.near, self._near_key = open_near(store, model.model_id, cfg), key
        if self.near is not None:
            self.near.configure(cfg)
        return self.near

    def _idle(self, store: Store, model: ModelState, cfg: Config) -> None:
        """While there is nothing to ingest: a threshold another node of a shared store calibrated is taken up
        (and the images stored so far linked by it) without waiting for this node's next file."""
        near = self.near
        if near is None or not near.auto or near.calibration is not None or near.model_id != model.model_id:
            return
        now = time.monotonic()
        if now - self._idle_checked < IDLE_CHECK:
            return
        self._idle_checked = now
        self._calibrated(store, model, cfg, near)

    def _calibrated(self, store: Store, model: ModelState, cfg: Config, near: NearDuplicates) -> None:
        calibration = near.ensure_calibrated(store, model.embedder, decode_settings(cfg, model.embedder))
        if calibration is not None:
            log_calibrated(model.model_id, calibration, near.backfilled)
            self.metrics.near_duplicate_threshold.set(calibration.threshold)

    def _finish(self, store: Store, batch: _Batch, cfg: Config) -> None:
        start = time.perf_counter()
        decoded = batch.in_flight.collect()
        near = self._near_check(store, batch.model, cfg)
        result = commit_batch(store, batch.model.embedder, batch.model.model_id, decoded, cfg.remove_exact_duplicates,
                              near=near)
        seconds = time.perf_counter() - start
        self.batches += 1
        self._count(result, cfg, near, len(decoded), seconds)
        if near is not None:
            # This batch may be the one that makes the store large enough to calibrate the threshold on.
            self._calibrated(store, batch.model, cfg, near)
            near.save_if_due()
        if result.embed_failures:
            log.warning("the model failed on %d image(s) of a batch; they are retried (at most %d attempts)",
                        len(result.embed_failures), MAX_EMBED_ATTEMPTS)
        log.debug("batch of %d: %d ok (%d near duplicates), %d corrupt, %d duplicate in %.3fs (compute %.3fs)",
                  len(decoded), result.ok, result.near_duplicate, result.corrupt, result.duplicate, seconds,
                  result.compute_seconds)

    def _count(self, result: BatchResult, cfg: Config, near: NearDuplicates | None, files: int, seconds: float) -> None:
        m = self.metrics
        m.observe_batch(files, seconds, result.compute_seconds)
        m.ingested.labels("ok").inc(result.ok)
        m.ingested.labels("corrupt").inc(result.corrupt)
        m.ingested.labels("duplicate").inc(result.duplicate)
        m.duplicate.inc(result.duplicate)
        m.missing.inc(result.vanished)
        for reason, n in result.corrupt_reasons.items():
            m.corrupt.labels(reason).inc(n)
        thresholds = cfg.quality.flag.model_dump()
        for o in result.outcomes:
            flags = flags_of(o.quality, thresholds) if o.quality is not None and o.verdict != "corrupt" else []
            m.record_source(source_of(o.root, o.relpath, cfg.source.depth), o.verdict, flags, o.novelty)
        if near is not None:
            m.near_duplicate_threshold.set(-1 if near.threshold is None else near.threshold)
            m.near_index_vectors.set(len(near.index))
            m.near_lookup_seconds.observe(result.near_seconds)
        else:
            m.near_duplicate_threshold.set(-1)
