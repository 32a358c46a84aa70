"""Filesystem watching: watchdog observers → complete files into the ingest queue.

With inotify a file is complete when it is closed after writing (IN_CLOSE_WRITE) or renamed into the
tree (the `cp tmp && mv` pattern); creation and modification events are ignored because a close
follows. Where no close events exist (`watch.polling=true`, or the automatic fallback when inotify
watches run out), a file is complete once its size and mtime have not changed for
`watch.settle_seconds` (the `Settler`). A folder created in the tree gets its inotify watch only
after it appears, so files written into it at once (`mkdir d && cp x d/`, `cp -r`) may have been
closed before anyone watched: the files found in a new folder go to the Settler too, and their close
event, when one comes, hands them on sooner. Deletions become `deleted` items; the worker confirms
the file is really gone before marking it missing.

When the kernel's inotify queue overflows (more events than fs.inotify.max_queued_events before the
observer reads them), events are lost: watchdog rebuilds its watches, and `on_overflow` tells the
daemon, which runs a reconcile scan to find what the lost events would have said.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
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
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

try:  # Linux
    from watchdog.observers.inotify import InotifyEmitter, InotifyObserver
except (ImportError, OSError):  # pragma: no cover - other platforms have no inotify queue to overflow
    InotifyEmitter = InotifyObserver = None  # type: ignore[assignment,misc]

from poolwatch.pipeline.ingest import InputDirError, discover, is_ignored, is_image_name

from .ingest_queue import IngestQueue, Item

log = logging.getLogger(__name__)


class Settler:
    """Tracks files without close events; hands them on once size+mtime are stable for `settle_seconds`."""

    def __init__(self, settle_seconds: float, on_stable: Callable[[str, str], None]) -> None:
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


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: Watcher, root: str) -> None:
        self.watcher = watcher
        self.root = root

    def _rel(self, path: str | bytes) -> str | None:
        path = os.fsdecode(path)
        try:
            rel = os.path.relpath(path, self.root)
        except ValueError:
            return None
        if rel.startswith("..") or rel == ".":
            return None
        parts = rel.split(os.sep)
        if any(is_ignored(p, self.watcher.ignore_patterns) for p in parts) or not is_image_name(parts[-1]):
            return None
        return "/".join(parts)

    def _in_tree(self, path: str) -> bool:
        """A folder inside the root whose own path is not ignored (no `.tmp-x/` and the like)."""
        try:
            rel = os.path.relpath(path, self.root)
        except ValueError:
            return False
        if rel.startswith("..") or rel == ".":
            return False
        return not any(is_ignored(p, self.watcher.ignore_patterns) for p in rel.split(os.sep))

    def on_any_event(self, event: FileSystemEvent) -> None:
        try:
            self._dispatch(event)
        except Exception:  # noqa: BLE001 - one bad event must not kill the observer thread
            log.exception("could not handle %r", event)

    def _dispatch(self, event: FileSystemEvent) -> None:
        w = self.watcher
        if isinstance(event, DirMovedEvent):
            # A folder moved into the tree brings its files with it, without events of their own.
            dest = os.fsdecode(event.dest_path)
            if self._in_tree(dest):
                w.scan_subtree(self.root, dest)
            return
        if isinstance(event, DirCreatedEvent):
            # Its watch was added just now: what was written into it before has no events of ours.
            src = os.fsdecode(event.src_path)
            if not w.polling and self._in_tree(src):
                w.settle_subtree(self.root, src)
            return
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            src, dest = self._rel(event.src_path), self._rel(event.dest_path)
            if src:
                w.deleted(self.root, src)
            if dest:
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


if InotifyObserver is not None:
    class _OverflowAwareEmitter(InotifyEmitter):
        """watchdog's emitter, which handles a queue overflow itself (it rebuilds its watches) but tells no
        one; this one also calls `on_overflow`."""

        def __init__(self, *args: object, on_overflow: Callable[[], None], **kwargs: object) -> None:
            super().__init__(*args, **kwargs)
            self._on_overflow = on_overflow

        def on_thread_start(self) -> None:
            super().on_thread_start()
            group = self._inotify
            rebuild = group.on_queue_overflow

            def overflowed() -> None:
                rebuild()
                self._on_overflow()

            group.on_queue_overflow = overflowed

    class _OverflowAwareObserver(InotifyObserver):
        def __init__(self, on_overflow: Callable[[], None]) -> None:
            super().__init__()
            self._emitter_class = _OverflowAwareEmitter
            self._emitter_kwargs = {**self._emitter_kwargs, "on_overflow": on_overflow}


class Watcher:
    """One observer over all input roots. start/stop/join; `tick()` drives settling."""

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

    def complete(self, root: str, relpath: str) -> None:
        self.settler.forget(root, relpath)
        if self.queue.put(Item(root, relpath), timeout=60):
            self.on_discovered(1)
        elif not self.queue.closed:
            log.warning("ingest queue full for 60 s; %s/%s is left to a reconcile scan", root, relpath)
            self.on_lost()

    def deleted(self, root: str, relpath: str) -> None:
        self.settler.forget(root, relpath)
        if not self.queue.put(Item(root, relpath, "deleted"), timeout=60) and not self.queue.closed:
            self.on_lost()

    def _subtree(self, root: str, path: str) -> list[str]:
        """Relpaths (to root) of the image files under `path`; none when it is already gone."""
        try:
            refs = list(discover(Path(path), self.ignore_patterns))
        except InputDirError:
            return []
        return [os.path.relpath(os.path.join(path, ref.relpath), root).replace(os.sep, "/") for ref in refs]

    def scan_subtree(self, root: str, path: str) -> None:
        """A folder moved into the tree: its files are complete."""
        for rel in self._subtree(root, path):
            self.complete(root, rel)

    def settle_subtree(self, root: str, path: str) -> None:
        """A folder just created: its files may still be written; complete at their close or once settled."""
        for rel in self._subtree(root, path):
            self.settler.touch(root, rel)

    def start(self) -> None:
        self.observer = self._make_observer(self.polling)
        for root in self.roots:
            self._schedule(root)
        try:
            self.observer.start()
        except OSError as exc:
            if self.polling or exc.errno not in (errno.ENOSPC, errno.EMFILE):
                raise
            log.warning("inotify is out of watches/instances (%s); falling back to polling (watch.polling=true)", exc)
            self.polling = True
            self.observer = self._make_observer(True)
            self.watched.clear()
            for root in self.roots:
                self._schedule(root)
            self.observer.start()
        log.info("watching %s (%s)", ", ".join(self.roots), "polling" if self.polling else "inotify")

    def _make_observer(self, polling: bool) -> BaseObserver:
        if polling:
            return PollingObserver(timeout=1)
        if InotifyObserver is not None and Observer is InotifyObserver:
            return _OverflowAwareObserver(self.on_overflow)
        return Observer()

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
        for watch in list(self.observer.emitters):
            if os.fsdecode(watch.watch.path) == root:
                self.observer.unschedule(watch.watch)
        self.watched.discard(root)
        try:
            return self._schedule(root)
        except OSError as exc:
            log.warning("cannot watch %s again yet: %s", root, exc)
            return False

    def tick(self) -> None:
        self.settler.tick()  # polling: every file; inotify: files found in new folders

    def alive(self) -> bool:
        return self.observer is not None and self.observer.is_alive()

    def stop(self) -> None:
        if self.observer is not None:
            self.observer.stop()

    def join(self, timeout: float | None = None) -> None:
        if self.observer is not None:
            self.observer.join(timeout)
