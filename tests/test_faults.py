"""Faults: a full disk, a locked database, a crashing sampling run, a second SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import FAST, encode, photo, run_cli
from .test_daemon import Daemon, query, wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


def images(folder: Path, n: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        (folder / f"img_{i:03d}.jpg").write_bytes(encode(photo(i), "JPEG"))


@pytest.fixture
def small_disk(tmp_path: Path):
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@needs_root
def test_disk_full_fails_the_run_cleanly_and_the_next_one_succeeds(tmp_path: Path, small_disk: Path) -> None:
    inp, shared = tmp_path / "in", small_disk / "shared"
    images(inp, 30)
    assert run_cli("ingest", f"input_dir={inp}", f"shared_dir={shared}", *FAST).returncode == 0
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 64 * 1024))  # leave 64 KiB: the dump cannot fit
    proc = run_cli("sample", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "stopping_condition.n_samples=1.0",
                   "dump_dataset=true", "output_image_size=[256,256]")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr.strip().splitlines()[-1]
    runs = shared / "runs"
    assert not [p for p in runs.iterdir() if not p.name.startswith(".")] if runs.exists() else True
    assert not [p for p in runs.iterdir() if p.name.startswith(".tmp-")] if runs.exists() else True
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT status FROM runs").fetchall() == [("failed",)]
        assert conn.execute("SELECT COUNT(*) FROM decisions").fetchone() == (0,)
    filler.unlink()  # space is back
    proc = run_cli("sample", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "stopping_condition.n_samples=5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["n_selected"] == 5


@needs_root
@pytest.mark.usefixtures("own_artifact_cache")  # the model's export is among what does not fit
def test_disk_full_leaves_no_temp_file_and_the_retry_succeeds(tmp_path: Path, small_disk: Path) -> None:
    inp, shared = tmp_path / "in", small_disk / "shared"
    images(inp, 3)
    filler = small_disk / "filler"
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - 2 * 1024 * 1024))  # 2 MiB left: the store fits, the weights do not
    proc = run_cli("ingest", f"input_dir={inp}", f"shared_dir={shared}", *FAST)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr.strip().splitlines()[-1]
    assert [p.name for p in small_disk.rglob(".*") if p.is_file()] == []  # before: models/.random-...pt-XXXX
    filler.unlink()
    proc = run_cli("ingest", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] == 3


LOCKER = r"""
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
"""


def test_locked_database_is_waited_for_then_written(tmp_path: Path) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 5)
    assert run_cli("ingest", f"input_dir={inp}", f"shared_dir={shared}", *FAST).returncode == 0
    images(inp, 5, start=100)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(shared / "poolwatch.db"), "4"], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert locker.stdout.readline().strip() == "locked"
        started = time.monotonic()
        proc = run_cli("ingest", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "store.busy_timeout=60")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout.strip().splitlines()[-1])["ok"] == 5
        assert locker.wait(timeout=30) == 0
        assert time.monotonic() - started > 0  # it waited for the lock instead of failing
    finally:
        if locker.poll() is None:
            locker.kill()


def test_a_crashing_sampling_run_is_recorded_and_the_daemon_carries_on(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 12)
    shared.mkdir()
    d = Daemon(tmp_path, [inp], shared, "stopping_condition.n_samples=3")
    daemons.append(d)
    d.start()
    wait_for(lambda: query(shared, "SELECT COUNT(*) FROM images WHERE status = 'ok'")[0][0] == 12, 60, "ingest", d)
    runs = shared / "runs"
    runs.mkdir(exist_ok=True)
    # The run folder cannot be created: the run's outputs live where a file now sits.
    os.rename(runs, shared / "runs-away")
    runs.write_text("not a directory")
    d.send(signal.SIGUSR1)
    wait_for(lambda: query(shared, "SELECT status FROM runs") == [("failed",)], 60, "a failed run", d)
    wait_for(lambda: d.metric("poolwatch_sampling_runs_total", trigger="signal", outcome="failed") == 1, 30, "metric", d)
    runs.unlink()
    os.rename(shared / "runs-away", runs)
    d.send(signal.SIGUSR1)
    wait_for(lambda: ("ok",) in query(shared, "SELECT status FROM runs"), 60, "the next run to succeed", d)
    assert d.stop() == 0


def test_second_sigterm_hurries_the_stop_and_still_tears_down(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 60)
    d = Daemon(tmp_path, [inp], shared, "stopping_condition.n_samples=1.0", "dump_dataset=true",
               "output_image_size=[1024,1024]", "graceful_timeout=120")
    daemons.append(d)
    d.start()
    wait_for(lambda: query(shared, "SELECT COUNT(*) FROM images WHERE status = 'ok'")[0][0] == 60, 60, "ingest", d)
    d.send(signal.SIGUSR1)
    wait_for(lambda: (shared / "runs").is_dir() and any(p.name.startswith(".tmp-") for p in (shared / "runs").iterdir()),
             60, "the run's write phase", d)
    d.send(signal.SIGTERM)
    wait_for(lambda: "stopping gracefully" in d.log(), 10, "the first SIGTERM to be taken", d)
    started = time.monotonic()
    d.send(signal.SIGTERM)
    assert d.proc.wait(timeout=10) == 1  # the run did not finish
    assert time.monotonic() - started < 5  # not the 120 s graceful timeout
    assert not (shared / "poolwatch.pid").exists(), d.tail()  # teardown ran: pid file gone, lock released
    assert "poolwatch daemon stopped" in d.log()
    with sqlite3.connect(shared / "poolwatch.db") as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT COUNT(*) FROM decisions").fetchone() == (0,)


def caught_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line for line in fh if line.startswith("SigCgt:")).split()[1], 16)


def test_signals_during_start_up_are_kept_not_fatal(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 6)
    d = Daemon(tmp_path, [inp], shared, "stopping_condition.n_samples=2")
    daemons.append(d)
    d.start(wait_ready=False)
    # As soon as the handlers are in (long before the model is loaded), a trigger is recorded...
    wait_for(lambda: caught_signals(d.pid) & (1 << (signal.SIGUSR1 - 1)), 30, "the early signal handlers", d)
    assert "poolwatch daemon ready" not in d.log()
    d.send(signal.SIGUSR1)
    # ...and acted on once the daemon is up.
    wait_for(lambda: query(shared, "SELECT trigger, status FROM runs") == [("signal", "ok")], 120, "the run", d)
    assert d.stop() == 0
