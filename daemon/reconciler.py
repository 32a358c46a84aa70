"""The reconciler: input-dir outages and reconcile scans, on its own thread.

Every tick it checks that each input dir is there and readable: one that vanished is an outage
(logged, metric; its images keep their state, never a mass deletion), one that came back is watched
again and rescanned. A scan queues (background lane) every file that `discover.decide` says needs
work and every file that is gone; unchanged files are not read. Scans run at start-up, every
`watch.rescan_interval`, and on request (an inotify overflow, an event the watcher could not queue,
a worker restart, a model switch); a request during a scan runs one more scan right after it.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable

from poolwatch.pipeline.config import Config
from poolwatch.pipeline.discover import InputDirError, discover, plan
from poolwatch.pipeline.store import open_store

from .component import ThreadComponent
from .ingest_queue import IngestQueue, Item
from .metrics import Metrics

log = logging.getLogger(__name__)

TICK_SECONDS = 0.5


def _dir_identity(root: str) -> tuple[int, int] | None:
    """(device, inode) of a readable input directory; None when it is missing or unreadable (an outage)."""
    try:
        st = os.stat(root)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or not os.access(root, os.R_OK | os.X_OK):
        return None
    return st.st_dev, st.st_ino


class Reconciler(ThreadComponent):
    name = "reconciler"

    def __init__(self, settings: Callable[[], Config], queue: IngestQueue, model_id: Callable[[], int],
                 metrics: Metrics, on_root_back: Callable[[str], object] = lambda root: None) -> None:
        super().__init__()
        self.settings, self.queue, self.model_id, self.metrics = settings, queue, model_id, metrics
        self.on_root_back = on_root_back
        self._requested = threading.Event()
        self._outages: set[str] = set()
        self._rewatch: set[str] = set()  # roots back from an outage that the watcher has not taken again yet
        self._root_ids: dict[str, tuple[int, int]] = {}  # (device, inode) of each root when last seen up
        self._lock = threading.Lock()
        self._next_check = 0.0
        self.scans = 0
        self.scanning = False

    def request(self) -> None:
        """Ask for a scan (thread-safe, cheap; callable from any thread, watchdog's included)."""
        self._requested.set()

    def is_outage(self, root: str) -> bool:
        with self._lock:
            return root in self._outages

    def start(self) -> None:
        self._requested.set()  # the start-up scan
        super().start()

    def request_stop(self) -> None:
        super().request_stop()
        self._requested.set()

    def run(self) -> None:
        next_scan = 0.0
        while not self.stopping.is_set():
            self._requested.wait(TICK_SECONDS)
            if self.stopping.is_set():
                return
            self.check_roots()
            interval = float(self.settings().watch.rescan_interval)
            due = interval > 0 and time.monotonic() >= next_scan
            if self._requested.is_set() or due:
                self._requested.clear()
                self.scan()
                next_scan = time.monotonic() + interval

    def check_roots(self) -> None:
        """Outages start and end here; also called between the items of a long scan, so a root that goes
        away (or comes back) during hours of re-embedding is noticed within a tick."""
        self._next_check = time.monotonic() + TICK_SECONDS
        roots = [str(p) for p in self.settings().input_paths]
        with self._lock:
            dropped = self._outages - set(roots)  # a reload removed them: their outage is over
            self._outages -= dropped
            self._rewatch &= set(roots)
        for root in dropped:
            self.metrics.outage_active.labels(root).set(0)
        for root in roots:
            ident = _dir_identity(root)
            before = self._root_ids.get(root)
            with self._lock:
                was_out = root in self._outages
                if ident is not None:
                    self._outages.discard(root)
                    self._root_ids[root] = ident
                else:
                    self._outages.add(root)
            if ident is None and not was_out:
                self.metrics.outages.labels(root).inc()
                self.metrics.outage_active.labels(root).set(1)
                log.error("input directory %s is missing or unreadable: outage (its images keep their state)", root)
            elif ident is not None and (was_out or (before is not None and before != ident)):
                # Back from an outage, or replaced by another directory faster than a tick (`mv in in.old;
                # mkdir in; mv in.old/* in/`): the old watch follows the old directory, the new one has none.
                self.metrics.outage_active.labels(root).set(0)
                log.info("input directory %s is back%s; watching it again and rescanning", root,
                         "" if was_out else " (another directory now)")
                self._rewatch.add(root)
                self._requested.set()
        for root in sorted(self._rewatch):
            try:
                if self.on_root_back(root) is not False:
                    self._rewatch.discard(root)
            except Exception:
                log.warning("could not watch %s again yet; retrying", root, exc_info=True)

    def scan(self) -> None:
        """Queue every file that needs work and every vanished file."""
        cfg = self.settings()
        start = time.monotonic()
        queued = gone_total = 0
        self.scanning = True
        try:
            with open_store(cfg) as store:
                for root in cfg.input_paths:
                    if self.stopping.is_set():
                        return
                    if self.is_outage(str(root)):
                        continue
                    try:
                        found = list(discover(root, cfg.watch.ignore_patterns))
                    except InputDirError as exc:
                        log.warning("reconcile skipped %s: %s", root, exc.strerror)
                        continue
                    todo, gone, back = plan(store, root, found, self.model_id())
                    todo += back  # the worker revives them (or reads them) with the same rule
                    items = [Item(r.root, r.relpath) for r in todo] + [Item(str(root), rel, "deleted") for rel in gone]
                    for item in items:
                        # Back-pressure: wait for room as long as it takes (a scan that gave up would lose
                        # what it found); only a stop ends the wait. Outages are still checked meanwhile.
                        while not self.queue.put(item, timeout=TICK_SECONDS, background=True):
                            if self.stopping.is_set():
                                return
                            self.check_roots()
                        if time.monotonic() >= self._next_check:
                            self.check_roots()
                    queued += len(todo)
                    gone_total += len(gone)
            self.metrics.discovered.inc(queued)
        except Exception:  # a failed scan is retried at the next interval or request
            log.exception("reconcile scan failed")
            return
        finally:
            self.scanning = False
        self.scans += 1
        log.info("reconcile scan: %d files queued, %d gone, in %.1fs", queued, gone_total, time.monotonic() - start)

    def health(self) -> str:
        if not self.alive():
            return "DEAD"
        with self._lock:
            out = sorted(self._outages)
        return f"outage: {', '.join(out)}" if out else ("scanning" if self.scanning else "idle")
