"""Signal handlers that only record (DESIGN §5): the main loop reads what arrived and acts.

Installed by `poolwatch run` before anything heavy is imported, so a signal during start-up (a trigger,
or `docker stop` of a container whose PID 1 is poolwatch) is kept for the loop instead of killing the
process or being ignored. A second SIGTERM/SIGINT exits at once.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1)
STOP = (signal.SIGTERM, signal.SIGINT)


class SignalRecorder:
    def __init__(self) -> None:
        self.wake = threading.Event()
        self.pending: list[int] = []
        self.stop_requested = False
        self.installed = False

    def install(self) -> SignalRecorder:
        for sig in HANDLED:
            signal.signal(sig, self._record)
        self.installed = True
        return self

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum in STOP:
            if self.stop_requested:
                os.write(2, b"poolwatch: second stop signal, exiting now\n")
                os._exit(1)
            self.stop_requested = True
        self.pending.append(signum)
        self.wake.set()

    def take(self) -> list[int]:
        taken, self.pending[:] = list(self.pending), []
        return taken
