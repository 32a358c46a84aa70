"""Filesystem watching: watchdog observers → complete files into the ingest queue.

With inotify a file is complete when it is closed after writing (IN_CLOSE_WRITE) or renamed into the
tree (the `cp tmp && mv` pattern, from inside the tree or from outside it); creation and modification
events are ignored because a close follows. Where no close events exist (`watch.polling=true`, or the
automatic fallback when inotify watches run out), a file is complete once its size and mtime have not
changed for `watch.settle_seconds` (the `Settler`). A folder created in the tree gets its inotify watch
only after it appears, so files written into it at once (`mkdir d && cp x d/`, `cp -r`) may have been
closed before anyone watched: the files found in a new folder go to the Settler too, and their close
event, when one comes, hands them on sooner. A folder moved into the tree brings complete files: they
are queued at once. Deletions become `deleted` items; the worker confirms the file is really gone
before marking it missing.

Nothing here blocks watchdog's dispatch thread for long: that thread holds the observer's lock, which
`rewatch()` (called from the daemon's reconciler thread) needs too. A put into a full ingest queue waits at
most `PUT_TIMEOUT`, and while the queue stays full, not at all; a walk of a new or moved folder stops
after `WALK_BUDGET`. What could not be queued is left to a reconcile scan (`on_lost`), with one
WARNING per full-queue spell, not one per file. `max_dispatch_seconds` records the longest event.

When the kernel's inotify queue overflows (more events than fs.inotify.max_queued_events before the
observer reads them), events are lost: watchdog rebuilds its watches, and `on_overflow` tells the
daemon, which runs a reconcile scan to find what the lost events would have said. watchdog has no
public way to learn of an overflow; `OverflowReportingInotifyFD` below is the one adapter that leans
on its internals, proven on WATCHDOG_VERIFIED (see tests/test_watcher.py).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import DEFAULT_OBSERVER_TIMEOUT, BaseObserver
from watchdog.observers.polling import PollingObserver
from watchdog.utils import UnsupportedLibcError

try:  # Linux
    from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver
    from watchdog.observers.inotify_c import InotifyEvent, InotifyFD
except (ImportError, OSError, UnsupportedLibcError):  # pragma: no cover - no inotify queue to overflow elsewhere
    InotifyFullEmitter = InotifyObserver = InotifyEvent = InotifyFD = None  # type: ignore[assignment,misc]

from poolwatch.pipeline.discover import InputDirError, discover, is_ignored, is_image_name

from .ingest_queue import IngestQueue, Item

log = logging.getLogger(__name__)

PUT_TIMEOUT = 0.02  # the longest one put into a full queue may wait (an event makes at most two puts)
WALK_BUDGET = 0.05  # the longest a walk of a new or moved folder may take inside the dispatch thread
LOST_WARNING_EVERY = 30.0  # seconds between "queue full" warnings, however many spells
READER_JOIN_TIMEOUT = 5.0  # how long stopping waits for the inotify reader thread

# The watchdog versions the overflow adapter is proven on; pyproject.toml pins the same range and
# tests/test_watcher.py fails, naming what changed, when the installed watchdog leaves it.
WATCHDOG_VERIFIED = ">=7.1,<7.2"


# ---- the overflow adapter: the only code here that depends on watchdog internals ---------------
if InotifyFD is not None:

    class OverflowReportingInotifyFD(InotifyFD):
        """watchdog's inotify reader, which on IN_Q_OVERFLOW rebuilds its watches but tells no one; this
        one then calls `report_overflow`. watchdog has no public way to learn of an overflow (upstream
        issue #654); this relies on what WATCHDOG_VERIFIED has and tests/test_watcher.py checks: the
        class `watchdog.observers.inotify_c.InotifyFD`, its `handle_event(event)` being called for every
        event read, IN_Q_OVERFLOW included (watchdog <= 7.0 drops that event, wd -1, in `read_events`;
        7.1 keeps it and calls each watch group's `on_queue_overflow`), and
        `InotifyEvent.is_queue_overflow`. No private attribute is read or set."""

        def __init__(self, report_overflow: Callable[[], None]) -> None:
            super().__init__()
            self.report_overflow = report_overflow

        def handle_event(self, event: InotifyEvent) -> None:
            super().handle_event(event)  # watchdog rebuilds the watches first
            if event.is_queue_overflow:
                try:
                    self.report_overflow()
                except Exception:
                    log.exception("on_overflow failed")

    class OverflowReportingInotifyObserver(BaseObserver):
        """watchdog's InotifyObserver (with full move events), built from public constructor parameters
        only: BaseObserver forwards extra keyword arguments to every emitter, and InotifyEmitter takes
        the reader as `inotify_fd`. Full events: a file or folder moved in from outside the tree comes
        as a move with an empty source (not a bare creation), one moved out as a move with an empty
        destination."""

        def __init__(self, on_overflow: Callable[[], None], *, timeout: float = DEFAULT_OBSERVER_TIMEOUT) -> None:
            reader = OverflowReportingInotifyFD(on_overflow)
            super().__init__(InotifyFullEmitter, timeout=timeout, inotify_fd=reader)
            self.reader = reader
            reader.start()

        def on_thread_stop(self) -> None:
            super().on_thread_stop()  # unschedules every watch (and so removes the emitters' callbacks)
            self.reader.stop()
            self.reader.join(READER_JOIN_TIMEOUT)

        def reader_alive(self) -> bool:
            return self.reader.is_alive()

else:  # pragma: no cover
    OverflowReportingInotifyFD = OverflowReportingInotifyObserver = None  # type: ignore[assignment,misc]


class Settler:
    """Tracks files without close events; hands them on once size+mtime are stable for `settle_seconds`."""

    def __init__(self, settle_seconds: float, on_stable: Callable[[str, str], object]) -> None:
        self.settle_seconds = settle_seconds
        self.on_stable = on_stable
        self._tracked: dict[tuple[str, str], tuple[int, int, float]] = {}
        self._lock = threading.Lock()

    def touch(self, root: str, relpath: str) -> None:
        with self._lock:
            self._tracked.setdefault((root, relpath), (-1, -1, time.monotonic()))

    def forget(self, root: str, relpath: str) -> None:
        with self._lock:
            self._tracked.pop((root, relpath), None)

    def tick(self) -> None:
        now = time.monotonic()
        ready = []
        with self._lock:
            for key, (size, mtime, since) in list(self._tracked.items()):
                try:
                    st = os.stat(os.path.join(*key))
                except OSError:
                    del self._tracked[key]
                    continue
                if (st.st_size, st.st_mtime_ns) != (size, mtime):
                    self._tracked[key] = (st.st_size, st.st_mtime_ns, now)
                elif now - since >= self.settle_seconds:
                    del self._tracked[key]
                    ready.append(key)
        for root, relpath in ready:
            self.on_stable(root, relpath)


def _relative(path: str | bytes, root: str) -> list[str] | None:
    """The parts of `path` below `root`; None for the root itself, paths outside it and empty paths
    (the missing side of a move from or to outside the tree)."""
    path = os.fsdecode(path)
    if not path:
        return None
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return None
    if rel == "." or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return rel.split(os.sep)


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher, root: str) -> None:
        self.watcher = watcher
        self.root = root

    def _rel(self, path: str | bytes) -> str | None:
        parts = _relative(path, self.root)
        if parts is None:
            return None
        if any(is_ignored(p, self.watcher.ignore_patterns) for p in parts) or not is_image_name(parts[-1]):
            return None
        return "/".join(parts)

    def _in_tree(self, path: str | bytes) -> bool:
        """A folder inside the root whose own path is not ignored (no `.tmp-x/` and the like)."""
        parts = _relative(path, self.root)
        return parts is not None and not any(is_ignored(p, self.watcher.ignore_patterns) for p in parts)

    def on_any_event(self, event: FileSystemEvent) -> None:
        start = time.perf_counter()
        try:
            self._dispatch(event)
        except Exception:  # one bad event must not kill the observer thread
            log.exception("could not handle %r", event)
        finally:
            self.watcher.record_dispatch(time.perf_counter() - start)

    def _dispatch(self, event: FileSystemEvent) -> None:
        w = self.watcher
        if isinstance(event, DirMovedEvent):
            if event.is_synthetic:
                return  # a sub-folder of a moved folder: the walk of the moved folder covers it
            if self._in_tree(event.dest_path):
                # A folder moved into the tree brings its files with it, without events of their own.
                w.scan_subtree(self.root, os.fsdecode(event.dest_path))
            elif self._in_tree(event.src_path):
                # Moved out of the tree (or into an ignored folder) with no event for its files.
                w.request_reconcile(f"folder {os.fsdecode(event.src_path)} moved away")
            return
        if isinstance(event, DirCreatedEvent):
            # Its watch was added just now: what was written into it before has no events of ours.
            # (A synthetic one is a sub-folder of a folder moved in, which the walk of that folder covers.)
            if not w.polling and not event.is_synthetic and self._in_tree(event.src_path):
                w.settle_subtree(self.root, os.fsdecode(event.src_path))
            return
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            src, dest = self._rel(event.src_path), self._rel(event.dest_path)
            if src:
                w.deleted(self.root, src)
            if dest and not event.is_synthetic:  # a file of a moved folder: the folder's walk queues it
                w.complete(self.root, dest)
        elif isinstance(event, FileClosedEvent):
            rel = self._rel(event.src_path)
            if rel:
                w.complete(self.root, rel)
        elif isinstance(event, (FileCreatedEvent, FileModifiedEvent)):
            rel = self._rel(event.src_path)
            if rel and w.polling:
                w.settler.touch(self.root, rel)
        elif isinstance(event, FileDeletedEvent):
            rel = self._rel(event.src_path)
            if rel:
                w.deleted(self.root, rel)


class Watcher:
    """One observer over all input roots; a daemon component (start/stop/alive/health). `tick()`
    drives settling, `rewatch(root)` watches a root again after an outage."""

    name = "watcher"

    def __init__(self, roots: Sequence[Path], queue: IngestQueue, *, polling: bool, settle_seconds: float,
                 ignore_patterns: Sequence[str], on_discovered: Callable[[int], None] = lambda n: None,
                 on_overflow: Callable[[], None] = lambda: None, on_lost: Callable[[], None] = lambda: None) -> None:
        self.roots = [str(r) for r in roots]
        self.queue = queue
        self.polling = polling
        self.ignore_patterns = list(ignore_patterns)
        self.on_discovered = on_discovered
        self.on_overflow = on_overflow
        self.on_lost = on_lost  # an event could not be queued: a reconcile scan must find its file
        self.settler = Settler(settle_seconds, self.complete)
        self.observer: BaseObserver | None = None
        self.watched: set[str] = set()
        self.max_dispatch_seconds = 0.0  # the longest one event took in the dispatch handler
        self.lost_total = 0  # file events left to a reconcile scan because the queue was full
        self._stopped = False
        self._spell_lock = threading.Lock()
        self._queue_full = False  # in a full-queue spell: puts do not wait
        self._spell_lost = 0
        self._spell_warned = False
        self._last_warning = float("-inf")

    # ---- into the queue, never for long -----------------------------------------------------------
    def record_dispatch(self, seconds: float) -> None:
        if seconds > self.max_dispatch_seconds:
            self.max_dispatch_seconds = seconds

    def reset_dispatch_stats(self) -> None:
        self.max_dispatch_seconds = 0.0

    def _offer(self, item: Item, wait: float | None) -> bool:
        """Queue `item`, waiting `wait` (default PUT_TIMEOUT) at most, and not at all while the queue stays
        full; what cannot be queued is left to a reconcile scan."""
        if self.queue.put(item, timeout=0 if self._queue_full else PUT_TIMEOUT if wait is None else wait):
            if self._queue_full:
                self._end_spell()
            return True
        self._lost(f"{item.root}/{item.relpath}")
        return False

    def _lost(self, what: str) -> None:
        with self._spell_lock:
            first = not self._queue_full
            self._queue_full = True
            self._spell_lost += 1
            self.lost_total += 1
            now = time.monotonic()
            warn = first and now - self._last_warning >= LOST_WARNING_EVERY
            if warn:
                self._last_warning = now
                self._spell_warned = True
        if warn:
            log.warning("ingest queue full (the worker is behind): %s and the files after it are left to a "
                        "reconcile scan", what)
        self.on_lost()

    def _end_spell(self) -> None:
        with self._spell_lock:
            if not self._queue_full:
                return
            lost, warned = self._spell_lost, self._spell_warned
            self._queue_full, self._spell_lost, self._spell_warned = False, 0, False
        log.log(logging.INFO if warned else logging.DEBUG,
                "ingest queue has room again; %d file event(s) were left to the reconcile scan", lost)

    def _queue_is_full(self) -> bool:
        return len(self.queue) - self.queue.background_len() >= self.queue.maxsize

    def request_reconcile(self, why: str) -> None:
        log.info("%s: asking for a reconcile scan", why)
        self.on_lost()

    def complete(self, root: str, relpath: str, wait: float | None = None) -> bool:
        self.settler.forget(root, relpath)
        if self._offer(Item(root, relpath), wait):
            self.on_discovered(1)
            return True
        return False

    def deleted(self, root: str, relpath: str, wait: float | None = None) -> bool:
        self.settler.forget(root, relpath)
        return self._offer(Item(root, relpath, "deleted"), wait)

    def _walk(self, root: str, path: str) -> Iterator[str]:
        """Relpaths (to root) of the image files under `path`, lazily; none when it is already gone."""
        try:
            for ref in discover(Path(path), self.ignore_patterns):
                yield os.path.relpath(os.path.join(path, ref.relpath), root).replace(os.sep, "/")
        except InputDirError:
            return

    def scan_subtree(self, root: str, path: str) -> None:
        """A folder moved into the tree: its files are complete. Queued while the queue has room (a
        put here never waits) and for WALK_BUDGET at most; the rest is left to a reconcile scan."""
        if self._queue_is_full():
            self._lost(f"folder {path}")
            return
        deadline = time.monotonic() + WALK_BUDGET
        for rel in self._walk(root, path):
            if not self.complete(root, rel, wait=0):
                return  # asked for a reconcile scan already
            if time.monotonic() > deadline:
                self.request_reconcile(f"folder {path} is too large to queue in one go")
                return

    def settle_subtree(self, root: str, path: str) -> None:
        """A folder just created: its files may still be written; complete at their close or once settled."""
        deadline = time.monotonic() + WALK_BUDGET
        for rel in self._walk(root, path):
            self.settler.touch(root, rel)
            if time.monotonic() > deadline:
                self.request_reconcile(f"new folder {path} is too large to walk in one go")
                return

    # ---- the component ----------------------------------------------------------------------------
    def start(self) -> None:
        """Start watching every root that exists; falls back to polling when inotify is out of watches
        or instances. Raises otherwise, holding no thread."""
        if self.observer is not None:  # started before: that observer goes first
            self._halt(self.observer, READER_JOIN_TIMEOUT)
            self.observer = None
        self._stopped = False
        try:
            self._start_observer(self.polling)
        except OSError as exc:
            if self.polling or exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            log.warning("inotify is out of watches/instances (%s); falling back to polling (watch.polling=true)", exc)
            self.polling = True
            self._start_observer(True)
        log.info("watching %s (%s)", ", ".join(self.roots), "polling" if self.polling else "inotify")

    def _start_observer(self, polling: bool) -> None:
        observer = self._make_observer(polling)
        self.observer = observer
        self.watched.clear()
        try:
            for root in self.roots:
                self._schedule(root)
            observer.start()
        except BaseException:
            self.observer = None
            self.watched.clear()
            self._halt(observer, READER_JOIN_TIMEOUT)
            raise

    def _make_observer(self, polling: bool) -> BaseObserver:
        if polling:
            return PollingObserver(timeout=1)
        if OverflowReportingInotifyObserver is not None and Observer is InotifyObserver:
            return OverflowReportingInotifyObserver(self.on_overflow)
        return Observer()

    @staticmethod
    def _halt(observer: BaseObserver, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        observer.stop()  # also unschedules its watches and stops the inotify reader
        if observer.ident is not None:  # it was started
            observer.join(max(0.0, deadline - time.monotonic()))
        return not observer.is_alive() and not _reader_alive(observer)

    def _schedule(self, root: str) -> bool:
        assert self.observer is not None
        if not os.path.isdir(root):
            return False
        self.observer.schedule(_Handler(self, root), root, recursive=True)
        self.watched.add(root)
        return True

    def rewatch(self, root: str) -> bool:
        """Watch a root again after an outage (its old watch died with the directory)."""
        if self.observer is None:
            return False
        for emitter in list(self.observer.emitters):
            if os.fsdecode(emitter.watch.path) == root:
                self.observer.unschedule(emitter.watch)
        self.watched.discard(root)
        try:
            return self._schedule(root)
        except OSError as exc:
            log.warning("cannot watch %s again yet: %s", root, exc)
            return False

    def tick(self) -> None:
        self.settler.tick()  # polling: every file; inotify: files found in new folders

    def alive(self) -> bool:
        observer = self.observer
        if observer is None or self._stopped or not observer.is_alive():
            return False
        return _reader_alive(observer) is not False

    def health(self) -> str:
        if not self.alive():
            return "stopped" if self._stopped else "DEAD"
        n, total = len(self.watched), len(self.roots)
        roots = f"{n} root{'' if n == 1 else 's'}" if n == total else f"{n} of {total} roots"
        full = ", queue full" if self._queue_full else ""
        return f"{'polling' if self.polling else 'inotify'}, {roots}{full}"

    def request_stop(self) -> None:
        """Intake ends at once: the observer is stopped, `stop` waits for it."""
        self.stop(0.0)

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the observer (and its inotify reader) and wait for them within `timeout`; True when stopped."""
        self._stopped = True
        if self.observer is None:
            return True
        return self._halt(self.observer, timeout)

    def join(self, timeout: float | None = None) -> bool:
        if self.observer is not None and self.observer.ident is not None:
            self.observer.join(timeout)
            return not self.observer.is_alive()
        return True


def _reader_alive(observer: BaseObserver) -> bool | None:
    """Whether the inotify reader thread of our observer runs; None for observers without one."""
    if OverflowReportingInotifyObserver is None or not isinstance(observer, OverflowReportingInotifyObserver):
        return None
    return observer.reader_alive()
