"""Load: N files created as fast as possible under a running daemon; throughput, peak RSS, queue depth,
inotify overflows and time-to-consistency (every file one row, `ok`, with a vector; integrity ok).

    python bench/load.py                                  # 20,000 files of 320x240, default settings
    python bench/load.py --n 5000 --arg embedding_precision=bf16
    python bench/load.py --smoke                          # seconds, for CI

The JPEGs are made first (seeded, cached in --cache) and then copied into the watched folder (100 per
sub-folder, folders made as the copy goes) with no pause; the daemon starts on an empty folder.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

from _common import clean_up, free_port, machine, make_jpegs, proc_memory_mb, scrape, start_daemon, terminate, wait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "pw-bench-load-src")
    ap.add_argument("--arg", action="append", default=[], help="extra key=value for the daemon")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.size = 60, "64x48"
        args.arg = [*args.arg, "lightly.collate.input_size=16", "lightly.loader.batch_size=32"]
    w, h = map(int, args.size.split("x"))
    print(f"machine: {machine()}")
    t = time.monotonic()
    sources = make_jpegs(args.cache / f"{w}x{h}", args.n, (w, h), seed=7)
    print(f"{args.n} JPEGs {w}x{h} ready in {time.monotonic() - t:.0f}s (daemon args: {' '.join(args.arg) or 'defaults'})")
    work = Path(tempfile.mkdtemp(prefix="pw-bench-load-"))
    inp, shared = work / "in", work / "shared"
    inp.mkdir()
    port = free_port()
    log = work / "daemon.log"
    daemon = start_daemon(inp, shared, port, args.arg, log=log)
    peak = {"queue": 0.0, "rss": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak["queue"] = max(peak["queue"], scrape(port).get("poolwatch_ingest_queue_depth", 0.0))
                peak["rss"] = max(peak["rss"], proc_memory_mb(daemon.pid)["VmRSS"])
            except OSError:
                pass
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    db = shared / "poolwatch.db"

    def consistent() -> bool:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        try:
            (rows, ok_with_vector), = conn.execute(
                "SELECT count(*), sum(status = 'ok' AND EXISTS (SELECT 1 FROM embeddings e WHERE e.image_id = i.id))"
                " FROM images i")
            return rows == args.n and ok_with_vector == args.n
        finally:
            conn.close()

    try:
        start = time.monotonic()
        for i, src in enumerate(sources):
            folder = inp / f"d{i // 100:04d}"
            if i % 100 == 0:
                folder.mkdir()
            shutil.copyfile(src, folder / src.name)
        written = time.monotonic() - start
        wait(consistent, 24 * 3600, "consistency", poll=1.0)
        elapsed = time.monotonic() - start
        stop.set()
        sampler.join(5)
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
        distinct = conn.execute("SELECT count(DISTINCT root || '/' || relpath) FROM images").fetchone()[0]
        conn.close()
        metrics = scrape(port)
        mem = proc_memory_mb(daemon.pid)
        scans = log.read_text(errors="replace").count("reconcile scan:")
        print(f"| {args.n:,} files {w}x{h} created in {written:.1f}s | consistent after {elapsed:.0f}s | "
              f"{args.n / elapsed:.1f} files/s | peak RSS {max(peak['rss'], mem['VmHWM']):.0f} MB | "
              f"queue depth max {peak['queue']:.0f} | "
              f"inotify overflows {metrics.get('poolwatch_watcher_overflows_total', 0):.0f} | "
              f"reconcile scans {scans} | rows {distinct:,} distinct of {args.n:,}, lost {args.n - distinct}, "
              f"integrity {integrity} |")
        print(f"SIGTERM -> exit {terminate(daemon, 120)}")
    finally:
        stop.set()
        clean_up(daemon, work)


if __name__ == "__main__":
    main()
