"""The daemon's lifecycle (`poolwatch run`): start the components, tick, react to signals, stop.

Signal handlers only record what arrived and wake the main loop (as uvicorn does); the loop acts:
SIGUSR1 → one sampling run; SIGHUP → reload config.yaml + the original overrides; SIGTERM/SIGINT →
stop intake, finish the current batch and sampling run within `graceful_timeout`, exit 0; a second
SIGTERM/SIGINT exits at once.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from poolwatch.pipeline.config import Config, ConfigError, load_config
from poolwatch.pipeline.ingest import InputDirError, activate_model, discover, plan
from poolwatch.pipeline.store import Store

from . import runtime
from .decode_pool import DecodePool
from .ingest_queue import IngestQueue, Item
from .lock import ShareLock
from .metrics import Metrics, MetricsServer
from .sampler import Sampler
from .scheduler import Scheduler
from .signals import SignalRecorder
from .systemd import Notifier
from .watcher import Watcher
from .worker import Worker

log = logging.getLogger(__name__)

TICK_SECONDS = 0.25
MAX_RESTARTS = 5  # per component within RESTART_WINDOW; beyond it the daemon exits non-zero
RESTART_WINDOW = 600.0
# Settings that need a new store or server; a reload keeps the running values and says so.
FIXED_ON_RELOAD = ("shared_dir", "store", "metrics")
# Settings that make a new model: a reload loads it, and the store is re-embedded in the background.
MODEL_KEYS = ("checkpoint", "device", "seed", "embedding_precision")
LIGHTLY_MODEL_KEYS = ("model", "collate", "pre_trained")
COVERAGE_EVERY = 5.0  # seconds between re-embedding progress checks


class Service:
    def __init__(self, config: Config, overrides: list[str], config_file: str | None,
                 registry: CollectorRegistry | None = None, signals: SignalRecorder | None = None) -> None:
        self.config = config
        self.overrides = overrides
        self.config_file = config_file
        self.metrics = Metrics(registry)
        self.notifier = Notifier()
        self.signals = signals or SignalRecorder()
        self._restarts: dict[str, list[float]] = {}
        self._outages: set[str] = set()
        self._reconcile_thread: threading.Thread | None = None
        self._next_reconcile = 0.0
        self._reconcile_again = False  # a forced scan was asked for while one was running
        self._overflowed = threading.Event()
        self._rescan_requested = threading.Event()
        self._next_coverage = 0.0

    # ---- start-up -----------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.config
        lock = ShareLock(cfg.shared_path)
        lock.acquire()  # raises LockedError with the other pid
        try:
            if not self.signals.installed:
                self.signals.install()
            return self._run(lock)
        finally:
            lock.release()
            self.notifier.close()

    def _run(self, lock: ShareLock) -> int:
        cfg = self.config
        log.info("poolwatch daemon starting (pid %d, shared_dir %s)", os.getpid(), cfg.shared_path)
        runtime.configure_torch_threads()
        self.embedder = runtime.load_embedder(cfg)
        with Store.open(cfg.store_path, float(cfg.store.busy_timeout)) as store:
            self.model_id = activate_model(store, self.embedder)
            for pool, size in store.pools().items():
                self.metrics.pool_size.labels(pool).set(size)
        self._publish_model()
        self.executor = runtime.decode_executor(cfg)
        self.queue = IngestQueue(cfg.watch.queue_size)
        self.worker = self._make_worker()
        self.sampler = Sampler(lambda: self.config, self.metrics)
        self.watcher = self._make_watcher(cfg)
        self.scheduler = Scheduler(self.request_sample)
        self.server: MetricsServer | None = None
        if cfg.metrics.enabled:
            self.server = MetricsServer(self.metrics, cfg.metrics.host, cfg.metrics.port, self.health)
            self.server.start()
        self.worker.start()
        self.sampler.start()
        self.watcher.start()
        self.scheduler.apply(cfg.schedule)
        self.scheduler.start()
        self._start_reconcile()
        if cfg.schedule.on_startup:
            self.request_sample("startup")
        self.notifier.ready(f"watching {len(cfg.input_dir)} input dir(s)")
        log.info("poolwatch daemon ready")
        try:
            return self._loop()
        finally:
            self._shutdown()

    def _publish_model(self) -> None:
        m = self.embedder.model
        self.metrics.model_info.info({"source": m.source, "name": m.spec.name, "dim": str(m.spec.num_ftrs),
                                      "input_size": str(m.spec.input_size), "weights": m.weights_hash[:12],
                                      "model_id": str(self.model_id)})
        self.metrics.model_dim.set(m.spec.num_ftrs)

    def _make_worker(self) -> Worker:
        cfg = self.config
        return Worker(store_path=cfg.store_path, busy_timeout=float(cfg.store.busy_timeout), embedder=self.embedder,
                      model_id=self.model_id, queue=self.queue, settings=runtime.decode_settings(cfg),
                      batch_size=cfg.batch_size, max_batch_wait=float(cfg.watch.max_batch_wait),
                      remove_duplicates=cfg.remove_exact_duplicates, executor=self.executor, metrics=self.metrics,
                      is_outage=lambda root: root in self._outages)

    def _make_watcher(self, cfg: Config) -> Watcher:
        return Watcher(cfg.input_paths, self.queue, polling=cfg.watch.polling,
                       settle_seconds=float(cfg.watch.settle_seconds), ignore_patterns=cfg.watch.ignore_patterns,
                       on_discovered=self.metrics.discovered.inc, on_overflow=self._on_overflow,
                       on_lost=self._on_lost)

    def _on_overflow(self) -> None:
        """Called on the watcher's thread: the loop counts it and starts the reconcile scan."""
        self._overflowed.set()
        self._on_lost()

    def _on_lost(self) -> None:
        """Called on the watcher's thread when events were lost: the loop starts a reconcile scan."""
        self._rescan_requested.set()
        self.signals.wake.set()

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> int:
        while True:
            self.signals.wake.wait(TICK_SECONDS)
            self.signals.wake.clear()
            for sig in self.signals.take():
                if sig in (signal.SIGTERM, signal.SIGINT):
                    log.info("received %s: stopping gracefully (send it again to exit at once)", signal.Signals(sig).name)
                    return self._graceful_stop()
                if sig == signal.SIGUSR1:
                    log.info("received SIGUSR1: sampling run %s", self.request_sample("signal"))
                elif sig == signal.SIGHUP:
                    self.reload()
            self.watcher.tick()
            if self._overflowed.is_set():
                self._overflowed.clear()
                self.metrics.overflows.inc()
                log.warning("the inotify queue overflowed (events were lost, fs.inotify.max_queued_events); "
                            "rescanning the input dirs")
            if self._rescan_requested.is_set():
                self._rescan_requested.clear()
                self._start_reconcile(force=True)
            self._check_roots()
            if time.monotonic() >= self._next_reconcile or (self._reconcile_again and not self._reconcile_running()):
                self._start_reconcile()
            if time.monotonic() >= self._next_coverage:
                self._check_coverage()
            code = self._supervise()
            if code is not None:
                return code
            self.metrics.queue_depth.set(len(self.queue))
            self.notifier.watchdog_tick()

    def request_sample(self, trigger: str) -> str:
        return self.sampler.request(trigger)

    def health(self) -> tuple[bool, str]:
        parts = {
            "worker": self.worker.is_alive(),
            "sampler": self.sampler.is_alive(),
            "watcher": self.watcher.alive(),
            "scheduler": self.scheduler.alive(),
        }
        stalled = self.worker.busy and time.monotonic() - self.worker.last_progress > 300
        ok = all(parts.values()) and not stalled
        why = ", ".join(f"{k} {'alive' if v else 'DEAD'}" for k, v in parts.items())
        if stalled:
            why += ", worker STALLED"
        return ok, ("ok: " if ok else "unhealthy: ") + why

    # ---- supervision --------------------------------------------------------------------------
    def _supervise(self) -> int | None:
        """Restart a component that died, with backoff; too many restarts → exit non-zero."""
        for name, alive, restart in (
            ("worker", self.worker.is_alive(), self._restart_worker),
            ("sampler", self.sampler.is_alive(), self._restart_sampler),
            ("watcher", self.watcher.alive(), self._restart_watcher),
        ):
            if alive:
                continue
            now = time.monotonic()
            recent = [t for t in self._restarts.get(name, []) if now - t < RESTART_WINDOW]
            if len(recent) >= MAX_RESTARTS:
                log.critical("%s died %d times in %.0f s; exiting so the supervisor restarts poolwatch",
                             name, len(recent), RESTART_WINDOW)
                return 1
            if recent and now - recent[-1] < 2 ** len(recent):
                continue  # back off
            recent.append(now)
            self._restarts[name] = recent
            self.metrics.component_restarts.labels(name).inc()
            log.error("%s stopped unexpectedly; restarting it (%d in the last %.0f s)", name, len(recent), RESTART_WINDOW)
            restart()
        return None

    def _restart_worker(self) -> None:
        self.worker = self._make_worker()
        self.worker.start()
        self._start_reconcile()  # whatever the dead worker held is found again

    def _restart_sampler(self) -> None:
        self.sampler = Sampler(lambda: self.config, self.metrics)
        self.sampler.start()

    def _restart_watcher(self) -> None:
        self.watcher.stop()
        self.watcher = self._make_watcher(self.config)
        self.watcher.start()
        self._start_reconcile()

    def _check_coverage(self) -> None:
        """Re-embedding progress; once the current model covers every image, older vectors go."""
        self._next_coverage = time.monotonic() + COVERAGE_EVERY
        try:
            with Store.open(self.config.store_path, float(self.config.store.busy_timeout)) as store:
                done, total = store.coverage(self.model_id)
                self.metrics.reembedding.set(done / total if total else 1.0)
                if done >= total and not self.sampler.running and store.drop_old_vectors():
                    log.info("re-embedding complete (%d images): sampling now uses model %d; older vectors removed",
                             total, self.model_id)
        except Exception:  # noqa: BLE001 - progress reporting must not take the daemon down
            log.warning("could not check re-embedding progress", exc_info=True)

    # ---- input roots: outages and reconcile scans ---------------------------------------------
    def _check_roots(self) -> None:
        for root in map(str, self.config.input_paths):
            up = os.path.isdir(root) and os.access(root, os.R_OK | os.X_OK)
            if not up and root not in self._outages:
                self._outages.add(root)
                self.metrics.outages.labels(root).inc()
                self.metrics.outage_active.labels(root).set(1)
                log.error("input directory %s is missing or unreadable: outage (its images keep their state)", root)
            elif up and root in self._outages:
                self._outages.discard(root)
                self.metrics.outage_active.labels(root).set(0)
                log.info("input directory %s is back; watching it again and rescanning", root)
                self.watcher.rewatch(root)
                self._start_reconcile(force=True)

    def _start_reconcile(self, force: bool = False) -> None:
        interval = float(self.config.watch.rescan_interval)
        self._next_reconcile = time.monotonic() + (interval if interval > 0 else float("inf"))
        if self._reconcile_running():
            # The running scan may already have passed what this request is about (files whose events
            # an overflow lost, a root that came back): one more scan starts as soon as it ends.
            self._reconcile_again = self._reconcile_again or force
            return
        self._reconcile_again = False
        self._reconcile_thread = threading.Thread(target=self._reconcile, name="reconcile", daemon=True)
        self._reconcile_thread.start()

    def _reconcile_running(self) -> bool:
        return self._reconcile_thread is not None and self._reconcile_thread.is_alive()

    def _reconcile(self) -> None:
        """Queue every file that needs work and every vanished file; unchanged files are not read."""
        cfg = self.config
        start = time.monotonic()
        queued = gone_total = 0
        try:
            with Store.open(cfg.store_path, float(cfg.store.busy_timeout)) as store:
                for root in cfg.input_paths:
                    if self.signals.stop_requested:
                        return
                    if str(root) in self._outages:
                        continue
                    try:
                        found = list(discover(root, cfg.watch.ignore_patterns))
                    except InputDirError as exc:
                        log.warning("reconcile skipped %s: %s", root, exc.strerror)
                        continue
                    todo, gone = plan(store, root, found, self.model_id)
                    items = [Item(ref.root, ref.relpath) for ref in todo] + [Item(str(root), rel, "deleted") for rel in gone]
                    for item in items:
                        # Back-pressure: wait for room as long as it takes (a scan that gave up would lose
                        # what it found); only a stop ends the wait.
                        while not self.queue.put(item, timeout=5, background=True):
                            if self.signals.stop_requested or self.queue.closed:
                                return
                    queued += len(todo)
                    gone_total += len(gone)
            self.metrics.discovered.inc(queued)
        except Exception:  # noqa: BLE001 - a failed scan is retried at the next interval
            log.exception("reconcile scan failed")
            return
        log.info("reconcile scan: %d files queued, %d gone, in %.1fs", queued, gone_total, time.monotonic() - start)

    # ---- reload -------------------------------------------------------------------------------
    def reload(self) -> None:
        try:
            new = load_config(self.overrides, self.config_file)
        except ConfigError as exc:
            self.metrics.reloads.labels("failed").inc()
            log.error("reload failed, keeping the running configuration: %s", exc)
            return
        old = self.config
        kept = [k for k in FIXED_ON_RELOAD if getattr(new, k) != getattr(old, k)]
        new = new.model_copy(update={k: getattr(old, k) for k in FIXED_ON_RELOAD})
        if kept:
            log.warning("reload: %s cannot change while running; restart poolwatch to apply", ", ".join(kept))
        model_changed = (any(getattr(new, k) != getattr(old, k) for k in MODEL_KEYS)
                         or any(new.lightly.get(k) != old.lightly.get(k) for k in LIGHTLY_MODEL_KEYS))
        if model_changed and not self._switch_model(new):
            self.metrics.reloads.labels("failed").inc()
            return
        self.config = new
        if new.input_dir != old.input_dir or new.watch != old.watch:
            log.info("reload: restarting the watcher for the new input dirs / watch settings")
            self.watcher.stop()
            self.watcher.join(5)
            self._outages.clear()
            self.watcher = self._make_watcher(new)
            self.watcher.start()
            self._start_reconcile(force=True)
        self.worker.batch_size = new.batch_size
        self.worker.max_batch_wait = float(new.watch.max_batch_wait)
        self.worker.remove_duplicates = new.remove_exact_duplicates
        self.worker.set_model(self.embedder, self.model_id, runtime.decode_settings(new))
        if isinstance(self.executor, DecodePool):
            self.executor.timeout = runtime.decode_timeout(new)
        if new.schedule != old.schedule:
            self.scheduler.apply(new.schedule)
        self.metrics.reloads.labels("ok").inc()
        self.notifier.notify("RELOADING=0", "STATUS=configuration reloaded")
        log.info("configuration reloaded (method %s, n_samples %s, min_distance %s, schedule %s)", new.method,
                 new.stopping_condition.n_samples, new.stopping_condition.min_distance, self.scheduler.description)

    def _switch_model(self, new: Config) -> bool:
        """Load the model the new configuration asks for and make it current; new files use it at once,
        the store is re-embedded in the background, sampling keeps the old model until that is done."""
        from poolwatch.pipeline.embed import ModelError

        try:
            embedder = runtime.load_embedder(new)
        except (ModelError, ConfigError) as exc:
            log.error("reload failed, keeping the running configuration and model: %s", exc)
            return False
        with Store.open(new.store_path, float(new.store.busy_timeout)) as store:
            model_id = activate_model(store, embedder)
            done, total = store.coverage(model_id)
        if model_id == self.model_id:
            log.info("reload: the model is unchanged (same weights and input size)")
            return True
        log.info("reload: model %d (%s) is now current; re-embedding %d of %d images in the background, "
                 "sampling uses model %d until then", model_id, embedder.model.source, total - done, total, self.model_id)
        self.embedder, self.model_id = embedder, model_id
        self.worker.set_model(embedder, model_id, runtime.decode_settings(new))
        self._publish_model()
        self._start_reconcile(force=True)
        return True

    # ---- stopping -----------------------------------------------------------------------------
    def _graceful_stop(self) -> int:
        self.notifier.stopping()
        deadline = time.monotonic() + float(self.config.graceful_timeout)
        self.scheduler.stop()
        self.watcher.stop()
        self.queue.close()
        self.worker.stop()
        self.sampler.stop()
        for thread in (self.worker, self.sampler):
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.worker.is_alive() or self.sampler.is_alive():
            log.error("graceful_timeout (%ss) passed with work unfinished; exiting anyway", self.config.graceful_timeout)
            return 1
        log.info("stopped gracefully")
        return 0

    def _shutdown(self) -> None:
        for stop in (self.scheduler.stop, self.watcher.stop, self.queue.close, self.worker.stop, self.sampler.stop):
            try:
                stop()
            except Exception:  # noqa: BLE001 - best effort on the way out
                log.debug("while shutting down", exc_info=True)
        self.watcher.join(5)
        if self.server is not None:
            self.server.stop()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("poolwatch daemon stopped")
