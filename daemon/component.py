"""The protocol every daemon component follows, and a base class for the ones that are one thread.

The supervisor (`daemon/supervisor.py`) starts components in order, checks `alive()` on every tick,
restarts a dead one with backoff, and stops them in reverse order. A component reads its settings
through a callable that returns the daemon's current immutable `Config` snapshot; a reload swaps the
snapshot, it never pushes fields into a component.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

log = logging.getLogger(__name__)


@runtime_checkable
class Component(Protocol):
    name: str

    def start(self) -> None:
        """Start, or raise; a component that raised holds nothing (no thread, socket or process left)."""

    def request_stop(self) -> None:
        """Begin stopping without waiting: take no new work (the stop sequence tells every component this
        first, then waits for each in reverse start order)."""

    def stop(self, timeout: float) -> bool:
        """Stop within `timeout` seconds (finishing the work in hand where it can); True when it did."""

    def alive(self) -> bool:
        """Running as it should; False after a crash (the supervisor restarts it) or a stop."""

    def health(self) -> str:
        """One short phrase for /healthz ("alive", "idle", "3 files queued", ...)."""


class ThreadComponent(ABC):
    """A component whose work is `run()` on one thread. `run` returns when `stopping` is set; an
    exception that escapes it is logged, kept in `error`, and makes the component dead."""

    name = "thread"

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    @abstractmethod
    def run(self) -> None:
        """The component's work; returns once `stopping` is set."""

    def _main(self) -> None:
        try:
            self.run()
        except BaseException as exc:
            self.error = exc
            log.exception("%s failed", self.name)

    def start(self) -> None:
        self.stopping.clear()
        self.error = None
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop; subclasses wake whatever it waits on."""
        self.stopping.set()

    def stop(self, timeout: float) -> bool:
        self.request_stop()
        return self.join(timeout)

    def join(self, timeout: float | None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.stopping.is_set()

    def health(self) -> str:
        return "alive" if self.alive() else "DEAD"
