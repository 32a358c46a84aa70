"""Load: a flood of files against a small bounded queue (back-pressure, nothing lost), and a real inotify
queue overflow (events lost in the kernel) that the reconcile scan recovers. The real daemon, real
inotify; bench/load.py is the 20,000-file version with its figures in docs/RELIABILITY.md."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from .conftest import encode, photo
from .test_daemon import Daemon, query, wait_for

MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


def blobs(n: int, seed: int = 0) -> list[bytes]:
    return [encode(photo(seed + i, (48, 36))) for i in range(n)]


def flood(folder: Path, data: list[bytes], prefix: str) -> None:
    """As fast as possible: one open/write/close per file, no pause."""
    for i, blob in enumerate(data):
        with open(folder / f"{prefix}{i:05d}.jpg", "wb") as fh:
            fh.write(blob)


def settled(shared: Path, root: Path, n: int) -> bool:
    """Every file of the flood has exactly one row, checked from its complete bytes (no partial verdicts)."""
    rows = query(shared, "SELECT status, count(*) FROM images WHERE root = ? GROUP BY status", (str(root),))
    return dict(rows) == {"ok": n}


def consistent(shared: Path, root: Path, n: int) -> None:
    assert query(shared, "SELECT count(*), count(DISTINCT relpath) FROM images WHERE root = ?", (str(root),)) == [(n, n)]
    assert query(shared, "SELECT count(*) FROM images i WHERE status = 'ok' AND NOT EXISTS "
                         "(SELECT 1 FROM embeddings e WHERE e.image_id = i.id)") == [(0,)]
    assert query(shared, "PRAGMA integrity_check") == [("ok",)]


def test_flood_against_a_small_queue_loses_nothing(tmp_path: Path) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    inp.mkdir()
    n, queue_size = 1200, 40
    data = blobs(n)
    d = Daemon(tmp_path, [inp], shared, f"watch.queue_size={queue_size}", "watch.rescan_interval=0").start()
    depths: list[float] = []
    done = threading.Event()

    def sample_depth() -> None:
        while not done.is_set():
            depths.append(d.metric("poolwatch_ingest_queue_depth"))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample_depth, daemon=True)
    sampler.start()
    start = time.monotonic()
    flood(inp, data, "f")
    written = time.monotonic() - start
    wait_for(lambda: settled(shared, inp, n), 240, f"{n} files committed", d)
    done.set()
    sampler.join(5)
    print(f"{n} files written in {written:.1f}s, all committed after {time.monotonic() - start:.1f}s; "
          f"queue depth max {max(depths):.0f} (bound {queue_size} per lane) over {len(depths)} samples")
    consistent(shared, inp, n)
    assert max(depths) <= 2 * queue_size  # the foreground and background lanes, each bounded
    assert d.ingested_total() >= n
    assert d.stop() == 0


@pytest.fixture
def tiny_inotify_queue():
    """fs.inotify.max_queued_events is read when an inotify instance is made: lowered for the daemon's
    start only, then put back (it is machine-wide)."""
    try:
        old = MAX_QUEUED_EVENTS.read_text()
        MAX_QUEUED_EVENTS.write_text("32")
    except OSError as exc:
        pytest.skip(f"cannot lower fs.inotify.max_queued_events here: {exc}")
    try:
        yield lambda: MAX_QUEUED_EVENTS.write_text(old)
    finally:
        MAX_QUEUED_EVENTS.write_text(old)


def test_inotify_overflow_is_recovered_by_a_reconcile_scan(tmp_path: Path, tiny_inotify_queue) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    (inp / "sub").mkdir(parents=True)
    n = 1500
    data = blobs(n, seed=10_000)
    d = Daemon(tmp_path, [inp], shared, "watch.queue_size=100", "watch.rescan_interval=0")
    d.start()  # its inotify instance now has a 32-event queue
    tiny_inotify_queue()
    start = time.monotonic()
    flood(inp, data[: n // 2], "o")
    flood(inp / "sub", data[n // 2:], "s")
    wait_for(lambda: d.metric("poolwatch_watcher_overflows_total") >= 1, 60, "an inotify overflow", d)
    wait_for(lambda: settled(shared, inp, n), 240, f"{n} files committed after the overflow", d)
    print(f"{n} files, {d.metric('poolwatch_watcher_overflows_total'):.0f} overflow(s), "
          f"consistent after {time.monotonic() - start:.1f}s")
    consistent(shared, inp, n)
    assert "rescanning the input dirs" in d.log()
    # after the overflow the watches were rebuilt: a new file is seen through its event again
    (inp / "sub" / "late.jpg").write_bytes(encode(photo(99_999, (48, 36))))
    wait_for(lambda: query(shared, "SELECT status FROM images WHERE relpath = 'sub/late.jpg'") == [("ok",)], 60,
             "a file written after the overflow", d)
    assert d.stop() == 0


def test_files_closed_again_while_in_flight_are_checked_once(tmp_path: Path) -> None:
    """Each new file is opened for writing and closed again, over and over for a moment (an application
    that rewrites a file's metadata in place): with the queue otherwise empty, such an event meets the file
    in the batch still in flight. Each file is still checked and counted once, and its row is right."""
    inp, shared = tmp_path / "in", tmp_path / "shared"
    inp.mkdir()
    n = 20
    # a model slow enough (input 64) that a batch is in flight for a while
    d = Daemon(tmp_path, [inp], shared, "watch.max_batch_wait=0", "lightly.collate.input_size=64").start()
    for i, blob in enumerate(blobs(n, seed=20_000)):
        path = inp / f"t{i:05d}.jpg"
        path.write_bytes(blob)
        until = time.monotonic() + 0.3
        while time.monotonic() < until:
            with open(path, "r+b"):
                pass  # IN_CLOSE_WRITE, same size and mtime
    wait_for(lambda: settled(shared, inp, n), 300, f"{n} files committed", d)
    d.wait_idle()
    consistent(shared, inp, n)
    assert d.ingested_total() == n
    assert d.stop() == 0

