"""Sampling runs in their own thread: at most one at a time; a trigger during a run queues ONE more.

Triggers (schedule, SIGUSR1, start-up) only call `request()`; the thread runs
`pipeline.sampling.sample_run` with its own store connection (a WAL snapshot read, one short write).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from poolwatch.pipeline.config import Config
from poolwatch.pipeline.coreset import SamplingError
from poolwatch.pipeline.sampling import recover, sample_run, validate_sampling
from poolwatch.pipeline.store import Store

from .metrics import Metrics
from .runtime import release_free_memory

log = logging.getLogger(__name__)


class Sampler(threading.Thread):
    def __init__(self, config_source: Callable[[], Config], metrics: Metrics) -> None:
        super().__init__(name="sampler", daemon=True)
        self.config_source = config_source
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: str | None = None  # trigger of the queued run
        self._stopping = False
        self.running = False
        self.completed = 0
        self.last_error: str | None = None

    def request(self, trigger: str) -> str:
        """Queue a run; returns 'queued', 'already queued' or 'stopping'."""
        with self._cond:
            if self._stopping:
                return "stopping"
            if self._pending is not None:
                return "already queued"
            self._pending = trigger
            self._cond.notify_all()
            return "queued" if not self.running else "queued after the current run"

    def stop(self) -> None:
        """No new runs; a run in progress finishes (the caller bounds the wait)."""
        with self._cond:
            self._stopping = True
            self._pending = None
            self._cond.notify_all()

    def idle(self) -> bool:
        with self._cond:
            return not self.running and self._pending is None

    def run(self) -> None:
        config = self.config_source()
        with Store.open(config.store_path, float(config.store.busy_timeout)) as store:
            for line in recover(store, config.shared_path):
                log.warning("recovery: %s", line)
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._pending is not None or self._stopping)
                    if self._stopping:
                        return
                    trigger, self._pending = self._pending, None
                    self.running = True
                try:
                    self._run_once(store, trigger)
                    release_free_memory()  # a run's matrices and report are gone: give their pages back
                finally:
                    with self._cond:
                        self.running = False
                        self._cond.notify_all()

    def _report(self, store: Store, run_id: int) -> None:
        """A failed report is logged and counted; it never fails or rolls back the run."""
        from poolwatch.pipeline.report import build_report

        try:
            build_report(store, run_id)
        except Exception:  # noqa: BLE001
            self.metrics.report_failures.inc()
            log.exception("the report of run %d failed (the run itself is fine; retry with `poolwatch report %d`)",
                          run_id, run_id)

    def _run_once(self, store: Store, trigger: str) -> None:
        config = self.config_source()
        start = time.perf_counter()
        log.info("sampling run started (trigger %s, method %s, pool %s)", trigger, config.method,
                 config.datapool.name or "none")
        try:
            validate_sampling(config)
            result = sample_run(store, config, trigger=trigger,
                                extra_stats={"compute_efficiency": self.metrics.smoothed_efficiency()})
        except SamplingError as exc:
            self.metrics.runs.labels(trigger, "failed").inc()
            self.last_error = str(exc)
            log.error("sampling run not possible: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - a failed run is recorded; the daemon carries on
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
        self._report(store, result.run_id)
        log.info("sampling run %d finished in %.1fs: %d of %d candidates selected (%s), pool %d -> %d, outputs in %s",
                 result.run_id, result.seconds, result.n_selected, result.n_candidates, result.stop_reason,
                 result.pool_before, result.pool_after, result.output_dir)
