"""One poolwatch process writes a shared_dir at a time: an flock'd lock file plus a pid file.

`poolwatch run` holds the lock for its lifetime; one-shot commands that write (`ingest`, `sample`,
`datapool`) hold it while they run. The pid file lets `poolwatch trigger` find the daemon.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockedError(RuntimeError):
    """Another poolwatch process owns this shared_dir."""


class ShareLock:
    def __init__(self, shared: Path) -> None:
        self.shared = shared
        self.lock_path = shared / "poolwatch.lock"
        self.pid_path = shared / "poolwatch.pid"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.shared.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = read_pid(self.shared)
            raise LockedError(
                f"another poolwatch process{f' (pid {other})' if other else ''} is using {self.shared}; "
                "stop it first, or send it `poolwatch trigger` to run a sampling run"
            ) from None
        self._fd = fd
        tmp = self.pid_path.with_suffix(".pid.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, self.pid_path)

    def release(self) -> None:
        if self._fd is None:
            return
        if read_pid(self.shared) == os.getpid():
            self.pid_path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ShareLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_pid(shared: Path) -> int | None:
    try:
        return int((shared / "poolwatch.pid").read_text().strip())
    except (OSError, ValueError):
        return None
