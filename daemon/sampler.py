"""Sampling runs in their own thread: at most one at a time; a trigger during a run queues ONE more.

Triggers (schedule, SIGUSR1, start-up) only call `request()`; the thread runs
`pipeline.sampling.sample_run` with its own store connection (a WAL snapshot read, one short write),
reading the daemon's settings snapshot when the run starts.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from poolwatch.pipeline.config import Config
from poolwatch.pipeline.errors import PoolwatchError
from poolwatch.pipeline.sampling import sample_run, validate_sampling
from poolwatch.pipeline.store import Store, open_store

from .component import ThreadComponent
from .metrics import Metrics
from .runtime import recover_runs, release_free_memory, write_report

log = logging.getLogger(__name__)


class Sampler(ThreadComponent):
    name = "sampler"

    def __init__(self, settings: Callable[[], Config], metrics: Metrics) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: str | None = None  # trigger of the queued run
        self.running = False
        self.completed = 0
        self.last_error: str | None = None

    def request(self, trigger: str) -> str:
        """Queue a run; returns what happened to the request, for the log."""
        with self._cond:
            if self.stopping.is_set():
                return "not queued: stopping"
            if self._pending is not None:
                return "already queued"
            self._pending = trigger
            self._cond.notify_all()
            return "queued" if not self.running else "queued after the current run"

    def request_stop(self) -> None:
        """No new runs; a run in progress finishes (the supervisor bounds the wait)."""
        with self._cond:
            super().request_stop()
            self._pending = None
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self.running and self._pending is None

    def health(self) -> str:
        if not self.alive():
            return "DEAD"
        with self._cond:
            return "running" if self.running else ("queued" if self._pending is not None else "idle")

    def run(self) -> None:
        config = self.settings()
        with open_store(config) as store:
            recover_runs(store, config.shared_path)
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending is not None or self.stopping.is_set())
                    if self.stopping.is_set():
                        return
                    trigger, self._pending = self._pending, None
                    assert trigger is not None
                    self.running = True
                try:
                    self._run_once(store, trigger)
                    release_free_memory()  # a run's matrices and report are gone: give their pages back
                finally:
                    with self._cond:
                        self.running = False
                        self._cond.notify_all()

    def _run_once(self, store: Store, trigger: str) -> None:
        config = self.settings()
        start = time.perf_counter()
        log.info("sampling run started (trigger %s, method %s, pool %s)", trigger, config.method,
                 config.datapool.name or "none")
        try:
            validate_sampling(config)
            result = sample_run(store, config, trigger=trigger,
                                extra_stats={"compute_efficiency": self.metrics.smoothed_efficiency()})
        except PoolwatchError as exc:
            self.metrics.runs.labels(trigger, "failed").inc()
            self.last_error = str(exc)
            log.error("sampling run not possible: %s", exc)
            return
        except Exception as exc:  # a failed run is recorded; the daemon carries on
            self.metrics.runs.labels(trigger, "failed").inc()
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("sampling run failed")
            return
        finally:
            self.metrics.run_seconds.observe(time.perf_counter() - start)
        self.completed += 1
        m = self.metrics
        m.runs.labels(trigger, "ok").inc()
        m.last_candidates.set(result.n_candidates)
        m.last_selected.set(result.n_selected)
        m.last_success.set(time.time())
        for pool, size in store.pools().items():
            m.pool_size.labels(pool).set(size)
        if not write_report(store, result.run_id):
            m.report_failures.inc()
        log.info("sampling run %d finished in %.1fs: %d of %d candidates selected (%s), pool %d -> %d, outputs in %s",
                 result.run_id, result.seconds, result.n_selected, result.n_candidates, result.stop_reason,
                 result.pool_before, result.pool_after, result.output_dir)
