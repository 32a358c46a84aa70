"""Ingest throughput: lightly-embed vs `poolwatch ingest` in each mode vs that mode's own limit, same files and cores.

    python bench/ingest.py                      # 2,000 JPEGs at 640x480, then a 1920x1080 set
    python bench/ingest.py --n 300 --repeat 1   # quicker
    python bench/ingest.py --smoke              # seconds: keeps the script working (CI)

Each tool runs as its own process, end to end (start-up, model load, decode, embed, write), alternating
the tools in each of --repeat rounds; medians are reported. Each poolwatch mode runs once first (its first
start: export, and calibration + quantization for int8, timed apart), then every round starts with its
artifact cached, as every start after the first does. A mode's limit is 1 / (1/model-only + 1/decode-only),
both measured in the same round on the same cores: the model and the decoder share the cores.
Same model settings everywhere (resnet-18, num_ftrs 32,
input 64, batch size --batch, --workers decode workers). Offline, lightly-embed and poolwatch both use
random weights, which is fine for timing. With --fastdup-python, fastdup's whole `run()` (its own model) is
timed on the same files too:

    python3.11 -m venv /tmp/fastdup-venv && /tmp/fastdup-venv/bin/pip install fastdup
    python bench/ingest.py --fastdup-python /tmp/fastdup-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _common import machine, make_jpegs

BIN = Path(sys.executable).parent




def run_child_measured(cmd: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run under a tiny wrapper so ru_maxrss covers the tool and its workers (max over the tree)."""
    wrapper = ("import resource, subprocess, sys, time, json;"
               "t=time.perf_counter(); p=subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               "w=time.perf_counter()-t;"
               "print(json.dumps({'rc': p.returncode, 'wall': w,"
               " 'rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,"
               " 'out': p.stdout[-4000:], 'err': p.stderr[-4000:]}))")
    proc = subprocess.run([sys.executable, "-c", wrapper, *cmd], cwd=cwd, capture_output=True, text=True)
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    if data["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{data['err']}")
    return data["wall"], data["rss"], data["out"]


def lightly_embed(folder: Path, work: Path, batch: int, workers: int) -> tuple[float, float]:
    run_dir = work / f"lightly-{time.time_ns()}"
    cmd = [str(BIN / "lightly-embed"), f"input_dir={folder}", "model.name=resnet-18", "model.num_ftrs=32",
           "collate.input_size=64", f"loader.batch_size={batch}", f"loader.num_workers={workers}",
           f"hydra.run.dir={run_dir}"]
    wall, rss, _ = run_child_measured(cmd, work)
    shutil.rmtree(run_dir, ignore_errors=True)
    return wall, rss


FASTDUP_RUN = ("import sys, fastdup; fd = fastdup.create(work_dir=sys.argv[2], input_dir=sys.argv[1]);"
               " fd.run(overwrite=True, num_threads=int(sys.argv[3]))")


def fastdup_run(python: Path, folder: Path, work: Path, workers: int) -> tuple[float, float]:
    """fastdup's whole `run()` (its own model, embeddings, similarity, outliers) in its own venv."""
    out = work / f"fastdup-{time.time_ns()}"
    wall, rss, _ = run_child_measured([str(python), "-c", FASTDUP_RUN, str(folder), str(out), str(max(1, workers))], work)
    shutil.rmtree(out, ignore_errors=True)
    return wall, rss


def poolwatch_ingest(folder: Path, shared: Path, work: Path, batch: int, workers: int,
                     extra: list[str]) -> tuple[float, float, dict]:
    """One `poolwatch ingest` into a fresh store in `shared`, whose models/ (the exported and quantized
    artifacts) is kept from the variant's first run: every run after it starts with the artifact cached."""
    for f in shared.glob("poolwatch.db*"):
        f.unlink()
    cmd = [str(BIN / "poolwatch"), "ingest", "--json", f"input_dir={folder}", f"shared_dir={shared}",
           "lightly.pre_trained=false", f"lightly.loader.batch_size={batch}", f"lightly.loader.num_workers={workers}",
           *extra, "--log-level", "WARNING"]
    wall, rss, out = run_child_measured(cmd, work)
    return wall, rss, json.loads(out.strip().splitlines()[-1])


def model_only(shared: Path, folder: Path, extra: list[str], batch: int, rounds: int = 5) -> tuple[float, bool]:
    """The variant's engine alone (its cached artifact) on batches of photo pixels: images/s, median of `rounds`;
    and whether it decodes exactly (the store's decode mode, which `auto` decides)."""
    import numpy as np

    from poolwatch.daemon import runtime
    from poolwatch.pipeline.config import load_config
    from poolwatch.pipeline.store import Store

    config = load_config([f"input_dir={folder}", f"shared_dir={shared}", "lightly.pre_trained=false", *extra])
    with Store.open(config.store_path) as store:
        engine = runtime.load_engine(config, store=store)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, engine.input_size, engine.input_size, 3), dtype=np.uint8)
    engine.embed(x)
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        engine.embed(x)
        times.append(time.perf_counter() - t)
    return batch / statistics.median(times), engine.exact_decode


def decode_only(paths: list[Path], workers: int, input_size: int, exact: bool, quality: bool = True) -> float:
    from poolwatch.pipeline.decode import DecodeSettings, FileRef, read_and_decode

    settings = DecodeSettings(input_size=input_size, exact_decode=exact, measure_quality=quality)
    refs = [FileRef(str(p.parent), p.name, 0, 0) for p in paths]
    start = time.perf_counter()
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            for _ in pool.map(read_and_decode, refs, [settings] * len(refs), chunksize=16):
                pass
    else:
        for r in refs:
            read_and_decode(r, settings)
    return len(paths) / (time.perf_counter() - start)


BARE = ["quality.measure=false", "near_duplicate.threshold=-1"]
GIVEN_THRESHOLD = "near_duplicate.threshold=0.0108"  # what auto calibrates for the default model (docs/BENCHMARKS.md)
VARIANTS = {
    "default (auto)": [],
    "given (auto, a given near-duplicate threshold: the verdicts without the one-time calibration)": [GIVEN_THRESHOLD],
    "lookups (auto, a given threshold, no quality signals: the near-duplicate lookups alone)":
        [GIVEN_THRESHOLD, "quality.measure=false"],
    "bare (auto, without the verdicts on arrival: no quality signals, no near-duplicate check)": BARE,
    "fp32 + exact decode (lightly-embed's vectors)": ["embedding_precision=fp32", "check.exact_decode=true"],
    "bf16": ["embedding_precision=bf16"],
    "int8": ["embedding_precision=int8"],
    "fastest (int8, scaled decode)": ["embedding_precision=int8", "check.exact_decode=false"],
    "torch fp32 (the previous engine)": ["model.runtime=torch", "embedding_precision=fp32", "check.exact_decode=true"],
}


def bench_set(label: str, folder: Path, paths: list[Path], work: Path, args: argparse.Namespace) -> None:
    n = len(paths)
    variants = {k: [*args.poolwatch_arg, *v] for k, v in VARIANTS.items() if k.split(" ")[0] in args.modes}
    med = statistics.median
    lightly, fastdup = [], []
    pw: dict[str, list[float]] = {v: [] for v in variants}
    eff: dict[str, list[float]] = {v: [] for v in variants}
    model: dict[str, list[float]] = {v: [] for v in variants}
    dec: dict[str, list[float]] = {v: [] for v in variants}
    rss = {"lightly": 0.0, "fastdup": 0.0, **{v: 0.0 for v in variants}}
    shared = {v: work / f"pw-{i}" for i, v in enumerate(variants)}
    first: dict[str, float] = {}
    for v, extra in variants.items():  # first start: export (and calibration + quantization for int8)
        wall, _mem, summary = poolwatch_ingest(folder, shared[v], work, args.batch, args.workers, extra)
        first[v] = wall - n / max(summary["images_per_second"], 1e-9)
    for _ in range(args.repeat):
        if args.fastdup_python:
            wall, mem = fastdup_run(args.fastdup_python, folder, work, args.workers)
            fastdup.append(n / wall)
            rss["fastdup"] = max(rss["fastdup"], mem)
        if not args.skip_lightly:
            wall, mem = lightly_embed(folder, work, args.batch, args.workers)
            lightly.append(n / wall)
            rss["lightly"] = max(rss["lightly"], mem)
        for v, extra in variants.items():
            wall, mem, summary = poolwatch_ingest(folder, shared[v], work, args.batch, args.workers, extra)
            pw[v].append(n / wall)
            eff[v].append(summary["compute_efficiency"])
            rss[v] = max(rss[v], mem)
            rate, exact = model_only(shared[v], folder, extra, args.batch)
            model[v].append(rate)
            dec[v].append(decode_only(paths, args.workers, 64, exact, quality="quality.measure=false" not in extra))
    print(f"\n## {label}: {n} files, batch {args.batch}, {args.workers} decode workers, {args.repeat} rounds (medians)")
    print("| what | images/s end to end | vs lightly-embed | vs fastdup | model-only | decode-only | vs its limit | "
          "compute efficiency | peak RSS MB | first start (export, quantization) s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    if lightly:
        print(f"| lightly-embed | {med(lightly):.1f} | 1.00x | | | | | | {rss['lightly']:.0f} | |")
    if fastdup:
        print(f"| fastdup run() | {med(fastdup):.1f} | | 1.00x | | | | | {rss['fastdup']:.0f} | |")
    for v in variants:
        rate, m, d = med(pw[v]), med(model[v]), med(dec[v])
        limit = 1 / (1 / m + 1 / d)
        vs_l = f"{rate / med(lightly):.2f}x" if lightly else ""
        vs_f = f"{rate / med(fastdup):.2f}x" if fastdup else ""
        print(f"| poolwatch ingest, {v} | {rate:.1f} | {vs_l} | {vs_f} | {m:.1f} | {d:.1f} | {rate / limit:.2f} | "
              f"{med(eff[v]):.2f} | {rss[v]:.0f} | {first[v]:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--n-hd", type=int, default=300, help="files in the 1920x1080 set (0 = skip)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "poolwatch-bench-ingest")
    ap.add_argument("--skip-lightly", action="store_true")
    ap.add_argument("--modes", nargs="+", default=["default", "fp32", "int8"],
                    help=f"poolwatch variants to run (first word of: {', '.join(VARIANTS)})")
    ap.add_argument("--fastdup-python", type=Path, help="python of a separate venv with fastdup installed "
                    "(non-commercial licence: a local comparison only, never a dependency)")
    ap.add_argument("--poolwatch-arg", action="append", default=[], help="extra key=value for poolwatch")
    ap.add_argument("--smoke", action="store_true", help="tiny run to keep the script working")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.n_hd, args.repeat, args.batch, args.modes = 16, 0, 1, 8, ["default", "fp32"]
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="pw-bench-"))
    try:
        vga = args.data / f"640x480-{args.n}"
        bench_set("640x480 JPEG", vga, make_jpegs(vga, args.n, (640, 480)), work, args)
        if args.n_hd:
            hd = args.data / f"1920x1080-{args.n_hd}"
            bench_set("1920x1080 JPEG", hd, make_jpegs(hd, args.n_hd, (1920, 1080), seed=7), work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
