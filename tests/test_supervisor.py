"""The supervisor in-process, with real threads: transactional start, restarts with backoff, the one
stop sequence (reverse order, bounded, hurried by a second stop signal)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from poolwatch.daemon.component import Component, ThreadComponent
from poolwatch.daemon.supervisor import MAX_RESTARTS, StartError, Supervisor
from poolwatch.pipeline.errors import EXIT_USAGE, ModelError


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


class Looping(ThreadComponent):
    """Loops until told to stop; `crash` makes it die; `linger` makes its stop take that long."""

    def __init__(self, name: str, log: list[str], linger: float = 0.0) -> None:
        super().__init__()
        self.name, self.log, self.linger = name, log, linger
        self.crash = threading.Event()
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.log.append(f"start {self.name}")
        super().start()

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            self.log.append(f"asked {self.name}")
        super().request_stop()

    def run(self) -> None:
        while not self.stopping.wait(0.01):
            if self.crash.is_set():
                self.crash.clear()
                raise RuntimeError(f"{self.name} crashed")
        deadline = time.monotonic() + self.linger
        while time.monotonic() < deadline:  # a batch that takes its time to finish
            time.sleep(0.01)
        self.log.append(f"stopped {self.name}")


class FailsToStart:
    name = "metrics"

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def start(self) -> None:
        raise self.exc

    def request_stop(self) -> None:
        pass

    def stop(self, timeout: float) -> bool:
        return True

    def alive(self) -> bool:
        return False

    def health(self) -> str:
        return "DEAD"


def test_components_follow_the_protocol() -> None:
    assert isinstance(Looping("a", []), Component)
    assert isinstance(FailsToStart(OSError()), Component)


def test_a_failed_start_stops_what_had_started_and_says_why_in_one_line() -> None:
    log: list[str] = []
    sup = Supervisor()
    first, second = Looping("decoders", log), Looping("models", log)
    sup.add(first)
    sup.add(second)
    sup.add(FailsToStart(OSError(98, "Address already in use")))
    sup.add(Looping("never", log))
    with pytest.raises(StartError) as info:
        sup.start()
    assert str(info.value) == "metrics failed to start: Address already in use"
    assert info.value.exit_code == 1
    assert log[:4] == ["start decoders", "start models", "asked models", "asked decoders"]  # reverse order
    assert sorted(log[4:]) == ["stopped decoders", "stopped models"]
    assert not first.alive() and not second.alive()
    assert sup.health() == (False, "stopped")
    # A domain error keeps its own exit code.
    sup = Supervisor()
    sup.add(FailsToStart(ModelError("checkpoint: no such file")))
    with pytest.raises(StartError) as info:
        sup.start()
    assert info.value.exit_code == EXIT_USAGE


def test_a_crashed_component_is_restarted_with_backoff_then_the_daemon_gives_up() -> None:
    log: list[str] = []
    restarted: list[str] = []
    counted: list[str] = []
    sup = Supervisor(on_restart_count=counted.append, backoff=0.02)
    worker = Looping("worker", log)
    sup.add(worker, on_restart=lambda: restarted.append("rescan"))
    sup.start()
    assert sup.health() == (True, "worker alive")
    for n in range(1, MAX_RESTARTS + 1):
        worker.crash.set()
        wait_for(lambda: not worker.alive(), 5, "the crash")
        assert sup.health()[0] is False
        wait_for(lambda n=n: sup.tick() is None and worker.starts == n + 1, 5, f"restart {n}")
        assert worker.alive()
    assert counted == ["worker"] * MAX_RESTARTS and restarted == ["rescan"] * MAX_RESTARTS
    worker.crash.set()
    wait_for(lambda: not worker.alive(), 5, "the last crash")
    assert sup.tick() == 1  # too many restarts in the window: exit non-zero
    assert sup.stop(1.0)


def test_stop_is_reverse_order_and_a_second_signal_hurries_it() -> None:
    log: list[str] = []
    hurry = threading.Event()
    sup = Supervisor(hurry)
    for c in (Looping("models", log), Looping("worker", log, linger=6.0), Looping("watcher", log)):
        sup.add(c)
    sup.start()
    timer = threading.Timer(0.3, hurry.set)  # what a second SIGTERM does
    timer.start()
    started = time.monotonic()
    clean = sup.stop(timeout=60.0)
    took = time.monotonic() - started
    timer.join()
    assert not clean  # the worker's batch did not finish
    assert took < 5.0, took  # not the 60 s graceful timeout, nor the 6 s batch
    # Every part is told at once, last started first; then each is waited for.
    assert log[:6] == ["start models", "start worker", "start watcher", "asked watcher", "asked worker", "asked models"]
    assert {"stopped watcher", "stopped models"} <= set(log) and "stopped worker" not in log
    # The lingering worker thread finishes on its own; the autouse fixture waits up to 10 s for threads.


def test_stop_waits_for_work_in_hand_within_the_timeout() -> None:
    log: list[str] = []
    sup = Supervisor()
    sup.add(Looping("worker", log, linger=0.3))
    sup.start()
    assert sup.stop(timeout=10.0)
    assert log == ["start worker", "asked worker", "stopped worker"]
