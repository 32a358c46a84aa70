"""The decode worker pool: processes that read, check and decode files, each file under a time limit.

pebble's ProcessPool stops a worker whose task runs past its timeout and replaces a worker that died
(a crash in a native decoder), and the other tasks carry on; the standard library's pool can do
neither (a hung task holds its worker for good, a dead worker breaks the whole pool). The futures it
returns raise TimeoutError / ProcessExpired, which `pipeline.decode.collect` turns into verdicts.
The limit is read at every submit, so a reload's new `check.decode_timeout` applies to the next file.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor, Future
from multiprocessing.context import BaseContext
from typing import Any

from pebble import ProcessPool

log = logging.getLogger(__name__)


class DecodePool(Executor):
    """An Executor over pebble's ProcessPool; `timeout()` (seconds, None = none) applies to each task."""

    def __init__(self, workers: int, timeout: Callable[[], float | None], context: BaseContext) -> None:
        self.workers = workers
        self.timeout = timeout
        self._pool = ProcessPool(max_workers=workers, context=context)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._pool.schedule(fn, args=args, kwargs=kwargs, timeout=self.timeout())

    @property
    def active(self) -> bool:
        return bool(self._pool.active)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            self._pool.stop()  # type: ignore[no-untyped-call]  # pebble has no annotations; stops workers, cancels tasks
        else:
            self._pool.close()  # type: ignore[no-untyped-call]  # no new tasks; the queued ones finish
        if wait:
            self._pool.join()

    def stop_within(self, timeout: float) -> bool:
        """Cancel every task and stop the workers; True when they ended within `timeout` seconds."""
        self._pool.stop()  # type: ignore[no-untyped-call]
        try:
            self._pool.join(timeout)
        except TimeoutError:
            return False
        return True


class DecodeWorkers:
    """The decode pool as a daemon component (`lightly.loader.num_workers=0`: none, decode in-process)."""

    name = "decoders"

    def __init__(self, make: Callable[[], DecodePool | None]) -> None:
        self._make = make
        self.executor: DecodePool | None = None
        self._started = False

    def start(self) -> None:
        self.executor = self._make()
        self._started = True

    def stop(self, timeout: float) -> bool:
        """Cancel what is queued, stop the workers, wait for them at most `timeout` (a worker stuck in
        uninterruptible I/O must not hang the daemon's stop)."""
        self._started = False
        if self.executor is not None and not self.executor.stop_within(timeout):
            return False
        self.executor = None
        return True

    def request_stop(self) -> None:
        """Nothing to do early: the worker still collects its batch in hand from the pool."""

    def alive(self) -> bool:
        return self._started and (self.executor is None or self.executor.active)

    def health(self) -> str:
        if not self._started:
            return "DEAD"
        return f"{self.executor.workers} processes" if self.executor is not None else "in-process"
