"""The daemon's lifecycle (`poolwatch run`): build the components, let the supervisor start them, tick,
react to signals, stop — read this file first.

Signal handlers only record what arrived and wake the main loop (as uvicorn does); the loop acts:
SIGUSR1 → one sampling run; SIGHUP → reload config.yaml + the original overrides; SIGTERM/SIGINT →
the supervisor's stop sequence (intake ends, the batch in hand and a running sampling run finish
within `graceful_timeout`); a second SIGTERM/SIGINT shortens those waits, and the lock and pid file
are still released.

Components (see docs/ARCHITECTURE.md for who owns what): decoders → models → metrics → worker →
sampler → reconciler → watcher → scheduler, started in that order and stopped in reverse. They read
settings through `self.settings`, which returns the current immutable `Config`; a reload validates a
new one and swaps it in.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import cast

from prometheus_client import CollectorRegistry

from poolwatch.pipeline.config import Config, load_config
from poolwatch.pipeline.errors import EXIT_FAILED, PoolwatchError
from poolwatch.pipeline.store import file_identity

from . import runtime
from .decode_pool import DecodeWorkers
from .ingest_queue import IngestQueue
from .lock import DAEMON_ROLE, ShareLock
from .metrics import Metrics, MetricsServer
from .models import ModelManager, model_changed
from .reconciler import Reconciler
from .sampler import Sampler
from .scheduler import Scheduler
from .signals import STOP, SignalRecorder
from .supervisor import Supervisor
from .systemd import Notifier
from .watcher import Watcher
from .worker import Worker

log = logging.getLogger(__name__)

TICK_SECONDS = 0.25
# Settings that need a new store or server; a reload keeps the running values and says so.
FIXED_ON_RELOAD = ("shared_dir", "store", "metrics")


class Service:
    def __init__(self, config: Config, overrides: list[str], config_file: str | None,
                 registry: CollectorRegistry | None = None, signals: SignalRecorder | None = None) -> None:
        self.config = config
        self.overrides, self.config_file = overrides, config_file
        self.metrics = Metrics(registry, source_cap=config.source.max_sources)
        self.metrics.watch_health(self._component_health)
        self.notifier = Notifier()
        self.signals = signals or SignalRecorder()
        self.supervisor = Supervisor(self.signals.hurry, lambda name: self.metrics.component_restarts.labels(name).inc())
        self.queue = IngestQueue(config.watch.queue_size)

    def settings(self) -> Config:
        """The current configuration snapshot (components call this; a reload replaces it)."""
        return self.config

    # ---- start-up -----------------------------------------------------------------------------
    def run(self) -> int:
        lock = ShareLock(self.config.shared_path, role=DAEMON_ROLE)
        lock.acquire()  # raises LockedError naming the other pid
        try:
            if not self.signals.installed:
                self.signals.install()
            log.info("poolwatch daemon starting (pid %d, shared_dir %s)", os.getpid(), self.config.shared_path)
            self._build()
            # On failure everything started is stopped again and StartError raised; a stop signal
            # during start-up ends it between two components.
            if not self.supervisor.start(abort=self.signals.stopping.is_set):
                return 0
            self.store_identity = None if self.config.store_url else file_identity(self.config.store_path)
            code = EXIT_FAILED
            try:
                if self.config.schedule.on_startup and not self.signals.stop_requested:
                    self.sampler.request("startup")
                self.notifier.ready(f"watching {len(self.config.input_dir)} input dir(s)")
                log.info("poolwatch daemon ready")
                code = self._loop()
            finally:
                code = self._stop(code)  # whatever ended the loop, the one stop sequence runs
            return code
        finally:
            lock.release()
            self.notifier.close()
            log.info("poolwatch daemon stopped")

    def _build(self) -> None:
        cfg, s = self.config, self.settings
        self.decoders = DecodeWorkers(lambda: runtime.decode_executor(cfg, lambda: runtime.decode_timeout(self.settings())))
        self.sampler = Sampler(s, self.metrics)
        self.models = ModelManager(s, self.metrics, sampler_running=lambda: self.sampler.running,
                                   on_switch=lambda: self.reconciler.request())
        self.reconciler = Reconciler(s, self.queue, lambda: self.models.current().model_id, self.metrics,
                                     on_root_back=lambda root: self._watcher().rewatch(root))
        self.worker = Worker(s, self.queue, self.models, self.decoders, self.metrics, self.reconciler.is_outage)
        self.scheduler = Scheduler(s, self.sampler.request)
        sup = self.supervisor
        sup.add(self.decoders)
        sup.add(self.models)
        if cfg.metrics.enabled:
            sup.add(MetricsServer(self.metrics, cfg.metrics.host, cfg.metrics.port, self.health))
        sup.add(self.worker, on_restart=self.reconciler.request)  # what the dead worker held is found again
        sup.add(self.sampler)
        sup.add(self.reconciler)
        sup.add(self._make_watcher(), on_restart=self.reconciler.request)
        sup.add(self.scheduler)

    def _make_watcher(self) -> Watcher:
        cfg = self.config
        return Watcher(cfg.input_paths, self.queue, polling=cfg.watch.polling,
                       settle_seconds=float(cfg.watch.settle_seconds), ignore_patterns=cfg.watch.ignore_patterns,
                       on_discovered=self.metrics.discovered.inc, on_overflow=self._on_overflow,
                       on_lost=self.reconciler.request)

    def _watcher(self) -> Watcher:
        return cast(Watcher, self.supervisor.get("watcher"))

    def _on_overflow(self) -> None:
        """On watchdog's thread: count, say so, and let a reconcile scan find what the lost events said."""
        self.metrics.overflows.inc()
        log.warning("the inotify queue overflowed (events were lost, fs.inotify.max_queued_events); "
                    "rescanning the input dirs")
        self.reconciler.request()

    def _component_health(self) -> dict[str, bool]:
        """For poolwatch_component_healthy: alive, and for the worker also not stalled."""
        states = self.supervisor.alive()
        if "worker" in states:
            states["worker"] = states["worker"] and not self.worker.stalled()
        return states

    def health(self) -> tuple[bool, str]:
        ok, why = self.supervisor.health()
        return ok and not self.worker.stalled(), why

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> int:
        while True:
            self.signals.wake.wait(TICK_SECONDS)
            self.signals.wake.clear()
            for sig in self.signals.take():
                if sig in STOP:
                    log.info("received %s: stopping gracefully (send it again to hurry)", signal.Signals(sig).name)
                    return 0
                if sig == signal.SIGUSR1:
                    log.info("received SIGUSR1: sampling run %s", self.sampler.request("signal"))
                elif sig == signal.SIGHUP:
                    self.reload()
            if not self.config.store_url and file_identity(self.config.store_path) != self.store_identity:
                # Before any restart: a component restarted now would open (and create) a new, empty store.
                log.error("the store %s was removed or replaced while running; stopping (nothing more is written "
                          "to it; start poolwatch again to use a new store)", self.config.store_path)
                return EXIT_FAILED
            self._watcher().tick()
            code = self.supervisor.tick()
            if code is not None:
                return code
            self.metrics.queue_depth.set(len(self.queue))
            self.notifier.watchdog_tick()

    # ---- reload -------------------------------------------------------------------------------
    def reload(self) -> None:
        """Validate the new configuration and swap it in; nothing a reload meets stops the daemon."""
        try:
            self._apply(load_config(self.overrides, self.config_file))
        except PoolwatchError as exc:
            self.metrics.reloads.labels("failed").inc()
            log.error("reload failed, keeping the running configuration: %s", exc)
        except Exception:
            self.metrics.reloads.labels("failed").inc()
            log.exception("reload failed, keeping the running configuration")

    def _apply(self, new: Config) -> None:
        old = self.config
        kept = [k for k in FIXED_ON_RELOAD if getattr(new, k) != getattr(old, k)]
        new = new.model_copy(update={k: getattr(old, k) for k in FIXED_ON_RELOAD})
        if kept:
            log.warning("reload: %s cannot change while running; restart poolwatch to apply", ", ".join(kept))
        if model_changed(old, new) and not self.models.switch(new):
            self.metrics.reloads.labels("failed").inc()
            return
        self.config = new  # from here on every component reads the new snapshot
        if new.schedule != old.schedule:
            self.scheduler.apply(new.schedule)
        if new.input_dir != old.input_dir or new.watch != old.watch:
            log.info("reload: restarting the watcher for the new input dirs / watch settings")
            self.reconciler.request()
            try:
                self.supervisor.replace("watcher", self._make_watcher())
            except Exception as exc:  # the new settings stay; the supervisor retries the watcher's start
                self.metrics.reloads.labels("failed").inc()
                log.error("reload: the watcher could not start with the new settings (%s); retrying with backoff", exc)
                return
        self.metrics.reloads.labels("ok").inc()
        self.notifier.notify("RELOADING=0", "STATUS=configuration reloaded")
        log.info("configuration reloaded (method %s, n_samples %s, min_distance %s, schedule %s)", new.method,
                 new.stopping_condition.n_samples, new.stopping_condition.min_distance, self.scheduler.description)

    # ---- stopping -----------------------------------------------------------------------------
    def _stop(self, code: int) -> int:
        """The one stop sequence (signal, fatal component failure): the supervisor stops everything."""
        self.notifier.stopping()
        timeout = float(self.config.graceful_timeout)
        if self.supervisor.stop(timeout):
            log.info("stopped gracefully")
            return code
        log.error("graceful_timeout (%ss) passed with work unfinished; exiting anyway", timeout)
        return code or EXIT_FAILED
