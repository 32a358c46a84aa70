"""The worker: the one consumer of the ingest queue and the one writer of image rows.

Batches up to `lightly.loader.batch_size` items but waits at most `watch.max_batch_wait` for a batch
to fill, so a trickle is embedded promptly and a burst fills whole batches. Decoding runs in a
process pool; while the model embeds batch k, batch k+1 is already decoding.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Executor, Future
from pathlib import Path

from poolwatch.pipeline.decode import Decoded, DecodeSettings, FileRef, collect, read_and_decode
from poolwatch.pipeline.embed import Embedder
from poolwatch.pipeline.ingest import commit_batch
from poolwatch.pipeline.store import Store

from .ingest_queue import IngestQueue, Item
from .metrics import Metrics
from .runtime import release_free_memory

log = logging.getLogger(__name__)


class Worker(threading.Thread):
    def __init__(self, *, store_path: Path, busy_timeout: float, embedder: Embedder, model_id: int,
                 queue: IngestQueue, settings: DecodeSettings, batch_size: int, max_batch_wait: float,
                 remove_duplicates: bool, executor: Executor | None, metrics: Metrics,
                 is_outage: callable = lambda root: False) -> None:
        super().__init__(name="ingest-worker", daemon=True)
        self.store_path, self.busy_timeout = store_path, busy_timeout
        self.embedder, self.model_id = embedder, model_id
        self.queue, self.settings = queue, settings
        self.batch_size, self.max_batch_wait = batch_size, max_batch_wait
        self.remove_duplicates = remove_duplicates
        self.executor = executor
        self.metrics = metrics
        self.is_outage = is_outage
        self._stop_event = threading.Event()
        self._model_lock = threading.Lock()
        self.last_progress = time.monotonic()
        self.busy = False
        self.batches = 0
        self.error: BaseException | None = None

    def stop(self) -> None:
        """Finish the batch in hand, then stop."""
        self._stop_event.set()

    def set_model(self, embedder: Embedder, model_id: int, settings: DecodeSettings) -> None:
        """Use another model from the next batch on (a batch already decoding keeps the one it began with)."""
        with self._model_lock:
            self.embedder, self.model_id, self.settings = embedder, model_id, settings

    def _model(self) -> tuple[Embedder, int, DecodeSettings]:
        with self._model_lock:
            return self.embedder, self.model_id, self.settings

    def run(self) -> None:
        store = Store.open(self.store_path, self.busy_timeout)
        pending: tuple | None = None  # (model snapshot, refs, decoding, {(root, relpath)})
        try:
            while not self._stop_event.is_set():
                items = self.queue.get_batch(self.batch_size, 0.0 if pending else self.max_batch_wait,
                                             0.0 if pending else 0.5)
                self.metrics.queue_depth.set(len(self.queue))
                was_busy, self.busy = self.busy, bool(items or pending)
                if was_busy and not self.busy:
                    release_free_memory()  # a burst is over: its batches' buffers go back to the OS
                if pending is not None and any((i.root, i.relpath) in pending[3] for i in items):
                    # A file of the batch still in flight came again (changed, deleted, or the same event
                    # twice): commit that batch first, so it is compared with its row, not checked twice,
                    # and a deletion is not overwritten by the older batch.
                    self._finish(store, *pending[:3])
                    pending = None
                model = self._model()
                refs = self._prepare(store, items, model[1]) if items else []
                nxt = (model, refs, self._submit(refs, model[2]), {(r.root, r.relpath) for r in refs}) if refs else None
                if pending is not None:
                    self._finish(store, *pending[:3])
                pending = nxt
                self.last_progress = time.monotonic()
            if pending is not None:
                self._finish(store, *pending[:3])
        except BaseException as exc:
            self.error = exc
            log.exception("ingest worker failed")
            raise
        finally:
            store.close()

    def _prepare(self, store: Store, items: list[Item], model_id: int) -> list[FileRef]:
        """Deletions are applied at once; files whose identity is unchanged are skipped."""
        refs: list[FileRef] = []
        gone: dict[str, list[str]] = {}
        for item in items:
            path = os.path.join(item.root, item.relpath)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                if not self.is_outage(item.root) and os.path.isdir(item.root):
                    gone.setdefault(item.root, []).append(item.relpath)
                continue
            except OSError:
                st = None
            if item.kind == "deleted" and st is not None:
                pass  # deleted and re-created before we got here: treat as a file
            if st is None:
                refs.append(FileRef(item.root, item.relpath, -1, -1))
                continue
            row = store.image_by_path(item.root, item.relpath)
            if row and row["size"] == st.st_size and row["mtime_ns"] == st.st_mtime_ns and row["status"] != "missing" \
                    and (row["status"] != "ok" or store.has_vector(int(row["id"]), model_id)):
                continue
            refs.append(FileRef(item.root, item.relpath, st.st_size, st.st_mtime_ns))
        if gone:
            with store.transaction():
                for root, rels in gone.items():
                    n = store.mark_missing(root, rels)
                    self.metrics.missing.inc(n)
        return refs

    def _submit(self, refs: list[FileRef], settings: DecodeSettings) -> list[Future[Decoded]] | list[Decoded]:
        if self.executor is None:
            return [read_and_decode(r, settings) for r in refs]
        return [self.executor.submit(read_and_decode, r, settings) for r in refs]

    def _finish(self, store: Store, model: tuple[Embedder, int, DecodeSettings], refs: list[FileRef],
                decoding: list) -> None:
        embedder, model_id, _ = model
        start = time.perf_counter()
        decoded = [collect(d, r) if isinstance(d, Future) else d for d, r in zip(decoding, refs)]
        result = commit_batch(store, embedder, model_id, decoded, self.remove_duplicates)
        seconds = time.perf_counter() - start
        self.batches += 1
        self.metrics.observe_batch(len(decoded), seconds, result.compute_seconds)
        m = self.metrics
        m.ingested.labels("ok").inc(result.ok)
        m.ingested.labels("corrupt").inc(result.corrupt)
        m.ingested.labels("duplicate").inc(result.duplicate)
        m.duplicate.inc(result.duplicate)
        m.missing.inc(result.vanished)
        for reason, n in result.corrupt_reasons.items():
            m.corrupt.labels(reason).inc(n)
        log.debug("batch of %d: %d ok, %d corrupt, %d duplicate in %.3fs (compute %.3fs)", len(decoded), result.ok,
                  result.corrupt, result.duplicate, seconds, result.compute_seconds)
