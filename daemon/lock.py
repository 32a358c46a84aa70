"""One poolwatch process writes a shared_dir at a time: an flock'd lock file plus a pid file.

`poolwatch run` holds the lock for its lifetime; one-shot commands that write (`ingest`, `sample`,
`train`, `datapool import/restore`) hold it while they run. The pid file records the holder's pid and
its role (`run` for the daemon), so `poolwatch trigger` signals only a live daemon: the lock must be
held, the role must be `run`, and the process must be a poolwatch process.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

from poolwatch.pipeline.atomic import replacing
from poolwatch.pipeline.errors import PoolwatchError, StateError

DAEMON_ROLE = "run"


class LockedError(PoolwatchError):
    """Another poolwatch process owns this shared_dir."""


@dataclass(frozen=True)
class Holder:
    pid: int
    role: str


class ShareLock:
    def __init__(self, shared: Path, role: str = "oneshot") -> None:
        self.shared = shared
        self.role = role
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
            other = read_holder(self.shared)
            who = f" (pid {other.pid}, `poolwatch {other.role}`)" if other else ""
            raise LockedError(
                f"another poolwatch process{who} is using {self.shared}; "
                "stop it first, or send a running daemon `poolwatch trigger` for a sampling run"
            ) from None
        self._fd = fd
        with replacing(self.pid_path, "w") as fh:
            fh.write(f"{os.getpid()} {self.role}\n")

    def release(self) -> None:
        if self._fd is None:
            return
        holder = read_holder(self.shared)
        if holder is not None and holder.pid == os.getpid():
            self.pid_path.unlink(missing_ok=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> ShareLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def read_holder(shared: Path) -> Holder | None:
    """What the pid file says (`<pid> <role>`; a bare pid from an older poolwatch reads as role `run`)."""
    try:
        words = (shared / "poolwatch.pid").read_text().split()
        return Holder(int(words[0]), words[1] if len(words) > 1 else DAEMON_ROLE)
    except (OSError, ValueError, IndexError):
        return None


def lock_holders(shared: Path) -> set[int] | None:
    """The pids that hold an flock on the lock file, as /proc/locks names them in this PID namespace
    (a holder in another namespace shows up with another pid, or none); None where /proc/locks is missing."""
    try:
        st = os.stat(shared / "poolwatch.lock")
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 00:2a:5678 0 EOF" (a blocked waiter has "->" after the number)
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue
        if fields[5] == want and fields[4].isdigit():
            holders.add(int(fields[4]))
    return holders


def is_locked(shared: Path) -> bool:
    """Whether some process holds the lock now (probed with a shared, non-blocking flock)."""
    try:
        fd = os.open(shared / "poolwatch.lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's lock
    return False


def _is_poolwatch(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"poolwatch" in part for part in cmdline)


def running_daemon(shared: Path) -> int:
    """The pid of the live `poolwatch run` daemon of this shared_dir, or StateError saying why not."""
    pid_file = shared / "poolwatch.pid"
    holder = read_holder(shared)
    holders = lock_holders(shared)
    if holder is not None and holders is not None and holders and holder.pid not in holders:
        raise StateError(f"no running daemon for {shared} that this process can signal: pid {holder.pid} from "
                         f"{pid_file} does not hold the lock here (a daemon in another PID namespace, e.g. "
                         "another container: trigger it there, or `docker kill --signal=USR1`)")
    if holder is not None and holder.pid == os.getpid():
        raise StateError(f"no running daemon for {shared}: {pid_file} names this very process (pid {holder.pid}; "
                         "a daemon in another PID namespace?)")
    locked = bool(holders) if holders is not None else is_locked(shared)  # /proc/locks, else a probe
    if not locked:
        stale = f" ({pid_file} is stale: pid {holder.pid})" if holder else ""
        raise StateError(f"no running daemon for {shared}{stale}")
    if holder is None:
        raise StateError(f"no running daemon for {shared}: the lock is held but {pid_file} is missing or unreadable")
    if holder.role != DAEMON_ROLE:
        raise StateError(f"no running daemon for {shared}: pid {holder.pid} is a one-shot `poolwatch {holder.role}`, "
                         "which takes no trigger; a sampling run follows `poolwatch sample`")
    if not _is_poolwatch(holder.pid):
        raise StateError(f"no running daemon for {shared}: pid {holder.pid} from {pid_file} is not a poolwatch process")
    return holder.pid
