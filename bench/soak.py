"""Memory soak: the daemon under a steady trickle for a long time; RSS over time, and its growth.

    python bench/soak.py                          # 2 files/s for 60 min, a sampling run every 10 min
    python bench/soak.py --minutes 5 --rate 4     # shorter
    python bench/soak.py --smoke                  # seconds, for CI

Starts the real daemon (`poolwatch run`), writes a fresh seeded 640x480 JPEG every 1/rate s (a new
photo each time, so every file is checked, decoded and embedded), sends SIGUSR1 every `--run-every`
minutes (a sampling run over the growing store), and samples the daemon's VmRSS / RssAnon / RssFile
every `--sample` seconds. Growth is the median RSS of the last tenth of the soak less the median of the
tenth after a warm-up (the first tenth, at least the first sampling run). Prints a table per minute.
"""

from __future__ import annotations

import argparse
import io
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from _common import clean_up, committed, free_port, machine, photo, proc_memory_mb, scrape, start_daemon, terminate, wait


def runs_total(metrics: dict[str, float], outcome: str) -> float:
    return sum(v for k, v in metrics.items()
               if k.startswith("poolwatch_sampling_runs_total{") and f'outcome="{outcome}"' in k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=2.0, help="files per second")
    ap.add_argument("--run-every", type=float, default=10.0, help="minutes between SIGUSR1 sampling runs")
    ap.add_argument("--sample", type=float, default=15.0, help="seconds between memory samples")
    ap.add_argument("--arg", action="append", default=[], help="extra key=value for the daemon")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.minutes, args.rate, args.run_every, args.sample = 0.1, 4.0, 0.05, 1.0
    print(f"machine: {machine()}")
    print(f"soak: {args.minutes:g} min, {args.rate:g} files/s (640x480 JPEG), SIGUSR1 every {args.run_every:g} min")
    work = Path(tempfile.mkdtemp(prefix="pw-bench-soak-"))
    inp, shared = work / "in", work / "shared"
    inp.mkdir()
    port = free_port()
    daemon = start_daemon(inp, shared, port, ["stopping_condition.n_samples=0.1", *args.arg])
    samples: list[tuple[float, float, dict[str, float]]] = []  # (elapsed s, files written, memory)
    try:
        start = time.monotonic()
        end = start + args.minutes * 60
        next_run = start + args.run_every * 60
        next_sample = start
        written = 0
        print("| minute | files written | committed | runs | VmRSS MB | RssAnon MB | RssFile MB |")
        print("|---|---|---|---|---|---|---|")
        last_minute = -1
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= start + written / args.rate:
                buf = io.BytesIO()
                photo(1_000_000 + written, (640, 480)).save(buf, "JPEG", quality=90)
                tmp = inp / f".s_{written:06d}.tmp"
                tmp.write_bytes(buf.getvalue())
                os.replace(tmp, inp / f"s_{written:06d}.jpg")
                written += 1
            if now >= next_run:
                daemon.send_signal(signal.SIGUSR1)
                next_run += args.run_every * 60
            if now >= next_sample:
                if daemon.poll() is not None:
                    raise SystemExit(f"the daemon exited with {daemon.returncode}")
                samples.append((now - start, written, proc_memory_mb(daemon.pid)))
                next_sample += args.sample
                minute = int((now - start) // 60)
                if minute != last_minute:
                    last_minute = minute
                    m = samples[-1][2]
                    runs = runs_total(scrape(port), "ok")
                    print(f"| {minute} | {written} | {len(committed(shared))} | {runs:.0f} | {m['VmRSS']:.0f} | "
                          f"{m['RssAnon']:.0f} | {m['RssFile']:.0f} |", flush=True)
            time.sleep(min(0.05, max(0.0, start + written / args.rate - time.monotonic())))
        wait(lambda: len(committed(shared)) >= written, 600, "the last files to be committed", poll=0.5)
        samples.append((time.monotonic() - start, written, proc_memory_mb(daemon.pid)))
        tenth = max(1, len(samples) // 10)
        warm = max(tenth, next(i for i, s in enumerate(samples) if s[0] >= args.run_every * 60)
                   if samples[-1][0] >= args.run_every * 60 else tenth)
        early = [s[2]["VmRSS"] for s in samples[warm:warm + tenth]] or [samples[0][2]["VmRSS"]]
        late = [s[2]["VmRSS"] for s in samples[-tenth:]]
        early_anon = [s[2]["RssAnon"] for s in samples[warm:warm + tenth]] or [samples[0][2]["RssAnon"]]
        late_anon = [s[2]["RssAnon"] for s in samples[-tenth:]]
        metrics = scrape(port)
        print(f"files: {written} written, {len(committed(shared))} committed; sampling runs ok: "
              f"{runs_total(metrics, 'ok'):.0f}, failed: {runs_total(metrics, 'failed'):.0f}")
        print(f"RSS: steady {statistics.median(early):.0f} MB -> end {statistics.median(late):.0f} MB "
              f"(growth {statistics.median(late) - statistics.median(early):+.0f} MB over "
              f"{(samples[-1][0] - samples[warm][0]) / 60:.0f} min; anonymous {statistics.median(early_anon):.0f} -> "
              f"{statistics.median(late_anon):.0f} MB); peak VmHWM {samples[-1][2]['VmHWM']:.0f} MB")
        print(f"SIGTERM -> exit {terminate(daemon, 120)}")
    finally:
        clean_up(daemon, work)


if __name__ == "__main__":
    main()
