"""The watcher in-process: real inotify in a tmp dir, the real IngestQueue, conditions waited on with a
deadline. What is queued (writes, renames in, folders moved in, deletions, ignored names); that nothing
blocks watchdog's dispatch thread when the worker is stalled (the acceptance test); a real kernel queue
overflow reaching `on_overflow`; the watchdog internals the overflow adapter depends on."""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from watchdog.observers.api import BaseObserver

from poolwatch.daemon import watcher as watcher_mod
from poolwatch.daemon.component import Component
from poolwatch.daemon.ingest_queue import IngestQueue, Item
from poolwatch.daemon.watcher import WATCHDOG_VERIFIED, Watcher

inotify = pytest.importorskip("watchdog.observers.inotify", reason="inotify (Linux) only")
inotify_c = pytest.importorskip("watchdog.observers.inotify_c", reason="inotify (Linux) only")

ROOT = Path(__file__).resolve().parents[1]
IGNORE = [".*", "*.tmp"]
MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.01) -> object:
    """Poll `condition` until it is truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Calls:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


@pytest.fixture
def make_watcher() -> Iterator[Callable[..., Watcher]]:
    made: list[Watcher] = []

    def make(roots: list[Path], queue: IngestQueue, **kw: object) -> Watcher:
        kw.setdefault("polling", False)
        kw.setdefault("settle_seconds", 0.2)
        kw.setdefault("ignore_patterns", IGNORE)
        w = Watcher(roots, queue, **kw)  # type: ignore[arg-type]
        made.append(w)
        return w

    yield make
    for w in made:
        assert w.stop(timeout=10), "the watcher did not stop within 10 s"


class Collector:
    """Takes everything the watcher queues, as the worker would."""

    def __init__(self, queue: IngestQueue) -> None:
        self.queue = queue
        self.items: list[Item] = []

    def drain(self) -> list[Item]:
        self.items.extend(self.queue.get_batch(1000, 0, 0))
        return self.items

    def relpaths(self, kind: str = "file") -> Counter[str]:
        return Counter(i.relpath for i in self.drain() if i.kind == kind)

    def barrier(self, root: Path, name: str) -> None:
        """Write `name` and wait for it: every event before it has been dispatched (one ordered stream)."""
        (root / name).write_bytes(b"barrier")
        wait_until(lambda: name in self.relpaths(), 10, f"the barrier file {name}")


def write(path: Path, data: bytes = b"\xff\xd8 not checked here") -> None:
    with open(path, "wb") as fh:  # one open/write/close: IN_CLOSE_WRITE
        fh.write(data)


# ---- what is queued -------------------------------------------------------------------------------
def test_written_renamed_and_moved_in_files_are_queued_once_and_ignored_names_never(
        tmp_path: Path, make_watcher: Callable[..., Watcher]) -> None:
    root, outside = tmp_path / "in", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / ".stage").mkdir()
    queue = IngestQueue(1000)
    discovered: list[int] = []
    w = make_watcher([root], queue, on_discovered=discovered.append)
    w.start()
    got = Collector(queue)

    write(root / "written.jpg")  # written, then closed
    write(outside / "tmp-upload")
    os.replace(outside / "tmp-upload", root / "renamed_in.jpg")  # renamed in from outside the tree
    write(root / ".copy.jpg.tmp")
    os.replace(root / ".copy.jpg.tmp", root / "renamed_inside.jpg")  # cp tmp && mv, inside the tree
    folder = outside / "batch"
    (folder / "nested").mkdir(parents=True)
    for rel in ("one.jpg", "two.png", "nested/three.jpg", "notes.txt", ".hidden.jpg"):
        write(folder / rel)
    os.replace(folder, root / "batch")  # a folder moved in from outside: its files have no events
    for ignored in (".hidden.jpg", "part.tmp", "notes.txt", ".stage/inner.jpg"):
        write(root / ignored)
    got.barrier(root, "zz_barrier.jpg")

    expected = {"written.jpg", "renamed_in.jpg", "renamed_inside.jpg", "batch/one.jpg", "batch/two.png",
                "batch/nested/three.jpg", "zz_barrier.jpg"}
    files = got.relpaths()
    assert set(files) == expected, f"queued {sorted(files)}"
    assert all(n == 1 for n in files.values()), f"queued more than once: {files}"
    assert sum(discovered) == len(expected)
    assert not got.relpaths("deleted"), "nothing was deleted, but .copy.jpg.tmp is ignored"
    assert w.max_dispatch_seconds < 0.1


def test_deletions_are_queued_as_deleted(tmp_path: Path, make_watcher: Callable[..., Watcher]) -> None:
    root, outside = tmp_path / "in", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    for rel in ("gone.jpg", "sub/gone_too.jpg", "moved_out.jpg", ".hidden.jpg", "x.tmp"):
        write(root / rel)
    queue = IngestQueue(1000)
    w = make_watcher([root], queue)
    w.start()
    got = Collector(queue)

    (root / "gone.jpg").unlink()
    (root / "sub" / "gone_too.jpg").unlink()
    os.replace(root / "moved_out.jpg", outside / "moved_out.jpg")  # moved out of the tree: gone from it
    (root / ".hidden.jpg").unlink()
    (root / "x.tmp").unlink()
    expected = {"gone.jpg", "sub/gone_too.jpg", "moved_out.jpg"}
    wait_until(lambda: set(got.relpaths("deleted")) >= expected, 10, f"deleted items for {sorted(expected)}")
    got.barrier(root, "zz_barrier.jpg")
    assert got.relpaths("deleted") == Counter(expected)
    assert set(got.relpaths()) == {"zz_barrier.jpg"}


# ---- the acceptance test: a stalled worker never stalls the dispatch thread -----------------------
def test_a_stalled_worker_never_blocks_the_dispatch_thread_nor_rewatch(
        tmp_path: Path, make_watcher: Callable[..., Watcher], caplog: pytest.LogCaptureFixture) -> None:
    root, outside = tmp_path / "in", tmp_path / "outside"
    root.mkdir()
    rounds = 4  # more rounds of the flood only until a rewatch has met a backlog in the dispatch thread
    for r in range(rounds):
        (outside / f"moved{r}").mkdir(parents=True)
        for i in range(100):
            write(outside / f"moved{r}" / f"m{i:03d}.jpg")
    queue = IngestQueue(5)  # and nobody takes from it: the worker is stalled
    lost = Calls()
    w = make_watcher([root], queue, on_lost=lost)
    w.start()
    assert w.observer is not None
    backlog = w.observer.event_queue

    def flood(r: int) -> None:
        for i in range(200):
            write(root / f"f{r}_{i:03d}.jpg")
        os.replace(outside / f"moved{r}", root / f"moved{r}")  # a folder of 100 files moved in, queue full
        for i in range(3):  # and renamed: each time a burst of 100 moves, faster than they are dispatched
            os.replace(root / (f"moved{r}" if i == 0 else f"renamed{r}_{i - 1}"), root / f"renamed{r}_{i}")

    caplog.set_level(logging.INFO, logger="poolwatch.daemon.watcher")
    w.reset_dispatch_stats()
    rewatches: list[tuple[float, int]] = []  # (seconds, events waiting for the dispatch thread then)
    for r in range(rounds):
        writer = threading.Thread(target=flood, args=(r,), name="flood")
        writer.start()
        try:
            wait_until(lambda: lost.n, 10, "on_lost (the queue is full)", interval=0.001)
            deadline = time.monotonic() + 10
            while (writer.is_alive() or backlog.unfinished_tasks) and time.monotonic() < deadline:
                waiting = backlog.unfinished_tasks
                if waiting < 10 and writer.is_alive() and len(rewatches) > 3 * (r + 1):
                    time.sleep(0.0005)  # enough rewatches without a backlog: wait for one
                    continue
                start = time.monotonic()
                assert w.rewatch(str(root)), "rewatch failed"
                rewatches.append((time.monotonic() - start, waiting))
                time.sleep(0.002)
        finally:
            writer.join(30)
        wait_until(lambda: backlog.unfinished_tasks == 0, 20, "the dispatch thread to work through the flood")
        if any(n >= 10 for _, n in rewatches):
            break
    # A fast machine may dispatch as fast as the kernel reports, so a backlog is not guaranteed; the
    # rewatches ran during the floods either way, while the dispatch thread was busy with them.
    assert rewatches, "no rewatch ran during the floods"
    slowest = max(s for s, _ in rewatches)
    print(f"\nmax dispatch {w.max_dispatch_seconds * 1000:.1f} ms; {len(rewatches)} rewatches during {r + 1} flood(s), "
          f"slowest {slowest * 1000:.1f} ms, up to {max(n for _, n in rewatches)} events waiting for the dispatch "
          f"thread; on_lost {lost.n}x, {w.lost_total} file events left to a reconcile scan")
    assert w.max_dispatch_seconds < 0.1, f"one event held the dispatch thread {w.max_dispatch_seconds:.3f} s"
    assert slowest < 1.0, f"rewatch took {slowest:.3f} s while the dispatch thread was flooded"
    assert len(queue) == 5
    assert w.lost_total > 0 and lost.n >= 1
    assert "queue full" in w.health()
    full = [r for r in caplog.records if r.levelno == logging.WARNING and "ingest queue full" in r.getMessage()]
    assert len(full) == 1, f"one warning per full-queue spell, got {len(full)}"
    # once the worker takes again, the spell ends and new files are queued again at once (a fresh watch
    # first: a rewatch in the middle of a rename may have left its other half to watchdog's pairing delay)
    assert w.rewatch(str(root))
    wait_until(lambda: backlog.unfinished_tasks == 0, 20, "the dispatch thread to finish")
    got = Collector(queue)
    got.drain()
    got.barrier(root, "after.jpg")
    assert "queue full" not in w.health()
    assert any("has room again" in r.getMessage() for r in caplog.records)


def test_a_folder_moved_in_while_the_queue_is_full_is_left_to_a_reconcile_scan(
        tmp_path: Path, make_watcher: Callable[..., Watcher]) -> None:
    root, outside = tmp_path / "in", tmp_path / "outside"
    root.mkdir()
    (outside / "big").mkdir(parents=True)
    for i in range(50):
        write(outside / "big" / f"b{i:02d}.jpg")
    queue = IngestQueue(3)
    for i in range(3):
        queue.put(Item(str(root), f"already{i}.jpg"))
    lost = Calls()
    w = make_watcher([root], queue, on_lost=lost)
    w.start()
    os.replace(outside / "big", root / "big")
    wait_until(lambda: lost.n, 10, "on_lost for the folder moved into a full queue")
    assert w.max_dispatch_seconds < 0.01, "the walk should not even start while the queue is full"
    assert [i.relpath for i in queue.get_batch(10, 0, 0)] == [f"already{i}.jpg" for i in range(3)]


# ---- inotify queue overflow ---------------------------------------------------------------------
def test_a_real_kernel_queue_overflow_calls_on_overflow_and_watching_goes_on(
        tmp_path: Path, make_watcher: Callable[..., Watcher], monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel queue overflows while the reader thread is held (no machine-wide sysctl needed): the
    IN_Q_OVERFLOW event travels the real path, kernel -> watchdog's reader -> the adapter -> on_overflow."""
    limit = int(MAX_QUEUED_EVENTS.read_text())
    if limit > 200_000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overflow it cheaply")
    held, entered = threading.Event(), threading.Event()
    handle_event = watcher_mod.OverflowReportingInotifyFD.handle_event

    def held_handle_event(self: object, event: object) -> None:
        entered.set()
        held.wait(20)
        handle_event(self, event)

    monkeypatch.setattr(watcher_mod.OverflowReportingInotifyFD, "handle_event", held_handle_event)
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    overflows = Calls()
    queue = IngestQueue(1000)
    w = make_watcher([root], queue, on_overflow=overflows)
    w.start()
    noise = root / "noise.txt"
    noise.write_bytes(b"")
    try:
        wait_until(entered.is_set, 10, "the reader thread to take the first event")
        for _ in range(limit // 2 + 1000):  # IN_OPEN + IN_CLOSE_NOWRITE each: past the kernel's limit
            os.close(os.open(noise, os.O_RDONLY))
    finally:
        held.set()
    wait_until(lambda: overflows.n, 30, "on_overflow after the kernel queue overflowed")
    assert overflows.n == 1
    # watchdog rebuilt its watches: a file written now is seen through its own event
    write(root / "sub" / "late.jpg")
    wait_until(lambda: any(i.relpath == "sub/late.jpg" for i in queue.get_batch(100, 0, 0)), 10,
               "a file written after the overflow")


def test_the_adapter_reports_overflow_events_only() -> None:
    calls = Calls()
    reader = watcher_mod.OverflowReportingInotifyFD(calls)
    reader.start()
    try:
        c = inotify_c.InotifyConstants
        reader.handle_event(inotify_c.InotifyEvent(12345, c.IN_CLOSE_WRITE, 0, b"x.jpg"))
        assert calls.n == 0
        reader.handle_event(inotify_c.InotifyEvent(-1, c.IN_Q_OVERFLOW, 0, b""))
        assert calls.n == 1
    finally:
        reader.stop()
        reader.join(5)
    assert not reader.is_alive()


def test_watchdog_still_has_what_the_overflow_adapter_depends_on() -> None:
    """Fails, naming the version and the attribute, when the installed watchdog moves away from what
    daemon/watcher.py's OverflowReportingInotifyFD/Observer were proven on."""
    version = importlib.metadata.version("watchdog")
    where = f"watchdog {version} (the overflow adapter in daemon/watcher.py is proven on watchdog{WATCHDOG_VERIFIED})"
    assert SpecifierSet(WATCHDOG_VERIFIED).contains(version), (
        f"{where}: re-run tests/test_watcher.py's overflow tests against it, then widen WATCHDOG_VERIFIED "
        "and the pin in pyproject.toml")
    pin = f'"watchdog{WATCHDOG_VERIFIED}"'
    assert pin in (ROOT / "pyproject.toml").read_text(), f"pyproject.toml's dependencies must pin {pin}"

    fd_cls, event_cls = inotify_c.InotifyFD, inotify_c.InotifyEvent
    assert inspect.isfunction(getattr(fd_cls, "handle_event", None)), \
        f"{where}: watchdog.observers.inotify_c.InotifyFD.handle_event is gone"
    assert list(inspect.signature(fd_cls.handle_event).parameters) == ["self", "event"], \
        f"{where}: InotifyFD.handle_event(event) changed its signature"
    assert "IN_Q_OVERFLOW" in inspect.getsource(fd_cls.read_events), \
        f"{where}: InotifyFD.read_events no longer keeps IN_Q_OVERFLOW (wd -1) events"
    assert isinstance(getattr(event_cls, "is_queue_overflow", None), property), \
        f"{where}: InotifyEvent.is_queue_overflow is gone"
    assert callable(getattr(inotify.InotifyWatchGroup, "on_queue_overflow", None)), \
        f"{where}: InotifyWatchGroup.on_queue_overflow (the watch rebuild after an overflow) is gone"
    assert "inotify_fd" in inspect.signature(inotify.InotifyFullEmitter.__init__).parameters, \
        f"{where}: InotifyEmitter no longer takes inotify_fd="
    kinds = [p.kind for p in inspect.signature(BaseObserver.__init__).parameters.values()]
    assert inspect.Parameter.VAR_KEYWORD in kinds, \
        f"{where}: BaseObserver.__init__ no longer forwards **kwargs to its emitters"


def test_events_travel_through_the_adapters_reader(tmp_path: Path, make_watcher: Callable[..., Watcher],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The emitters really read from our reader (BaseObserver forwarded inotify_fd=), not watchdog's
    shared one: otherwise an overflow would never reach the adapter."""
    seen: list[object] = []
    handle_event = watcher_mod.OverflowReportingInotifyFD.handle_event

    def counting(self: object, event: object) -> None:
        seen.append(event)
        handle_event(self, event)

    monkeypatch.setattr(watcher_mod.OverflowReportingInotifyFD, "handle_event", counting)
    root = tmp_path / "in"
    root.mkdir()
    queue = IngestQueue(10)
    w = make_watcher([root], queue)
    w.start()
    assert isinstance(w.observer, watcher_mod.OverflowReportingInotifyObserver)
    Collector(queue).barrier(root, "seen.jpg")
    assert seen, "the file's events did not pass through OverflowReportingInotifyFD"


# ---- the component ------------------------------------------------------------------------------
def test_component_start_health_rewatch_stop(tmp_path: Path, make_watcher: Callable[..., Watcher]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    queue = IngestQueue(10)
    w = make_watcher([a, b], queue)
    assert w.name == "watcher" and isinstance(w, Component)
    assert w.health() == "DEAD" and not w.alive()
    w.start()
    assert w.alive()
    assert w.health() == "inotify, 1 of 2 roots"
    b.mkdir()  # the missing root comes back
    assert w.rewatch(str(b))
    assert w.health() == "inotify, 2 roots"
    Collector(queue).barrier(b, "in_b.jpg")
    assert w.stop(timeout=5) is True
    assert not w.alive() and w.health() == "stopped"
    assert w.stop(timeout=5) is True  # twice is harmless
    w.start()  # and it starts again (the supervisor's restart)
    assert w.health() == "inotify, 2 roots"
    Collector(queue).barrier(a, "in_a.jpg")
    assert w.stop(timeout=5) is True


def test_polling_component_stops(tmp_path: Path, make_watcher: Callable[..., Watcher]) -> None:
    root = tmp_path / "in"
    root.mkdir()
    w = make_watcher([root], IngestQueue(10), polling=True)
    w.start()
    assert w.health() == "polling, 1 root"
    assert w.stop(timeout=5) is True
    assert not w.alive()
