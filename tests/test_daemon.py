"""`poolwatch run` end to end: the real daemon in a subprocess, real inotify events, real signals,
real HTTP scrapes (and a real Prometheus server), a real sd_notify socket.

Nothing here sleeps and hopes: every wait polls a condition (the SQLite store, read-only; /metrics;
the daemon's log; files) against a deadline and fails with what it was waiting for and the tail of
the daemon's log. Where a test must show that something did NOT happen, it waits for a positive
event that is ordered after it (a marker file ingested later, a run that must carry the new config).
Run with `-s` to see the trickle latency figures.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import FAST, POOLWATCH, encode, photo, run_cli

# FAST, and the smallest model input allowed: lightly's resnet-18 is the CIFAR-style one (no stride in
# its stem), ~15 ms per image at 32 px on one core and a quarter of that at 16 px; these tests ingest
# ~3,000 files and measure the daemon, not the model.
DAEMON_FAST = [*FAST, "lightly.collate.input_size=16"]
RUN_NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}(-\d+)?$")
START_TIMEOUT = 90.0  # model load + decode pool start on a slow 2-core CI machine
PROMETHEUS = shutil.which("prometheus", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/bin")


# ---- helpers ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(condition: Callable[[], Any], timeout: float, what: str, daemon: Daemon | None = None,
             interval: float = 0.05) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds saying `what`."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (OSError, sqlite3.Error, urllib.error.URLError, ValueError):
            value = None  # not there yet (no store, server not up, a file mid-write)
        if value:
            return value
        if daemon is not None and daemon.proc is not None and daemon.proc.poll() is not None:
            pytest.fail(f"daemon exited with {daemon.proc.returncode} while waiting for {what}\n{daemon.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}" + (f"\n{daemon.tail()}" if daemon else ""))
        time.sleep(interval)


def query(shared: Path, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
    """Read the daemon's store without taking part in its writes (read-only URI, fresh connection)."""
    db = shared / "poolwatch.db"
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def rows_under(shared: Path, root: Path, prefix: str) -> dict[str, tuple[str, float, int]]:
    """relpath -> (status, updated, id) for the images of `root` whose relpath starts with `prefix`."""
    rows = query(shared, "SELECT relpath, status, updated, id FROM images WHERE root = ? AND substr(relpath, 1, ?) = ?",
                 (str(root), len(prefix), prefix))
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def run_folders(shared: Path) -> list[str]:
    runs = shared / "runs"
    return sorted(p.name for p in runs.iterdir() if RUN_NAME.match(p.name)) if runs.is_dir() else []


def write_images(folder: Path, names_and_seeds: Sequence[tuple[str, int]], size: tuple[int, int] = (96, 72)) -> None:
    """Encode first, then write as fast as possible (one open/write/close each)."""
    folder.mkdir(parents=True, exist_ok=True)
    blobs = [(name, encode(photo(seed, size))) for name, seed in names_and_seeds]
    for name, data in blobs:
        with open(folder / name, "wb") as fh:
            fh.write(data)


LOG_RUN_END = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*sampling run (\d+) finished in", re.M)


def run_ends(log: str) -> dict[int, float]:
    """run id -> when the daemon logged its end (after outputs, commit and report), epoch seconds."""
    return {int(m[3]): time.mktime(time.strptime(m[1], "%Y-%m-%d %H:%M:%S")) + int(m[2]) / 1000
            for m in LOG_RUN_END.finditer(log)}


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Daemon:
    """`poolwatch run` as a subprocess in its own process group; its log (stdout+stderr) goes to a file."""

    registry: list[Daemon] = []

    def __init__(self, workdir: Path, inputs: Sequence[Path], shared: Path, *extra: str, name: str = "daemon",
                 config_file: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.workdir, self.inputs, self.shared, self.extra = workdir, [Path(p) for p in inputs], shared, list(extra)
        self.name, self.config_file, self.env = name, config_file, env or {}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.starts = 0
        self.started_at = 0.0
        self.log_path = workdir / f"{name}.log"

    def args(self, port: int) -> list[str]:
        config = ["--config", str(self.config_file)] if self.config_file else []
        return [*POOLWATCH, "run", *config, f"input_dir=[{','.join(map(str, self.inputs))}]",
                f"shared_dir={self.shared}", f"metrics.port={port}", *DAEMON_FAST, *self.extra]

    def start(self, wait_ready: bool = True) -> Daemon:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        self.started_at = time.monotonic()
        if self not in Daemon.registry:
            Daemon.registry.append(self)
        self.port = free_port()
        self.log_path = self.workdir / f"{self.name}-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.args(self.port), cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        if wait_ready:
            self.wait_ready()
        return self

    def ready(self) -> bool:
        """/healthz answers 200 once every component has started (503 "starting" before)."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode} during start-up\n{self.tail()}")
        return http_get(f"http://127.0.0.1:{self.port}/healthz", timeout=1.0)[0] == 200

    def wait_ready(self) -> None:
        wait_for(self.ready, START_TIMEOUT, f"{self.name} to be ready (/healthz 200)", self, interval=0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 40) -> str:
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(self.log().splitlines()[-n:])

    def count_log(self, text: str) -> int:
        return self.log().count(text)

    def send(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        _, text = http_get(f"http://127.0.0.1:{self.port}/metrics")
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def metric(self, name: str, **labels: str) -> float:
        return self.scrape().get((name, frozenset(labels.items())), 0.0)

    def ingested_total(self) -> float:
        return sum(v for (n, _), v in self.scrape().items() if n == "poolwatch_images_ingested_total")

    def wait_idle(self, timeout: float = 60) -> None:
        """The ingest queue is empty (the worker has taken everything queued so far)."""
        wait_for(lambda: self.metric("poolwatch_ingest_queue_depth") == 0, timeout, "an empty ingest queue", self)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.send(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout}s of {signal.Signals(sig).name}\n{self.tail()}")

    def kill(self) -> None:
        """Teardown: whatever state it is in, nothing of this daemon survives (its decode pool included)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            print(f"\n{self.name} still running at teardown; killing it\n{self.tail(15)}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # the daemon's own group: it, its forkserver and pool
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(15)
        if self.proc.returncode not in (0, -signal.SIGKILL, None):
            print(f"\n{self.name} exited with {self.proc.returncode}\n{self.tail(15)}")


@pytest.fixture(autouse=True)
def _daemon_logs_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """When a test fails, print the tail of the log of every daemon it had running."""
    failed, started = request.session.testsfailed, time.monotonic()
    yield
    if request.session.testsfailed > failed:
        for d in Daemon.registry:
            if d.started_at >= started or (d.proc is not None and d.proc.poll() is None):
                print(f"\n{d.tail()}")


# ---- one daemon shared by the ingest-side tests (each test works in its own sub-folder) ------------

class IngestEnv:
    def __init__(self, base: Path) -> None:
        self.a = (base / "input_a").resolve()
        self.b = (base / "input_b").resolve()
        self.shared = (base / "shared").resolve()
        self.base = base
        self.daemon = Daemon(base, [self.a, self.b], self.shared, name="ingest")


@pytest.fixture(scope="module")
def ingest_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IngestEnv]:
    env = IngestEnv(tmp_path_factory.mktemp("ingest"))
    env.a.mkdir()
    write_images(env.b, [(f"b_{i:02d}.jpg", 50_000 + i) for i in range(10)])  # found by the start-up scan
    try:
        env.daemon.start()
        wait_for(lambda: len(rows_under(env.shared, env.b, "")) == 10, 60, "the start-up scan of input_b", env.daemon)
        yield env
        assert env.daemon.stop(timeout=30) == 0, env.daemon.tail()
    finally:
        env.daemon.kill()


def test_partial_writes_temp_renames_and_deletions(ingest_env: IngestEnv) -> None:
    # Files go straight into the root, watched since start-up (new folders: the test further down).
    env, d = ingest_env, ingest_env.daemon
    root = env.a
    before = d.ingested_total()
    data = encode(photo(1, (400, 300)), "JPEG", quality=95)

    def rows() -> dict[str, tuple[str, float, int]]:
        return rows_under(env.shared, env.a, "w_")

    # A file written slowly through one open handle: flushed chunks, pauses, then closed.
    with open(root / "w_slow.jpg", "wb") as fh:
        for i, chunk in enumerate((data[: len(data) // 3], data[len(data) // 3: 2 * len(data) // 3])):
            fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
            # The pause: a complete marker file written after the chunk is ingested, so the daemon has
            # seen the chunk's events and worked past them — and the half-written file is still absent.
            write_images(root, [(f"w_marker_{i}.jpg", 100 + i)])
            wait_for(lambda i=i: f"w_marker_{i}.jpg" in rows(), 30, f"w_marker_{i}.jpg", d)
            assert "w_slow.jpg" not in rows(), f"a half-written file was ingested after chunk {i}\n{d.tail()}"
        fh.write(data[2 * len(data) // 3:])
    slow = wait_for(lambda: rows().get("w_slow.jpg"), 30, "w_slow.jpg after its close", d)
    assert slow[0] == "ok"
    assert query(env.shared, "SELECT size FROM images WHERE id = ?", (slow[2],))[0][0] == len(data)

    # cp to a temp name, then rename into place: ingested once under the final name only.
    for seed, temp, final in ((7, ".w_copied.jpg.tmp", "w_copied.jpg"), (8, "w_copied2.jpg.part", "w_copied2.jpg")):
        source = env.base / f"outside_{seed}.jpg"
        source.write_bytes(encode(photo(seed)))
        subprocess.run(["cp", str(source), str(root / temp)], check=True, timeout=30)
        os.rename(root / temp, root / final)
    wait_for(lambda: {"w_copied.jpg", "w_copied2.jpg"} <= set(rows()), 30, "the renamed copies", d)
    d.wait_idle()
    assert sorted(rows()) == ["w_copied.jpg", "w_copied2.jpg", "w_marker_0.jpg", "w_marker_1.jpg", "w_slow.jpg"]
    assert {status for status, _, _ in rows().values()} == {"ok"}, rows()
    assert not query(env.shared, "SELECT relpath FROM images WHERE relpath LIKE '%.tmp' OR relpath LIKE '%.part'")
    assert d.ingested_total() - before == 5, "every file is checked exactly once"

    # Deleting an image makes it `missing`, and only it.
    os.unlink(root / "w_copied2.jpg")
    wait_for(lambda: rows()["w_copied2.jpg"][0] == "missing", 30, "w_copied2.jpg to become missing", d)
    assert sorted(status for status, _, _ in rows().values()) == ["missing", "ok", "ok", "ok", "ok"], rows()


def test_trickle_is_committed_promptly(ingest_env: IngestEnv) -> None:
    env, d = ingest_env, ingest_env.daemon
    d.wait_idle()
    blobs = [encode(photo(20_000 + i)) for i in range(20)]
    closed: dict[str, float] = {}
    for i, data in enumerate(blobs):
        with open(env.a / f"trickle_{i:02d}.jpg", "wb") as fh:
            fh.write(data)
        closed[f"trickle_{i:02d}.jpg"] = time.time()
        time.sleep(0.3)  # the trickle's pace (the workload), not a wait for the daemon
    rows = wait_for(lambda: len(r := rows_under(env.shared, env.a, "trickle_")) == 20 and r, 30, "the trickle", d)
    latencies = sorted(rows[rel][1] - t for rel, t in closed.items())
    assert {status for status, _, _ in rows.values()} == {"ok"}
    p50 = statistics.median(latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(f"\ntrickle close->commit latency over {len(latencies)} files: p50 {p50 * 1000:.0f} ms, "
          f"p99 {p99 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms")
    assert latencies[0] > 0, "a row was committed before its file was closed"
    assert p99 < 3.0, latencies


def test_metrics_endpoint_counts_and_health(ingest_env: IngestEnv) -> None:
    env, d = ingest_env, ingest_env.daemon
    d.wait_idle()
    before = d.ingested_total()
    write_images(env.a / "metrics", [(f"m_{i}.jpg", 30_000 + i) for i in range(5)])
    wait_for(lambda: d.ingested_total() >= before + 5, 30, "poolwatch_images_ingested_total to grow by 5", d)
    d.wait_idle()
    assert d.ingested_total() == before + 5
    eff = d.metric("poolwatch_compute_efficiency", window="smoothed")
    assert 0.0 < eff <= 1.0, eff
    assert d.metric("poolwatch_ingest_queue_depth") == 0
    code, body = http_get(f"http://127.0.0.1:{d.port}/healthz")
    assert code == 200 and body.startswith("ok"), (code, body)


@pytest.mark.skipif(PROMETHEUS is None, reason="the prometheus binary is not installed (apt-get install prometheus)")
def test_prometheus_scrapes_the_daemon(ingest_env: IngestEnv, tmp_path: Path) -> None:
    d = ingest_env.daemon
    assert PROMETHEUS is not None
    d.wait_idle()
    ingested_ok = d.metric("poolwatch_images_ingested_total", status="ok")
    assert ingested_ok > 0
    prom_port = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"scrape_configs:\n  - job_name: poolwatch\n    static_configs:\n      - targets: ['127.0.0.1:{d.port}']\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - the server's log, closed in the finally below
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{prom_port}/api/v1"
    try:
        def target_up() -> bool:
            if prom.poll() is not None:
                pytest.fail(f"prometheus exited with {prom.returncode}: "
                            f"{(tmp_path / 'prometheus.log').read_text(errors='replace')[-2000:]}")
            targets = json.loads(http_get(f"{api}/targets")[1])["data"]["activeTargets"]
            return any(t["labels"].get("job") == "poolwatch" and t["health"] == "up" for t in targets)

        wait_for(target_up, 60, "prometheus to scrape poolwatch with health 'up'", d, interval=0.1)

        def ingested_series() -> list[dict]:
            url = f"{api}/query?query=" + urllib.request.quote('poolwatch_images_ingested_total{status="ok"}')
            return json.loads(http_get(url)[1])["data"]["result"]

        result = wait_for(ingested_series, 30, "poolwatch_images_ingested_total in prometheus", d, interval=0.1)
        assert float(result[0]["value"][1]) == ingested_ok, result  # nothing was ingested meanwhile
    finally:
        prom.terminate()
        try:
            prom.wait(15)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(5)
        log.close()


def test_files_written_into_new_folders_are_not_missed(ingest_env: IngestEnv) -> None:
    """`mkdir d && write d/x`, `mkdir -p` + write, `cp -r`: files closed before their folder is watched."""
    env, d = ingest_env, ingest_env.daemon
    d.wait_idle()
    before = d.ingested_total()
    blobs = [encode(photo(60_000 + i)) for i in range(15)]
    for i, data in enumerate(blobs[:10]):
        os.mkdir(env.a / f"new_{i}")
        (env.a / f"new_{i}" / "x.jpg").write_bytes(data)
    for i, data in enumerate(blobs[10:]):
        os.makedirs(env.a / f"new_deep_{i}" / "a" / "b")
        (env.a / f"new_deep_{i}" / "a" / "b" / "x.jpg").write_bytes(data)
    outside = env.base / "to_copy"
    write_images(outside / "sub", [(f"c_{i}.jpg", 61_000 + i) for i in range(8)])
    subprocess.run(["cp", "-r", str(outside), str(env.a / "new_copied")], check=True, timeout=30)
    expected = {f"new_{i}/x.jpg" for i in range(10)} | {f"new_deep_{i}/a/b/x.jpg" for i in range(5)} \
        | {f"new_copied/sub/c_{i}.jpg" for i in range(8)}
    rows = wait_for(lambda: set(r := rows_under(env.shared, env.a, "new_")) == expected and r, 30,
                    "the files of the new folders", d)
    d.wait_idle()
    assert {s for s, _, _ in rows.values()} == {"ok"}
    assert d.ingested_total() - before == len(expected), "every file is checked exactly once"


def test_burst_of_2000_files_is_ingested_exactly_once(ingest_env: IngestEnv) -> None:
    env, d = ingest_env, ingest_env.daemon
    d.wait_idle()
    before = d.ingested_total()
    unique = [encode(photo(100_000 + i, (48, 36))) for i in range(1950)]
    files = [(f"f_{i:04d}.jpg", data) for i, data in enumerate(unique)]
    files += [(f"dup_{i:02d}.jpg", unique[i]) for i in range(50)]  # byte copies: 50 exact duplicates
    folder = env.a / "burst"
    folder.mkdir()  # a new folder, filled at once (its first files may be closed before it is watched)
    for name, data in files:
        with open(folder / name, "wb") as fh:
            fh.write(data)
    rows = wait_for(lambda: len(r := rows_under(env.shared, env.a, "burst/")) == 2000 and r, 120,
                    "2000 rows under burst/", d, interval=0.1)
    d.wait_idle()
    statuses = [s for s, _, _ in rows.values()]
    assert statuses.count("ok") == 1950 and statuses.count("duplicate") == 50, \
        {s: statuses.count(s) for s in set(statuses)}
    relpaths = query(env.shared, "SELECT relpath, count(*) FROM images WHERE relpath LIKE 'burst/%' GROUP BY relpath")
    assert len(relpaths) == 2000 and all(n == 1 for _, n in relpaths)
    for i in range(50):  # of each identical pair, one is kept and the other points at it
        a, b = rows[f"burst/f_{i:04d}.jpg"], rows[f"burst/dup_{i:02d}.jpg"]
        assert sorted((a[0], b[0])) == ["duplicate", "ok"]
        kept, dup = (a, b) if a[0] == "ok" else (b, a)
        assert query(env.shared, "SELECT duplicate_of FROM images WHERE id = ?", (dup[2],))[0][0] == kept[2]
    assert d.ingested_total() - before == 2000, "every file is checked exactly once"


def test_input_dir_outage_is_not_a_mass_deletion(ingest_env: IngestEnv) -> None:
    env, d = ingest_env, ingest_env.daemon
    root = str(env.b)
    assert {s for s, _, _ in rows_under(env.shared, env.b, "").values()} == {"ok"}
    assert d.metric("poolwatch_watcher_outage", root=root) == 0
    away = env.b.with_name("input_b.away")
    os.rename(env.b, away)
    try:
        wait_for(lambda: d.metric("poolwatch_watcher_outage", root=root) == 1, 30, "the outage gauge for input_b", d)
        # Ordered after the outage: a file in the other root, queued and committed after it.
        write_images(env.a / "during_outage", [("o.jpg", 40_000)])
        wait_for(lambda: rows_under(env.shared, env.a, "during_outage/"), 30, "a file in input_a during the outage", d)
        d.wait_idle()
        statuses = {k: v[0] for k, v in rows_under(env.shared, env.b, "").items()}
        assert len(statuses) == 10 and set(statuses.values()) == {"ok"}, f"images of the vanished dir: {statuses}"
        assert d.metric("poolwatch_watcher_outages_total", root=root) == 1
    finally:
        scans = d.count_log("reconcile scan:")
        os.rename(away, env.b)
    wait_for(lambda: d.metric("poolwatch_watcher_outage", root=root) == 0, 30, "the outage to end", d)
    wait_for(lambda: d.count_log("reconcile scan:") > scans, 30, "the rescan after the outage", d)
    # Watched again: a new file arrives through inotify (no further scan is due for 10 minutes).
    write_images(env.b, [("after.jpg", 40_001)])
    wait_for(lambda: "after.jpg" in rows_under(env.shared, env.b, ""), 30, "a new file in the restored dir", d)
    d.wait_idle()
    statuses = {k: v[0] for k, v in rows_under(env.shared, env.b, "").items()}
    assert len(statuses) == 11 and set(statuses.values()) == {"ok"}, statuses
    assert d.count_log("reconcile scan:") == scans + 1


# ---- shutdown during a burst, restart, reconcile ------------------------------------------------

def test_term_during_burst_then_restart_catches_up(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = (tmp_path / "input").resolve(), (tmp_path / "shared").resolve()
    inp.mkdir()
    d = Daemon(tmp_path, [inp], shared, "graceful_timeout=20", name="burst")
    daemons.append(d)
    d.start()
    write_images(inp, [(f"f_{i:03d}.jpg", 200_000 + i) for i in range(600)])
    wait_for(lambda: query(shared, "SELECT count(*) FROM images")[0][0] >= 150, 60, "a quarter of the burst", d,
             interval=0.02)
    t0 = time.monotonic()
    code = d.stop(signal.SIGTERM, timeout=30)
    took = time.monotonic() - t0
    assert code == 0, d.tail()
    assert took < 20, f"graceful stop took {took:.1f}s"
    assert "stopped gracefully" in d.log()
    done = query(shared, "SELECT count(*) FROM images")[0][0]
    print(f"\nSIGTERM during the burst: {done} of 600 committed, exit 0 after {took:.2f}s")
    assert done < 600, "the burst was over before SIGTERM; the test proves nothing"

    # Files created while the daemon is stopped are found by the start-up (reconcile) scan.
    write_images(inp / "while_stopped", [(f"s_{i:02d}.jpg", 300_000 + i) for i in range(50)])
    d.start()
    wait_for(lambda: query(shared, "SELECT count(*) FROM images WHERE status = 'ok'")[0][0] == 650, 90,
             "all 650 files ok after the restart", d, interval=0.1)
    d.wait_idle()
    rows = query(shared, "SELECT relpath, count(*), min(status), max(status) FROM images GROUP BY relpath")
    assert len(rows) == 650 and all(n == 1 and lo == hi == "ok" for _, n, lo, hi in rows)
    assert d.ingested_total() == 650 - done, "the restart checks exactly the files not yet in the store"
    assert d.stop(timeout=30) == 0


# ---- sampling runs: signals, queueing, reload, `poolwatch trigger` -------------------------------

def test_signals_trigger_queueing_and_reload(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = (tmp_path / "input").resolve(), (tmp_path / "shared").resolve()
    write_images(inp, [(f"img_{i:03d}.jpg", 400_000 + i) for i in range(24)])
    config = tmp_path / "poolwatch.yaml"
    # Slow runs (every image selected and dumped at 512x512), so that signals can arrive mid-run.
    config.write_text("stopping_condition:\n  n_samples: 1.0\ndump_dataset: true\noutput_image_size: [512, 512]\n")
    d = Daemon(tmp_path, [inp], shared, name="sampling", config_file=config)
    daemons.append(d)
    d.start()
    wait_for(lambda: query(shared, "SELECT count(*) FROM images WHERE status = 'ok'")[0][0] == 24, 60,
             "24 images ingested", d)

    def finished(run_id: int) -> tuple:
        """Run `run_id` is over for the sampler (outputs, commit, report); returns its row."""
        if f"sampling run {run_id} finished in" not in d.log():
            return ()
        rows = query(shared, "SELECT id, trigger, status, n_selected, output_dir FROM runs WHERE id = ?", (run_id,))
        return rows[0] if rows else ()

    def n_runs() -> int:
        return query(shared, "SELECT count(*) FROM runs")[0][0]

    # One USR1 → exactly one run folder.
    d.send(signal.SIGUSR1)
    run = wait_for(lambda: finished(1), 60, "run 1", d)
    assert run[1:4] == ("signal", "ok", 24), run
    assert run_folders(shared) == [Path(run[4]).name]

    # A run in progress; two more USR1 → exactly one more run.
    d.send(signal.SIGUSR1)
    wait_for(lambda: query(shared, "SELECT count(*) FROM runs WHERE status = 'running'")[0][0] == 1
             or list((shared / "runs").glob(".tmp-*")), 30, "run 2 to be in progress", d, interval=0.02)
    d.send(signal.SIGUSR1)
    wait_for(lambda: d.count_log("sampling run queued after the current run") == 1, 10, "the third request", d,
             interval=0.01)
    d.send(signal.SIGUSR1)
    wait_for(lambda: d.count_log("sampling run already queued") == 1, 10, "the fourth request", d, interval=0.01)
    assert not finished(2), "run 2 ended before both signals were handled; the runs are too fast to overlap"
    assert wait_for(lambda: finished(3), 90, "runs 2 and 3", d)[2] == "ok"
    # Every request above came before run 3 ended: once the sampler is idle (no run in progress, none
    # queued) no further run can start. Run 4 below must also carry the reloaded n_samples, which a run
    # queued by the signals above would not.
    wait_for(lambda: "sampler idle" in http_get(f"http://127.0.0.1:{d.port}/healthz")[1], 10,
             "the sampler idle, no run queued", d, interval=0.05)
    assert n_runs() == 3 and d.count_log("sampling run started") == 3, d.tail()

    # HUP after editing n_samples: the next run uses it.
    config.write_text("stopping_condition:\n  n_samples: 7\ndump_dataset: true\noutput_image_size: [512, 512]\n")
    d.send(signal.SIGHUP)
    wait_for(lambda: d.metric("poolwatch_config_reloads_total", outcome="ok") == 1, 10, "the reload", d)
    # This time through `poolwatch trigger`, which finds the daemon by its pid file and sends SIGUSR1.
    proc = run_cli("trigger", f"shared_dir={shared}", timeout=120)
    assert proc.returncode == 0 and f"pid {d.pid}" in proc.stdout, proc.stderr
    run = wait_for(lambda: finished(4), 60, "run 4", d)
    assert run[1:4] == ("signal", "ok", 7), run
    assert Path(run[4]).name in run_folders(shared)

    # Broken config files: invalid YAML, then a bad value. Both are refused; the old config stays.
    config.write_text("stopping_condition:\n  n_samples: [3\n")
    d.send(signal.SIGHUP)
    wait_for(lambda: d.metric("poolwatch_config_reloads_total", outcome="failed") == 1, 10, "a failed reload", d)
    config.write_text("stopping_condition:\n  n_samples: -5\n")
    d.send(signal.SIGHUP)
    wait_for(lambda: d.metric("poolwatch_config_reloads_total", outcome="failed") == 2, 10, "a second failed reload", d)
    assert "reload failed" in d.log() and "stopping_condition.n_samples: invalid value -5" in d.log()
    d.send(signal.SIGUSR1)
    run = wait_for(lambda: finished(5), 60, "run 5", d)
    assert run[2:4] == ("ok", 7), run
    assert d.metric("poolwatch_config_reloads_total", outcome="ok") == 1
    assert d.metric("poolwatch_sampling_runs_total", trigger="signal", outcome="ok") == 5
    assert n_runs() == 5
    folders = [Path(r[0]).name for r in query(shared, "SELECT output_dir FROM runs ORDER BY id")]
    assert run_folders(shared) == sorted(folders)
    assert not list((shared / "runs").glob(".tmp-*"))
    assert d.stop(timeout=30) == 0


# ---- schedule, sd_notify, the single-instance lock ------------------------------------------------

class NotifySocket:
    """The systemd side of sd_notify: a datagram socket that records every message."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.time(), data.decode()))

    def with_line(self, line: str) -> list[str]:
        return [m for _, m in list(self.messages) if line in m.split("\n")]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def test_schedule_sd_notify_and_lock(tmp_path: Path, daemons: list[Daemon]) -> None:
    inp, shared = (tmp_path / "input").resolve(), (tmp_path / "shared").resolve()
    write_images(inp, [(f"img_{i:02d}.jpg", 500_000 + i) for i in range(20)])
    notify = NotifySocket(tmp_path / "notify.sock")
    try:
        d = Daemon(tmp_path, [inp], shared, "schedule.interval=3s", "stopping_condition.n_samples=5", name="scheduled",
                   env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"})
        daemons.append(d)
        d.start()
        ready = wait_for(lambda: notify.with_line("READY=1"), 10, "READY=1 on the notify socket", d)
        assert any(line.startswith("STATUS=") for line in ready[0].split("\n")), ready
        assert f"MAINPID={d.pid}" in ready[0].split("\n")

        # The schedule: a run every 3 s, the first 3 s after start. The sampler runs one at a time, so a
        # run starts on its tick, or (when the previous run and its report are still going, as on a
        # loaded machine) right when that one ends; never early, never later than that.
        def schedule_runs() -> list[tuple]:
            return query(shared, "SELECT id, started, status FROM runs WHERE trigger = 'schedule' AND status = 'ok' "
                                 "ORDER BY id")

        wait_for(lambda: len(schedule_runs()) >= 2, 12, "two scheduled runs within ~10 s", d)
        runs = wait_for(lambda: len(r := schedule_runs()) >= 3 and r, 20, "a third scheduled run", d)[:3]
        ends = wait_for(lambda: all(r[0] in (e := run_ends(d.log())) for r in runs[:2]) and e, 30,
                        "the first runs to end", d)
        ready_at = next(t for t, m in list(notify.messages) if "READY=1" in m.split("\n"))
        print("\nscheduled runs (interval 3s) started at " + ", ".join(f"{r[1] - ready_at:.2f}" for r in runs)
              + "s after READY; the runs before them ended at "
              + ", ".join(f"{ends[r[0]] - ready_at:.2f}s" for r in runs[:2]))
        assert [r[0] for r in runs] == [1, 2, 3]
        for k, (run_id, started, _) in enumerate(runs, start=1):
            tick = ready_at + 3 * k
            free = ends[run_id - 1] if k > 1 else tick  # when the sampler could take it
            assert tick - 1.0 <= started <= max(tick, free) + 0.5, (k, started - ready_at, free - ready_at)

        # The watchdog: WATCHDOG=1 every WATCHDOG_USEC/2 while the loop is alive.
        wait_for(lambda: len(notify.with_line("WATCHDOG=1")) >= 4, 10, "WATCHDOG=1 pings", d)
        stamps = [t for t, m in list(notify.messages) if "WATCHDOG=1" in m.split("\n")]
        assert max(b - a for a, b in itertools.pairwise(stamps)) < 1.0, "pings must come more often than WATCHDOG_USEC"

        # A second daemon on the same shared_dir refuses, naming the first; the first is undisturbed.
        second = subprocess.run(Daemon(tmp_path, [inp], shared, name="second").args(free_port()), cwd=tmp_path,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert second.returncode != 0
        assert f"pid {d.pid}" in second.stderr and "another poolwatch process" in second.stderr, second.stderr
        assert d.proc is not None and d.proc.poll() is None
        assert (shared / "poolwatch.pid").read_text().split() == [str(d.pid), "run"]
        assert http_get(f"http://127.0.0.1:{d.port}/healthz")[0] == 200
        n = len(schedule_runs())
        wait_for(lambda: len(schedule_runs()) > n, 15, "the schedule to go on after the refused start", d)

        # SIGTERM → STOPPING=1, exit 0.
        assert d.stop(timeout=30) == 0, d.tail()
        wait_for(lambda: notify.with_line("STOPPING=1"), 5, "STOPPING=1 on the notify socket")
    finally:
        notify.close()
