"""Store at scale: load all vectors of a run from 1M rows (SQLite vs PostgreSQL); reconcile 100k unchanged files.

    python bench/store.py                 # 1,000,000 vectors (d=32), 100,000 files; needs PostgreSQL's server binaries
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
from _common import machine, postgres_server

from poolwatch.pipeline.decode import DecodeSettings
from poolwatch.pipeline.embed import Embedder, ModelSpec, load_model
from poolwatch.pipeline.ingest import activate_model, ingest_pass
from poolwatch.pipeline.store import Store, vector_hash


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def fill(store: Store, n: int, dim: int, model_id: int) -> None:
    """n ok images with a vector each, written the fastest way each engine takes rows (COPY on PostgreSQL)."""
    rng = np.random.default_rng(0)
    now = time.time()
    chunk = 50_000
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        vecs = rng.normal(size=(m, dim)).astype(np.float32)
        root = store.b.path("/bench")
        images = [(start + i + 1, "bench", root, store.b.path(f"d{(start + i) // 1000:04d}/img_{start + i:07d}.jpg"),
                   1, 1, f"h{start + i}", "ok", now, now) for i in range(m)]
        vectors = [(start + i + 1, model_id, vecs[i].tobytes(), vector_hash(vecs[i]), start + i + 1) for i in range(m)]
        with store.transaction():
            if store.dialect == "postgresql":
                conn = store.b.conn  # type: ignore[attr-defined]
                with conn.cursor() as cur:
                    with cur.copy("COPY images (id, node, root, relpath, size, mtime_ns, hash, status, first_seen, updated)"
                                  " FROM STDIN") as copy:
                        for row in images:
                            copy.write_row(row)
                    with cur.copy("COPY embeddings (image_id, model_id, vector, vhash, seq) FROM STDIN") as copy:
                        for row in vectors:
                            copy.write_row(row)
            else:
                store.b.executemany("INSERT INTO images (id, node, root, relpath, size, mtime_ns, hash, status, first_seen,"
                                    " updated) VALUES (?,?,?,?,?,?,?,?,?,?)", images)
                store.b.executemany("INSERT INTO embeddings (image_id, model_id, vector, vhash, seq) VALUES (?,?,?,?,?)",
                                    vectors)
    if store.dialect == "postgresql":  # the rows came with their ids: new rows continue after them
        store.b.execute("SELECT setval(pg_get_serial_sequence('images', 'id'), ?, false)", (n + 1,))
        store.b.execute("ANALYZE")


def bench_load(work: Path, n: int, dim: int, rounds: int) -> None:
    """A run's vector load (ids + N×d float32 of every candidate) from SQLite and from PostgreSQL, alternated."""
    with postgres_server() as server:
        stores = {"sqlite": Store.open(work / "big.db", node="bench"),
                  "postgresql": Store.connect(server.url(server.database()), "bench")}
        try:
            model_id = 0
            for name, store in stores.items():
                model_id = store.register_model(weights_hash="bench", input_size=64, source="random", detail="bench",
                                                arch={"name": "bench"}, dim=dim, path=None)
                t = time.perf_counter()
                fill(store, n, dim, model_id)
                print(f"fill {name} with {n} rows: {time.perf_counter() - t:.1f}s")
            times: dict[str, list[float]] = {name: [] for name in stores}
            rss: dict[str, float] = {}
            for _ in range(rounds):
                for name, store in stores.items():
                    t = time.perf_counter()
                    got_ids, matrix = store.candidate_vectors(model_id, None, False)
                    times[name].append(time.perf_counter() - t)
                    assert matrix.shape == (n, dim) and got_ids[0] == 1
                    del got_ids, matrix
                    rss[name] = rss_mb()
            bench_commit(stores, model_id, dim, batches=10 if n < 10_000 else 60)
        finally:
            for store in stores.values():
                store.close()
    size = (work / "big.db").stat().st_size + sum(p.stat().st_size for p in work.glob("big.db-*"))
    for name in stores:
        print(f"| load all vectors for a run ({n:,}×{dim}), {name} | {np.median(times[name]):.2f} s (median of {rounds}) |"
              f" {', '.join(f'{x:.2f}' for x in times[name])} | peak RSS so far {rss[name]:.0f} MB |")
    print(f"ratio postgresql / sqlite: {np.median(times['postgresql']) / np.median(times['sqlite']):.2f}  (SQLite file "
          f"{size / 2**20:.0f} MB)")


def bench_commit(stores: dict[str, Store], model_id: int, dim: int, batches: int = 60, size: int = 64) -> None:
    """One ingest batch's transaction as the worker makes it (per image: the row lookup, the duplicate checks,
    the upsert, the vector with its sequence number), on each store, alternated; into the 1M-row stores."""
    from poolwatch.pipeline.store import ImageRecord

    rng = np.random.default_rng(1)
    times: dict[str, list[float]] = {name: [] for name in stores}
    for b in range(batches):
        for name, store in stores.items():
            vecs = rng.normal(size=(size, dim)).astype(np.float32)
            t = time.perf_counter()
            with store.transaction():
                for i in range(size):
                    rel = f"commit/{b:03d}/{i:03d}.jpg"
                    store.image_by_path("/bench", rel)
                    h = f"c{name}{b}-{i}"
                    store.first_ok_with_hash(h)
                    image_id = store.upsert_image(ImageRecord(root="/bench", relpath=rel, size=1, mtime_ns=1, hash=h,
                                                              status="ok"))
                    store.first_ok_with_vector(model_id, vector_hash(vecs[i]))
                    store.put_embedding(image_id, model_id, vecs[i])
            times[name].append(time.perf_counter() - t)
    for name, values in times.items():
        print(f"| commit of one {size}-image batch, {name} (1M rows) | median {np.median(values) * 1000:.1f} ms |"
              f" p90 {np.percentile(values, 90) * 1000:.1f} ms | {batches} batches |")


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
                store.b.execute(
                    "INSERT INTO images (node, root, relpath, size, mtime_ns, hash, status, first_seen, updated)"
                    " VALUES (?,?,?,?,?,?, 'corrupt', ?, ?)",
                    (store.node, str(root), str(p.relative_to(root)), st.st_size, st.st_mtime_ns, "h", now, now))
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
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.files, args.rounds = 2_000, 500, 1
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="pw-bench-store-"))
    try:
        bench_load(work, args.n, args.dim, args.rounds)
        bench_reconcile(work, args.files)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
