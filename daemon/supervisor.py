"""The supervisor: owns the daemon's components, starts them in order, restarts the ones that die,
stops them in reverse order — the one stop sequence, for SIGTERM, the graceful timeout, a fatal
component failure and a second SIGTERM alike.

Starting is transactional: when a component fails to start, the ones already started are stopped
and `StartError` (one line, the failed component's exit code) is raised. A component that dies is
restarted with exponential backoff; one that dies `MAX_RESTARTS` times within `RESTART_WINDOW`
makes `tick()` return exit code 1.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from poolwatch.pipeline.errors import EXIT_FAILED, PoolwatchError

from .component import Component

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW = 600.0
STOP_SLICE = 0.1  # a stop waits in slices this long, so a second stop signal shortens it at once
HURRIED_STOP = 2.0  # seconds each remaining component gets once the stop is hurried
STOP_FLOOR = 0.5  # seconds each component gets even when the graceful timeout has passed


class StartError(PoolwatchError):
    """A component could not start; everything that had started was stopped again."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Entry:
    component: Component
    on_restart: Callable[[], None] | None = None
    restarts: list[float] = field(default_factory=list)


class Supervisor:
    def __init__(self, hurry: threading.Event | None = None,
                 on_restart_count: Callable[[str], None] = lambda name: None, backoff: float = 1.0) -> None:
        self.backoff = backoff  # seconds before the first restart; doubled for each further one
        self._entries: list[_Entry] = []
        self._started: list[_Entry] = []
        self._count_restart = on_restart_count
        self.hurry = hurry or threading.Event()  # a second stop signal sets it: remaining waits become short
        self.state = "starting"  # -> running -> stopping

    def add(self, component: Component, on_restart: Callable[[], None] | None = None) -> None:
        self._entries.append(_Entry(component, on_restart))

    def get(self, name: str) -> Component:
        return next(e.component for e in self._entries if e.component.name == name)

    # ---- start ----------------------------------------------------------------------------
    def start(self, abort: Callable[[], bool] = lambda: False) -> bool:
        """Start every component in order; False (all stopped again) when `abort()` turns true between
        two of them (a stop signal during start-up). Raises StartError when one fails to start."""
        for entry in self._entries:
            name = entry.component.name
            if abort():
                log.info("stop requested during start-up; stopping what started")
                self.stop(timeout=10.0)
                return False
            try:
                entry.component.start()
            except Exception as exc:
                log.error("%s failed to start: %s", name, exc)
                self.stop(timeout=10.0)
                code = exc.exit_code if isinstance(exc, PoolwatchError) else EXIT_FAILED
                raise StartError(f"{name} failed to start: {_one_line(exc)}", code) from exc
            self._started.append(entry)
            log.info("started %s", name)
        self.state = "running"
        return True

    def replace(self, name: str, component: Component, timeout: float = 10.0) -> None:
        """Stop the named component and start `component` in its place (a reload that changes it)."""
        entry = next(e for e in self._entries if e.component.name == name)
        entry.component.stop(timeout)
        entry.component = component
        component.start()
        log.info("restarted %s with the new settings", name)

    # ---- supervise ------------------------------------------------------------------------
    def tick(self) -> int | None:
        """Restart dead components (with backoff); an exit code when one keeps dying."""
        now = time.monotonic()
        for entry in self._started:
            c = entry.component
            if c.alive():
                continue
            entry.restarts = [t for t in entry.restarts if now - t < RESTART_WINDOW]
            if len(entry.restarts) >= MAX_RESTARTS:
                log.critical("%s died %d times in %.0f s; exiting so that systemd/docker restarts poolwatch",
                             c.name, len(entry.restarts), RESTART_WINDOW)
                return EXIT_FAILED
            if entry.restarts and now - entry.restarts[-1] < self.backoff * 2 ** len(entry.restarts):
                continue  # back off
            entry.restarts.append(now)
            self._count_restart(c.name)
            log.error("%s stopped unexpectedly; restarting it (%d in the last %.0f s)", c.name, len(entry.restarts),
                      RESTART_WINDOW)
            try:
                c.stop(1.0)
                c.start()
            except Exception:
                log.exception("restarting %s failed", c.name)
                continue
            if entry.on_restart is not None:
                entry.on_restart()
        return None

    def alive(self) -> dict[str, bool]:
        """Each started component: alive or not."""
        return {e.component.name: e.component.alive() for e in self._started}

    def health(self) -> tuple[bool, str]:
        if self.state != "running":
            return False, self.state
        parts = [(e.component.alive(), f"{e.component.name} {e.component.health()}") for e in self._started]
        ok = all(alive for alive, _ in parts)
        return ok, ", ".join(text for _, text in parts)

    # ---- stop -----------------------------------------------------------------------------
    def stop(self, timeout: float) -> bool:
        """Stop every started component within `timeout` in all; True when each stopped in time.

        Two phases: every component is told to stop at once (intake ends, the worker finishes its batch in
        hand while the sampler finishes its run), then each is waited for, last started first, against
        the one deadline."""
        self.state = "stopping"
        deadline = time.monotonic() + timeout
        clean = True
        for entry in reversed(self._started):
            try:
                entry.component.request_stop()
            except Exception:
                log.exception("while asking %s to stop", entry.component.name)
        for entry in reversed(self._started):
            c = entry.component
            own = max(deadline, time.monotonic() + STOP_FLOOR)  # even past the deadline, a short chance
            hurried_at: float | None = None
            while True:
                now = time.monotonic()
                if self.hurry.is_set():
                    hurried_at = hurried_at or now
                    own = min(own, hurried_at + HURRIED_STOP)
                left = own - now
                try:
                    stopped = c.stop(max(0.0, min(STOP_SLICE, left)))
                except Exception:
                    log.exception("while stopping %s", c.name)
                    stopped = True
                if stopped or left <= 0:
                    break
            if not stopped:
                clean = False
                log.error("%s did not stop in time; leaving it", c.name)
            else:
                log.info("stopped %s", c.name)
        self._started.clear()
        self.state = "stopped"
        return clean


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}{f': {exc.filename}' if exc.filename else ''}"
    return text.splitlines()[0]
