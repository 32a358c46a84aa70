"""Daemon latency and throughput: a trickle (file closed -> row committed) and a burst.

    python bench/latency.py                       # trickle 5 files/s for 60 s, then a burst of 2,000
    python bench/latency.py --rate 5 --seconds 20 --burst 500
    python bench/latency.py --smoke               # seconds, for CI

Starts the real daemon (`poolwatch run`) on temp dirs, writes 640x480 JPEGs, and reads the store
(read-only) for each file's commit time (`images.updated`, time.time() at commit).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import (
    clean_up,
    committed,
    free_port,
    machine,
    make_jpegs,
    pct,
    proc_memory_mb,
    scrape,
    start_daemon,
    terminate,
    wait,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--burst", type=int, default=2000)
    ap.add_argument("--size", default="640x480")
    ap.add_argument("--arg", action="append", default=[], help="extra key=value for the daemon")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.rate, args.seconds, args.burst = 4.0, 2.0, 16
    w, h = map(int, args.size.split("x"))
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="pw-bench-latency-"))
    inp, shared, src = work / "in", work / "shared", work / "src"
    inp.mkdir()
    n_trickle = int(args.rate * args.seconds)
    sources = make_jpegs(src, n_trickle + args.burst, (w, h), seed=3)
    port = free_port()
    daemon = start_daemon(inp, shared, port, args.arg)
    try:
        closed: dict[str, float] = {}
        start = time.monotonic()
        for i, path in enumerate(sources[:n_trickle]):
            target = start + i / args.rate
            time.sleep(max(0.0, target - time.monotonic()))
            name = f"t_{i:05d}.jpg"
            with open(inp / name, "wb") as fh:
                fh.write(path.read_bytes())
            closed[name] = time.time()
        wait(lambda: all(n in committed(shared) for n in closed), 120, "the trickle to be committed")
        rows = committed(shared)
        lat = [rows[n] - closed[n] for n in closed]
        print(f"| trickle {args.rate:g} files/s for {args.seconds:g} s ({len(lat)} files {w}x{h}) | "
              f"p50 {pct(lat, 0.5) * 1000:.0f} ms | p99 {pct(lat, 0.99) * 1000:.0f} ms | max {max(lat) * 1000:.0f} ms |")

        t = time.time()
        for i, path in enumerate(sources[n_trickle:]):
            shutil.copyfile(path, inp / f".b_{i:05d}.tmp")
            os.replace(inp / f".b_{i:05d}.tmp", inp / f"b_{i:05d}.jpg")
        written = time.time() - t
        names = {f"b_{i:05d}.jpg" for i in range(args.burst)}
        wait(lambda: names <= set(committed(shared)), 3600, "the burst to be committed")
        rows = committed(shared)
        done = max(rows[n] for n in names) - t
        eff = scrape(port).get('poolwatch_compute_efficiency{window="smoothed"}')
        print(f"| burst of {args.burst} files ({w}x{h}, written in {written:.1f} s) | {args.burst / done:.1f} images/s | "
              f"all committed after {done:.1f} s | {eff if eff is not None else '?'} compute efficiency (smoothed) |")
        mem = proc_memory_mb(daemon.pid)
        print("daemon memory: " + ", ".join(f"{k} {v:.0f} MB" for k, v in mem.items()))
        print(f"SIGTERM -> exit {terminate(daemon, 60)}")
    finally:
        clean_up(daemon, work)


if __name__ == "__main__":
    main()
