"""The daemon's process lifecycle as a user meets it: `poolwatch trigger` signals only a live daemon,
two SIGTERMs still tear down, a start that fails half-way (metrics port in use) leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from poolwatch.daemon.lock import ShareLock

from .conftest import encode, photo, run_cli
from .test_daemon import Daemon, query, wait_for


def images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"img_{i:03d}.jpg").write_bytes(encode(photo(7000 + i)))


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies are dead)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


class OnPort(Daemon):
    fixed_port = 0

    def args(self, port: int) -> list[str]:
        return super().args(self.fixed_port)


def test_trigger_never_signals_a_process_that_is_not_the_daemon(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        # A stale pid file naming an unrelated live process (its pid was reused); the bare-pid format of
        # earlier versions, which they signalled without a check.
        (shared / "poolwatch.pid").write_text(f"{sleeper.pid}\n")
        (shared / "poolwatch.lock").touch()
        proc = run_cli("trigger", f"shared_dir={shared}", timeout=60)
        assert proc.returncode == 1, proc.stderr
        assert "no running daemon" in proc.stderr and "stale" in proc.stderr, proc.stderr
        assert sleeper.poll() is None, "the unrelated process was signalled"
        # No pid file at all.
        (shared / "poolwatch.pid").unlink()
        proc = run_cli("trigger", f"shared_dir={shared}", timeout=60)
        assert proc.returncode == 1 and "no running daemon" in proc.stderr, proc.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    # A one-shot command holds the lock (here: this test process, as `poolwatch ingest` would): it has no
    # SIGUSR1 handler, so a trigger would kill it. It is refused; were it not, pytest itself would die here.
    with ShareLock(shared, role="ingest"):
        proc = run_cli("trigger", f"shared_dir={shared}", timeout=60)
    assert proc.returncode == 1 and "one-shot" in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if line.startswith("poolwatch: error:")]) == 1


def test_trigger_reaches_a_running_daemon_and_two_sigterms_still_tear_down(tmp_path: Path,
                                                                            daemons: list[Daemon]) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 40)
    d = Daemon(tmp_path, [inp], shared, "stopping_condition.n_samples=5")
    daemons.append(d)
    d.start()
    wait_for(lambda: query(shared, "SELECT count(*) FROM images WHERE status = 'ok'")[0][0] == 40, 60, "ingest", d)
    proc = run_cli("trigger", f"shared_dir={shared}", timeout=60)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: query(shared, "SELECT trigger, status FROM runs") == [("signal", "ok")], 60, "the run", d)

    # A second SIGTERM while the first one's stop sequence runs (a sampling run in progress) hurries it.
    d.send(signal.SIGUSR1)
    wait_for(lambda: d.count_log("sampling run started") == 2, 30, "the second run to start", d)
    d.send(signal.SIGTERM)
    wait_for(lambda: "stopping gracefully" in d.log(), 30, "the first SIGTERM to be handled", d)
    d.send(signal.SIGTERM)
    assert d.proc is not None
    code = d.proc.wait(30)
    assert code in (0, 1), d.tail()
    assert not (shared / "poolwatch.pid").exists(), d.tail()
    assert "poolwatch daemon stopped" in d.log()
    # The lock is free again: a one-shot command takes it.
    proc = run_cli("status", f"shared_dir={shared}", timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_metrics_port_in_use_fails_the_start_in_one_line_and_leaves_nothing(tmp_path: Path,
                                                                              daemons: list[Daemon]) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    images(inp, 3)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        d = OnPort(tmp_path, [inp], shared)
        d.fixed_port = port
        daemons.append(d)
        d.start(wait_ready=False)
        assert d.proc is not None
        pgid = d.proc.pid
        code = d.proc.wait(120)
    assert code != 0, d.tail()
    errors = [line for line in d.log().splitlines() if line.startswith("poolwatch: error:")]
    assert errors == [f"poolwatch: error: metrics failed to start: metrics.port {port} on 127.0.0.1: "
                      "Address already in use"], d.tail()
    assert "Traceback" not in d.log(), d.tail()
    # The decode pool and the model had started: the supervisor stopped them. Nothing of the daemon's
    # process group (its forkserver, decode workers) is left.
    assert "stopped decoders" in d.log() and "stopped models" in d.log(), d.tail()
    deadline = time.monotonic() + 10
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group_members(pgid) == [], "processes left behind"
    assert not (shared / "poolwatch.pid").exists()

