"""Daemon start to ready: the first start on a fresh store (export, and int8's calibration + quantization once
the store can calibrate) and a start with the artifact cached; the daemon's RSS once ready, and whether it maps
libtorch.

    python bench/startup.py              # resnet-18 at 64 px (the defaults), 3 cached starts, medians
    python bench/startup.py --smoke      # seconds, for CI

"Ready" is /healthz answering 200 (every component started). The int8 first start is measured with a
one-shot `poolwatch ingest` over 320 files, which calibrates on its first 300 before embedding any.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import free_port, machine, make_jpegs, proc_memory_mb, start_daemon, terminate


def ready_seconds(inp: Path, shared: Path, extra: list[str]) -> tuple[float, dict[str, float], bool]:
    started = time.perf_counter()
    daemon = start_daemon(inp, shared, free_port(), extra)
    try:
        seconds = time.perf_counter() - started
        memory = proc_memory_mb(daemon.pid)
        torch = "libtorch" in Path(f"/proc/{daemon.pid}/maps").read_text()
        assert terminate(daemon) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(30)
    return seconds, memory, torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--arg", action="append", default=[], help="extra key=value for poolwatch")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    extra = [*args.arg, *(["lightly.collate.input_size=16", "lightly.model.num_ftrs=16"] if args.smoke else [])]
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="pw-startup-"))
    try:
        inp, shared = work / "in", work / "shared"
        inp.mkdir()
        first, mem, torch = ready_seconds(inp, shared, extra)
        print(f"first start on a fresh store (exports the model in a child): {first:.2f} s to ready, "
              f"RSS {mem.get('VmRSS', 0):.0f} MB, libtorch mapped: {torch}")
        cached = []
        for _ in range(1 if args.smoke else args.repeat):
            seconds, mem, torch = ready_seconds(inp, shared, extra)
            cached.append(seconds)
        print(f"start with the artifact cached: median {statistics.median(cached):.2f} s to ready "
              f"({', '.join(f'{s:.2f}' for s in cached)}), RSS {mem.get('VmRSS', 0):.0f} MB, libtorch mapped: {torch}")
        if not args.smoke:
            backlog, shared8 = work / "backlog", work / "shared-int8"
            make_jpegs(backlog, 320, (160, 120))
            t = time.perf_counter()
            proc = subprocess.run([str(Path(sys.executable).parent / "poolwatch"), "ingest", f"input_dir={backlog}",
                                   f"shared_dir={shared8}", "lightly.pre_trained=false", "embedding_precision=int8",
                                   "--log-level", "WARNING", *extra],
                                  capture_output=True, text=True)
            assert proc.returncode == 0, proc.stderr[-2000:]
            print(f"int8 first start, `poolwatch ingest` over 320 files (calibrate on 300, quantize, embed): "
                  f"{time.perf_counter() - t:.1f} s in all")
            seconds, mem, torch = ready_seconds(backlog, shared8, [*extra, "embedding_precision=int8"])
            print(f"int8 store, start with the artifact cached: {seconds:.2f} s to ready, RSS {mem.get('VmRSS', 0):.0f} MB, "
                  f"libtorch mapped: {torch}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
