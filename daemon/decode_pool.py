"""The decode worker pool: processes that read, check and decode files, each file under a time limit.

pebble's ProcessPool stops a worker whose task runs past its timeout and replaces a worker that died
(a crash in a native decoder), and the other tasks carry on; the standard library's pool can do
neither (a hung task holds its worker for good, a dead worker breaks the whole pool). The futures it
returns raise TimeoutError / ProcessExpired, which `pipeline.decode.collect` turns into verdicts.
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
    """An Executor over pebble's ProcessPool; `timeout` (seconds, None = none) applies to each task."""

    def __init__(self, workers: int, timeout: float | None, context: BaseContext) -> None:
        self.workers = workers
        self.timeout = timeout
        self._pool = ProcessPool(max_workers=workers, context=context)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._pool.schedule(fn, args=args, kwargs=kwargs, timeout=self.timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures:
            self._pool.stop()  # workers are stopped; queued and running tasks are cancelled
        else:
            self._pool.close()  # no new tasks; the queued ones finish
        if wait:
            self._pool.join()
