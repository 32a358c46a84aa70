"""Crash consistency: SIGKILL the real daemon at seeded random moments while its input folder grows
and sampling runs happen, restart it, and check that nothing is lost, doubled or half-recorded.

Kill points land during ingest batches, sampling runs, reports and start-up. The seed is printed; set
POOLWATCH_CRASH_SEED to replay one, POOLWATCH_CRASH_KILLS for a longer soak (bench/crash_soak.sh).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from .conftest import FAST, POOLWATCH, encode, photo

KILLS = int(os.environ.get("POOLWATCH_CRASH_KILLS", "20"))
SEED = int(os.environ.get("POOLWATCH_CRASH_SEED", str(random.SystemRandom().randrange(1_000_000))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def q(shared: Path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{shared / 'poolwatch.db'}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def start(inp: Path, shared: Path, port: int, log: Path) -> subprocess.Popen:
    args = [*POOLWATCH, "run", f"input_dir={inp}", f"shared_dir={shared}", f"metrics.port={port}", *FAST,
            "datapool.name=p", "stopping_condition.n_samples=0.3", "schedule.interval=2s", "watch.rescan_interval=5",
            "graceful_timeout=30", "n_example_images=2"]
    with open(log, "ab") as fh:
        return subprocess.Popen(args, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Writer(threading.Thread):
    """Drops images (some byte-duplicates, some corrupt) into the folder until stopped."""

    def __init__(self, folder: Path, rng: random.Random) -> None:
        super().__init__(daemon=True)
        self.folder, self.rng = folder, rng
        self.stop_event = threading.Event()
        self.expected: dict[str, str] = {}

    def run(self) -> None:
        i = 0
        while not self.stop_event.is_set() and i < 400:
            name = f"img_{i:04d}.jpg"
            kind = self.rng.random()
            if kind < 0.08 and i > 0:
                source = f"img_{self.rng.randrange(i):04d}.jpg"
                data = (self.folder / source).read_bytes()
                status = "corrupt" if self.expected[source] == "corrupt" else "valid"
            elif kind < 0.12:
                data = encode(photo(i), "JPEG")[:300]
                status = "corrupt"
            else:
                data = encode(photo(10_000 + i), "JPEG")
                status = "valid"
            tmp = self.folder / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.folder / name)
            self.expected[name] = status
            i += 1
            self.stop_event.wait(self.rng.uniform(0.0, 0.03))


def test_sigkill_at_random_moments_loses_nothing(tmp_path: Path) -> None:
    print(f"\ncrash consistency: seed {SEED}, {KILLS} kill points (POOLWATCH_CRASH_SEED={SEED} replays it)")
    rng = random.Random(SEED)
    inp, shared, log = tmp_path / "in", tmp_path / "shared", tmp_path / "daemon.log"
    inp.mkdir()
    port = free_port()
    writer = Writer(inp, rng)
    writer.start()
    kills = 0
    try:
        while kills < KILLS:
            proc = start(inp, shared, port, log)
            try:
                # Kill at start-up (no wait), while ingesting, or around a (triggered) run and its report.
                if rng.random() < 0.15:
                    time.sleep(rng.uniform(0.0, 1.5))
                else:
                    deadline = time.monotonic() + 90
                    while not up(port):
                        assert proc.poll() is None, f"daemon died on its own:\n{log.read_text()[-3000:]}"
                        assert time.monotonic() < deadline, "daemon did not come up"
                        time.sleep(0.05)
                    if rng.random() < 0.5:
                        proc.send_signal(signal.SIGUSR1)
                    time.sleep(rng.uniform(0.05, 2.5))
            finally:
                proc.kill()
                proc.wait(timeout=30)
            kills += 1
        writer.stop_event.set()
        writer.join(timeout=60)

        # A clean start on the quiescent folder must converge.
        proc = start(inp, shared, port, log)
        try:
            expected = dict(writer.expected)
            deadline = time.monotonic() + 240
            while True:
                rows = dict(q(shared, "SELECT relpath, status FROM images")) if (shared / "poolwatch.db").exists() else {}
                if set(rows) == set(expected) and "pending" not in rows.values():
                    break
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, (
                    f"not converged: {len(set(expected) - set(rows))} files missing from the store, "
                    f"{len(set(rows) - set(expected))} extra\n{log.read_text()[-3000:]}")
                time.sleep(0.2)
            # one more run after convergence, then a graceful stop
            deadline = time.monotonic() + 90
            while not up(port):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.05)
            runs_before = q(shared, "SELECT COUNT(*) FROM runs WHERE status = 'ok'")[0][0]
            proc.send_signal(signal.SIGUSR1)
            deadline = time.monotonic() + 120
            while q(shared, "SELECT COUNT(*) FROM runs WHERE status = 'ok'")[0][0] <= runs_before:
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        writer.stop_event.set()

    # ---- invariants ---------------------------------------------------------------------------
    rows = q(shared, "SELECT relpath, status, duplicate_of, id, hash FROM images")
    assert len(rows) == len({r[0] for r in rows}) == len(expected)  # every file exactly once
    by_name = {r[0]: r for r in rows}
    groups: dict[str, list[tuple]] = {}
    for name, kind in expected.items():
        row = by_name[name]
        if kind == "corrupt":
            assert row[1] == "corrupt", row
        else:
            groups.setdefault(row[4], []).append(row)
    for same_bytes in groups.values():
        # the first one seen stays ok, every copy points at it
        ok = [r for r in same_bytes if r[1] == "ok"]
        assert len(ok) == 1, same_bytes
        assert all(r[1] == "duplicate" and r[2] == ok[0][3] for r in same_bytes if r is not ok[0]), same_bytes
    model = q(shared, "SELECT id FROM models WHERE is_current = 1")[0][0]
    vectors = q(shared, f"SELECT image_id, COUNT(*) FROM embeddings WHERE model_id = {model} GROUP BY image_id")
    ok_ids = {r[0] for r in q(shared, "SELECT id FROM images WHERE status = 'ok'")}
    assert {r[0] for r in vectors} == ok_ids and all(r[1] == 1 for r in vectors)
    runs = q(shared, "SELECT id, status, n_candidates, output_dir FROM runs")
    for run_id, st, n_cand, out in runs:
        n_dec = q(shared, f"SELECT COUNT(*) FROM decisions WHERE run_id = {run_id}")[0][0]
        if st == "ok":
            assert n_dec == n_cand and Path(out).is_dir(), (run_id, n_dec, n_cand, out)
            assert (Path(out) / "data" / "embeddings.csv").exists()
        else:
            assert st in ("interrupted", "failed") and n_dec == 0, (run_id, st, n_dec)
    leftovers = [p.name for p in (shared / "runs").iterdir() if p.name.startswith(".tmp-")]
    assert not leftovers
    pool = {r[0] for r in q(shared, "SELECT image_id FROM datapool WHERE pool = 'p'")}
    selected = {r[0] for r in q(shared, "SELECT d.image_id FROM decisions d JOIN runs r ON r.id = d.run_id "
                                         "WHERE r.status = 'ok' AND r.pool = 'p' AND d.selected = 1")}
    assert pool == selected
    assert q(shared, "PRAGMA integrity_check") == [("ok",)]
    n_ok_runs = sum(1 for r in runs if r[1] == "ok")
    print(f"crash consistency: {kills} kills survived, {len(expected)} files, 0 lost, 0 doubled, "
          f"{n_ok_runs} runs ok, {len(runs) - n_ok_runs} interrupted")
