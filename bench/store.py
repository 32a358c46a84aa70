"""Store at scale: load all vectors of a run from 1M rows; reconcile 100k unchanged files.

    python bench/store.py                 # 1,000,000 vectors (d=32), 100,000 files
    python bench/store.py --smoke         # seconds, for CI

Prints the time to build the candidate matrix of a sampling run (ids + N×d float32) from the store,
the DB size and RSS, and the time and model calls of an ingest pass over 100k unchanged files.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine

from poolwatch.pipeline.decode import DecodeSettings
from poolwatch.pipeline.embed import Embedder, ModelSpec, load_model
from poolwatch.pipeline.ingest import activate_model, ingest_pass
from poolwatch.pipeline.store import Store, vector_hash


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill(store: Store, n: int, dim: int, model_id: int) -> None:
    rng = np.random.default_rng(0)
    now = time.time()
    chunk = 50_000
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        vecs = rng.normal(size=(m, dim)).astype(np.float32)
        with store.transaction():
            store.conn.executemany(
                "INSERT INTO images (id, root, relpath, size, mtime_ns, hash, status, first_seen, updated)"
                " VALUES (?, '/bench', ?, 1, 1, ?, 'ok', ?, ?)",
                ((start + i + 1, f"d{(start + i) // 1000:04d}/img_{start + i:07d}.jpg", f"h{start + i}", now, now)
                 for i in range(m)))
            store.conn.executemany(
                "INSERT INTO embeddings (image_id, model_id, vector, vhash) VALUES (?,?,?,?)",
                ((start + i + 1, model_id, vecs[i].tobytes(), vector_hash(vecs[i])) for i in range(m)))


def bench_load(work: Path, n: int, dim: int) -> None:
    with Store.open(work / "big.db") as store:
        model_id = store.register_model(weights_hash="bench", input_size=64, source="random", detail="bench",
                                        arch={"name": "bench"}, dim=dim, path=None)
        t = time.perf_counter()
        fill(store, n, dim, model_id)
        print(f"fill {n} rows: {time.perf_counter() - t:.1f}s")
    size = (work / "big.db").stat().st_size + sum(p.stat().st_size for p in work.glob("big.db-*"))
    base = rss_mb()
    with Store.open(work / "big.db") as store:
        times = []
        for _ in range(3):
            t = time.perf_counter()
            got_ids, matrix = store.candidate_vectors(model_id, None, False)
            times.append(time.perf_counter() - t)
            assert matrix.shape == (n, dim)
    print(f"| load all vectors for a run ({n:,}×{dim}) | {np.median(times):.2f} s (median of 3) | "
          f"DB {size / 2**20:.0f} MB | peak RSS {rss_mb():.0f} MB (before {base:.0f} MB) |")


def bench_reconcile(work: Path, files: int) -> None:
    root = work / "files"
    for i in range(files):
        d = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            d.mkdir(parents=True, exist_ok=True)
        (d / f"img_{i:06d}.jpg").write_bytes(b"x")
    model = load_model(ModelSpec(name="resnet-9", width=0.125, num_ftrs=16, input_size=32), models_dir=work / "m",
                       pretrained=False)
    with Store.open(work / "rec.db") as store:
        embedder = Embedder(model)
        model_id = activate_model(store, embedder)
        now = time.time()
        with store.transaction():  # the files as already ingested, unchanged
            for p in root.rglob("*.jpg"):
                st = p.stat()
                store.conn.execute(
                    "INSERT INTO images (root, relpath, size, mtime_ns, hash, status, first_seen, updated)"
                    " VALUES (?,?,?,?,?, 'corrupt', ?, ?)",
                    (str(root), str(p.relative_to(root)), st.st_size, st.st_mtime_ns, "h", now, now))
        t = time.perf_counter()
        summary = ingest_pass(store, embedder, model_id, [root], DecodeSettings(input_size=32), 64)
        seconds = time.perf_counter() - t
    print(f"| reconcile {files:,} unchanged files | {seconds:.2f} s | {summary.processed} files read | "
          f"{summary.forward_passes} model calls |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.files = 2_000, 500
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="pw-bench-store-"))
    try:
        bench_load(work, args.n, args.dim)
        bench_reconcile(work, args.files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
