"""Signal handlers that only record (DESIGN §6): the main loop reads what arrived and acts.

Installed by `poolwatch run` before anything heavy is imported, so a signal during start-up (a trigger,
or `docker stop` of a container whose PID 1 is poolwatch) is kept for the loop instead of killing the
process or being ignored. A second SIGTERM/SIGINT sets `hurry`: the stop sequence that is running
shortens its waits, but still tears down (lock released, pid file removed). Only SIGKILL skips that.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
STOP = (signal.SIGTERM, signal.SIGINT)


class SignalRecorder:
    def __init__(self) -> None:
        self.wake = threading.Event()
        self.stopping = threading.Event()  # the first stop signal
        self.hurry = threading.Event()  # the second one
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self.installed = False

    @property
    def stop_requested(self) -> bool:
        return self.stopping.is_set()

    def install(self) -> SignalRecorder:
        for sig in HANDLED:
            signal.signal(sig, self._record)
        self.installed = True
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum in STOP:
            if self.stopping.is_set():
                self.hurry.set()
            self.stopping.set()
        self._pending.append(signum)  # list.append is atomic; the handler never takes a lock
        self.wake.set()

    def take(self) -> list[int]:
        with self._lock:
            taken = self._pending[:]
            del self._pending[:len(taken)]
        return taken
