"""Sampling runs in their own thread: at most one at a time; a trigger during a run queues ONE more.

Triggers (schedule, SIGUSR1, start-up) only call `request()`; the thread runs
`pipeline.sampling.sample_run` with its own store connection (a snapshot read, one short write),
reading the daemon's settings snapshot when the run starts.

On a store shared by many nodes one run at a time runs across all of them: the run holds the store's sampling
lock. A scheduled (or start-up) run that finds it taken is skipped, logged and counted; any other trigger
(SIGUSR1, `poolwatch trigger`) waits for its turn. Between runs the thread writes the selected images this
node holds of other nodes' runs that asked for a dump (`pipeline.sampling.dump_pending`).
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

SKIPPED_WHEN_LOCKED = ("schedule", "startup")  # triggers that skip a run another node is running; others wait
LOCK_WAIT = 1.0  # seconds one wait for the sampling lock lasts before the thread looks at its stop flag again
DUMP_CHECK = 10.0  # seconds between looks for other nodes' runs whose selected images this node holds


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
                self._dump_pending(store)
                with self._cond:
                    self._cond.wait_for(lambda: self._pending is not None or self.stopping.is_set(), timeout=DUMP_CHECK)
                    if self.stopping.is_set():
                        return
                    if self._pending is None:
                        continue
                    trigger, self._pending = self._pending, None
                    self.running = True
                try:
                    if self._take_lock(store, trigger):
                        try:
                            self._run_once(store, trigger)
                        finally:
                            store.release_sampling_lock()
                        release_free_memory()  # a run's matrices and report are gone: give their pages back
                finally:
                    with self._cond:
                        self.running = False
                        self._cond.notify_all()

    def _take_lock(self, store: Store, trigger: str) -> bool:
        """The store's sampling lock for this run: a scheduled run skips when another node holds it; others wait."""
        if store.try_sampling_lock():
            return True
        if trigger in SKIPPED_WHEN_LOCKED:
            self.metrics.runs_skipped.labels(trigger).inc()
            log.info("sampling run (trigger %s) skipped: another node's run holds the store's sampling lock", trigger)
            return False
        log.info("sampling run (trigger %s) waits for another node's run to finish", trigger)
        while not self.stopping.is_set():
            if store.try_sampling_lock(wait=LOCK_WAIT):
                return True
        log.info("sampling run (trigger %s) not started: stopping", trigger)
        return False

    def _dump_pending(self, store: Store) -> None:
        from poolwatch.pipeline.sampling import dump_pending

        try:
            for run_id, written, where in dump_pending(store, self.settings()):
                log.info("run %d: wrote the %d selected images this node holds into %s", run_id, written, where)
        except Exception:  # a failed dump is recorded and retried; the sampler carries on
            log.warning("could not write the selected images of another node's run", exc_info=True)

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
