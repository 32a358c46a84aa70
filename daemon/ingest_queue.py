"""The ingest queue: paths waiting for the worker, de-duplicated, bounded, FIFO, in two lanes.

Fresh files (watcher events) go in the foreground lane; reconcile scans and re-embedding put theirs in
the background lane, which the worker serves only when the foreground is empty - so new files keep
arriving promptly while the store is re-embedded. A path enqueued twice before the worker takes it is
processed once (a foreground put promotes a queued background item). `put` blocks while its lane is
full (back-pressure on the watcher and the scans) until `timeout`, so memory stays bounded; a path
that could not be queued is caught by the next reconcile scan.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    root: str
    relpath: str
    kind: str = "file"  # file | deleted


class IngestQueue:
    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple[str, str], Item] = OrderedDict()  # foreground
        self._background: OrderedDict[tuple[str, str], Item] = OrderedDict()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        with self._cond:
            return len(self._items) + len(self._background)

    def background_len(self) -> int:
        with self._cond:
            return len(self._background)

    def put(self, item: Item, timeout: float | None = None, background: bool = False) -> bool:
        key = (item.root, item.relpath)
        with self._cond:
            if key in self._items:
                self._items[key] = item  # the latest event wins (a delete after a create, ...)
                return True
            if background and key in self._background:
                self._background[key] = item
                return True
            lane = self._background if background else self._items
            deadline = None if timeout is None else time.monotonic() + timeout
            while len(lane) >= self.maxsize:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            self._background.pop(key, None)
            lane[key] = item
            self._cond.notify_all()
            return True

    def get_batch(self, max_items: int, max_wait: float, idle_timeout: float) -> list[Item]:
        """Up to max_items: waits up to idle_timeout for the first, then at most max_wait for more."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._items or self._background, idle_timeout):
                return []
            deadline = time.monotonic() + max_wait
            while len(self._items) + len(self._background) < max_items:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._cond.wait(remaining):
                    break
            batch: list[Item] = []
            for lane in (self._items, self._background):
                while lane and len(batch) < max_items:
                    batch.append(lane.popitem(last=False)[1])
            self._cond.notify_all()
            return batch
