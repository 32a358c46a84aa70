"""Decode-only throughput of `read_and_decode`: exact (lightly-embed's pixels) vs scaled (DCT-scaled JPEG decode).

    python bench/decode.py                  # 200 JPEGs at 640x480 and 50 at 1920x1080, input 64, 5 rounds
    python bench/decode.py --input-size 224
    python bench/decode.py --smoke          # seconds: keeps the script working

One process, no pool: read, hash, strict check, decode and resize of every file, with check_corruptness on
(the default). Exact and scaled alternate in every round (the order flips each round); medians of the
rounds are reported. The libjpeg-turbo strict check that exact mode adds on top of Pillow's decode (a 1/8
scale grey decode) is timed alone as well. Files are seeded photo-like JPEGs (quality 90, 4:2:0), read from
the page cache after the first round.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import simplejpeg
from _common import cpu_model, make_jpegs

from poolwatch.pipeline.decode import DecodeSettings, FileRef, read_and_decode


def timed(run: Callable[..., None], *args: object) -> float:
    start = time.perf_counter()
    run(*args)
    return time.perf_counter() - start


def decode_all(refs: list[FileRef], settings: DecodeSettings) -> None:
    for ref in refs:
        decoded = read_and_decode(ref, settings)
        if decoded.verdict is None or not decoded.verdict.ok:
            raise SystemExit(f"{ref.relpath}: {decoded.verdict}")


def strict_check_all(paths: list[Path]) -> None:
    for p in paths:
        simplejpeg.decode_jpeg(p.read_bytes(), colorspace="GRAY", min_width=1, min_height=1, strict=True)


def bench_set(label: str, paths: list[Path], input_size: int, rounds: int) -> None:
    refs = [FileRef(str(p.parent), p.name, 0, 0) for p in paths]
    modes = {"exact": DecodeSettings(input_size=input_size, exact_decode=True),
             "scaled": DecodeSettings(input_size=input_size, exact_decode=False)}
    decode_all(refs, modes["exact"])  # warm the page cache and the imports
    rates: dict[str, list[float]] = {"exact": [], "scaled": [], "check": []}
    for r in range(rounds):
        order = ["exact", "scaled"] if r % 2 == 0 else ["scaled", "exact"]
        for mode in order:
            rates[mode].append(len(refs) / timed(decode_all, refs, modes[mode]))
        rates["check"].append(len(refs) / timed(strict_check_all, paths))
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\n## {label}: {len(refs)} files, input {input_size}, {rounds} rounds (medians, one process)")
    print("| decode | images/s | ms per image |")
    print("|---|---|---|")
    for mode in ("exact", "scaled"):
        print(f"| {mode} | {med[mode]:.0f} | {1000 / med[mode]:.2f} |")
    print(f"| (exact's strict check alone: libjpeg-turbo 1/8 grey) | {med['check']:.0f} | {1000 / med['check']:.2f} |")
    print(f"scaled / exact: {med['scaled'] / med['exact']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="files in the 640x480 set")
    ap.add_argument("--n-hd", type=int, default=50, help="files in the 1920x1080 set (0 = skip)")
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "poolwatch-bench-decode")
    ap.add_argument("--smoke", action="store_true", help="tiny run to keep the script working")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.n_hd, args.rounds = 8, 2, 1
    print(f"machine: {dt.date.today().isoformat()} · {cpu_model()} · {os.cpu_count()} cores · "
          f"Python {platform.python_version()} · simplejpeg {simplejpeg.__version__}")
    vga = make_jpegs(args.data / f"640x480-{args.n}", args.n, (640, 480))
    bench_set("640x480 JPEG", vga, args.input_size, args.rounds)
    if args.n_hd:
        hd = make_jpegs(args.data / f"1920x1080-{args.n_hd}", args.n_hd, (1920, 1080), seed=7)
        bench_set("1920x1080 JPEG", hd, args.input_size, args.rounds)


if __name__ == "__main__":
    main()
