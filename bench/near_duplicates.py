"""Near-duplicate lookups (issue 15): the nearest stored vector of each new image, brute force vs ANN libraries.

    nice -n 10 .venv/bin/python bench/near_duplicates.py                          # d=32 and 384 at 10k, 100k, 1M
    .venv/bin/python bench/near_duplicates.py --sizes 10000,100000 --dims 32      # a subset
    .venv/bin/python bench/near_duplicates.py --smoke                             # seconds: keeps the script working

For each d and stored size N (seeded Gaussian vectors, the hardest case for a graph index: no structure):

- methods: `brute force` (pipeline.vector_index.VectorIndex in exact mode: numpy/BLAS in blocks), `poolwatch ANN`
  (VectorIndex in ANN mode: usearch HNSW, its parameters, distances recomputed exactly) and, up to --all-libs-upto
  stored vectors, the raw alternatives with the same HNSW parameters: hnswlib and faiss IndexHNSWFlat;
- build: seconds to add all N (one call; the threads the library uses by default: all cores), RSS growth, size
  on disk (VectorIndex.save: the matrix, keys, tags and the graph; the others' own files), VectorIndex save/load;
- lookup cost per batch of 64 and of 512 new vectors (fresh random ones: most new images are no duplicate),
  median of --repeat rounds, the methods alternated in each round;
- recall@1 against brute force for 512 fresh random queries and 512 near-duplicates (a stored vector plus
  Gaussian noise of sigma 0.05 per coordinate: far closer than its nearest other vector).

Real vectors: crops of the real photos in the scikit-image / scikit-learn wheels (bench/precision_quality.py's
crops: area 2-60 % of one of 21 photos, 96-384 px), embedded by poolwatch's default engine (OpenVINO, `auto`
precision, resnet-18 32-d) with --checkpoint (default: precision_quality's trained checkpoint when present, else
random weights); the first --real crops are stored, the next 1,000 are the queries (new images, many overlapping
stored crops of the same photo), plus stored vectors with noise. ANN forced (VectorIndex(exact_below=0)).

The crossover EXACT_BELOW: where brute force per batch stops being at least as fast as poolwatch ANN,
interpolated (log-log) between the measured sizes, per d and batch size.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# faiss's OpenMP threads must not spin between calls, stealing the cores from the next method's lookups
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_model, machine  # noqa: E402

from poolwatch.pipeline import vector_index as vi  # noqa: E402
from poolwatch.pipeline.vector_index import VectorIndex  # noqa: E402

NOISE = 0.05
BATCHES = (64, 512)
EF_SWEEP = (64, 128, 256, 512, 1024)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def folder_bytes(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class Method:
    """A way to find the nearest stored vector: build over x (keys 0..N-1), search -> keys (M,)."""

    name = ""

    def build(self, x: np.ndarray) -> None: ...
    def search(self, q: np.ndarray) -> np.ndarray: ...
    def save(self, path: Path) -> None: ...


class Poolwatch(Method):
    def __init__(self, exact: bool) -> None:
        self.exact = exact
        self.name = "brute force" if exact else "poolwatch ANN (usearch)"

    def build(self, x: np.ndarray) -> None:
        self.index = VectorIndex(x.shape[1], exact_below=2**62 if self.exact else 0)
        self.index.add(np.arange(len(x)), x, np.arange(len(x)))

    def search(self, q: np.ndarray) -> np.ndarray:
        return self.index.search(q)[0][:, 0]

    def save(self, path: Path) -> None:
        self.index.save(path, {"bench": True})


class Hnswlib(Method):
    name = "hnswlib"

    def build(self, x: np.ndarray) -> None:
        import hnswlib

        self.index = hnswlib.Index(space="l2", dim=x.shape[1])
        self.index.init_index(max_elements=len(x), ef_construction=vi.EXPANSION_ADD, M=vi.CONNECTIVITY,
                              allow_replace_deleted=True)
        self.index.add_items(x, np.arange(len(x)))
        self.index.set_ef(vi.EXPANSION_SEARCH)

    def search(self, q: np.ndarray) -> np.ndarray:
        return self.index.knn_query(q, 1)[0][:, 0].astype(np.int64)

    def save(self, path: Path) -> None:
        self.index.save_index(str(path))


class Faiss(Method):
    name = "faiss HNSWFlat"

    def build(self, x: np.ndarray) -> None:
        import faiss

        self.index = faiss.IndexHNSWFlat(x.shape[1], vi.CONNECTIVITY)
        self.index.hnsw.efConstruction = vi.EXPANSION_ADD
        self.index.add(x)
        self.index.hnsw.efSearch = vi.EXPANSION_SEARCH

    def search(self, q: np.ndarray) -> np.ndarray:
        return self.index.search(q, 1)[1][:, 0].astype(np.int64)

    def save(self, path: Path) -> None:
        import faiss

        faiss.write_index(self.index, str(path))


def importable(module: str) -> bool:
    """hnswlib and faiss are compared when installed (`pip install hnswlib faiss-cpu`); they are not poolwatch's deps."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def alternatives() -> list[Method]:
    return [m() for m, module in ((Hnswlib, "hnswlib"), (Faiss, "faiss")) if importable(module)]


def median_ms(fn: Callable[[], object]) -> float:
    """One timed call, after a pause: BLAS's and OpenMP's idle threads spin for ~0.1 s after a call and would
    slow whichever method comes next."""
    time.sleep(0.3)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def built(methods: list[Method], x: np.ndarray, work: Path) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for m in methods:
        gc.collect()
        before = rss_mb()
        t = time.perf_counter()
        m.build(x)
        row = {"build_s": time.perf_counter() - t, "rss_mb": rss_mb() - before}
        path = work / f"saved-{m.name.split()[0]}"
        t = time.perf_counter()
        m.save(path)
        row["save_s"], row["disk_mb"] = time.perf_counter() - t, folder_bytes(path) / 1e6
        if isinstance(m, Poolwatch):
            t = time.perf_counter()
            loaded = VectorIndex.load(path, x.shape[1], exact_below=m.index.exact_below)
            row["load_s"] = time.perf_counter() - t
            assert loaded is not None and len(loaded[0]) == len(x)
            del loaded
            # a batch committed: 512 new vectors added (then removed again), median of 3
            new = np.random.default_rng(1).standard_normal((512, x.shape[1]), dtype=np.float32)
            keys = np.arange(len(x), len(x) + 512)
            adds = []
            for _ in range(3):
                adds.append(median_ms(lambda m=m, keys=keys, new=new: m.index.add(keys, new, keys)))  # type: ignore[misc]
                m.index.remove(keys)
            row["add_ms"] = statistics.median(adds)
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        out[m.name] = row
        print(f"    {m.name}: built in {row['build_s']:.1f} s, RSS +{row['rss_mb']:.0f} MB, {row['disk_mb']:.0f} MB on disk",
              flush=True)
    return out


def lookups(methods: list[Method], fresh: np.ndarray, repeat: int) -> dict[str, dict[int, float]]:
    times: dict[str, dict[int, list[float]]] = {m.name: {b: [] for b in BATCHES} for m in methods}
    for m in methods:  # warm-up
        m.search(fresh[:64])
    for r in range(repeat):
        for b in BATCHES:
            q = fresh[(r * b + np.arange(b)) % len(fresh)]
            for m in methods:
                times[m.name][b].append(median_ms(lambda m=m, q=q: m.search(q)))  # type: ignore[misc]
    return {name: {b: statistics.median(v) for b, v in per.items()} for name, per in times.items()}


def hits(x: np.ndarray, q: np.ndarray, found: np.ndarray, truth: np.ndarray) -> float:
    """recall@1: the share of queries whose answer is as near as the true nearest (a tie counts as found)."""
    d_found = np.linalg.norm(x[found].astype(np.float64) - q, axis=1)
    d_true = np.linalg.norm(x[truth].astype(np.float64) - q, axis=1)
    return float(np.mean((found >= 0) & (d_found <= d_true * (1 + 1e-6))))


def recalls(methods: list[Method], x: np.ndarray, queries: dict[str, np.ndarray],
            truth: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    return {m.name: {kind: hits(x, q, m.search(q), truth[kind]) for kind, q in queries.items()}
            for m in methods if not (isinstance(m, Poolwatch) and m.exact)}


def crossover(sizes: list[int], bf: list[float], ann: list[float]) -> str:
    """Where brute force stops being at least as fast as the ANN, log-log interpolated between measured sizes."""
    r = [np.log(b / a) for b, a in zip(bf, ann, strict=True)]  # > 0: the ANN is faster
    if r[0] > 0:
        return f"< {sizes[0]:,}"
    for i in range(1, len(sizes)):
        if r[i] > 0:
            t = r[i - 1] / (r[i - 1] - r[i])
            return f"~{round(np.exp(np.log(sizes[i - 1]) + t * np.log(sizes[i] / sizes[i - 1])), -3):,.0f}"
    return f"> {sizes[-1]:,}"


def real_vectors(n: int, dim: int, work: Path, checkpoint: Path | None) -> tuple[np.ndarray, str]:
    """n real photo crops embedded by poolwatch's default engine (cached in work): resnet-18 with the 32-d head from
    `checkpoint`, or another head size with random weights (no trained 384-d image model offline)."""
    import precision_quality as pq

    from poolwatch.daemon import runtime
    from poolwatch.pipeline.config import load_config
    from poolwatch.pipeline.decode import FileRef
    from poolwatch.pipeline.store import Store

    checkpoint = checkpoint if dim == 32 else None
    label = f"resnet-18 {dim}-d, " + (f"trained ({checkpoint.name})" if checkpoint else "random weights")
    cache = work / f"real_{n}_{dim}_{checkpoint.name if checkpoint else 'random'}.npy"
    if cache.exists():
        return np.load(cache), label
    t = time.monotonic()
    photos = pq.source_photos()
    crops = pq.make_crops(work / "crops", photos, n)
    print(f"  real: {len(crops)} crops made in {time.monotonic() - t:.0f} s", flush=True)
    weights = [f"checkpoint={checkpoint}"] if checkpoint else ["lightly.pre_trained=false"]
    config = load_config([f"shared_dir={work / 'shared'}", f"input_dir={work / 'crops'}", f"store.path=stores/bench{dim}.db",
                          *weights, *pq.lightly_overrides(1), f"lightly.model.num_ftrs={dim}"])
    with Store.open(config.store_path) as store:
        engine = runtime.load_engine(config, store=store)
    refs = [FileRef(str(work / "crops"), p.name, 0, 0) for p in crops]
    vecs = []
    for start in range(0, n, 2000):  # decoded pixels in chunks: bounded memory
        pixels, _hashes = pq.decode_all(config, refs[start:start + 2000])
        vecs.append(pq.embed_all(engine, pixels))
        print(f"  real: {start + len(pixels)} embedded ({engine.runtime} {engine.precision}), "
              f"{time.monotonic() - t:.0f} s", flush=True)
    out = np.concatenate(vecs).astype(np.float32)
    np.save(cache, out)
    return out, label


def real_recall(vecs: np.ndarray, n: int, label: str, repeat: int) -> list[str]:
    """Recall@1 and lookup cost on real vectors: the first n stored, the rest (new crops) and noisy stored ones queried."""
    stored, held = vecs[:n], vecs[n:]
    rng = np.random.default_rng(7)
    methods: list[Method] = [Poolwatch(exact=True), Poolwatch(exact=False), *alternatives()]
    for m in methods:
        m.build(stored)
    sample = rng.integers(0, n, len(held))
    nn_dist = float(np.median(methods[0].index.search(stored[sample], 2)[1][:, 1]))  # type: ignore[attr-defined]
    sigma = 0.1 * nn_dist / np.sqrt(stored.shape[1])
    queries = {"fresh": held, "near": stored[sample] + sigma * rng.standard_normal(held.shape, dtype=np.float32)}
    print(f"\n== real: {n:,} stored crops ({label}), median 1-NN distance {nn_dist:.4f}", flush=True)
    truth = {kind: methods[0].search(q) for kind, q in queries.items()}
    rec = recalls(methods, stored, queries, truth)
    cost = lookups(methods, held, repeat)
    rows = []
    for name in cost:
        r = rec.get(name)
        rows.append([name, f"{cost[name][64]:.1f}", f"{cost[name][512]:.1f}", f"{r['fresh']:.4f}" if r else "exact",
                     f"{r['near']:.4f}" if r else "exact"])
        print("    " + ", ".join(rows[-1]), flush=True)
    return [f"Real vectors: {n:,} stored crops, {label}, median 1-NN distance {nn_dist:.4f}; queries: {len(held):,} new "
            f"crops, and {len(held):,} stored vectors + N(0, {sigma:.4g}²) per coordinate (a tenth of the 1-NN distance):", "",
            table(["method", "ms / 64", "ms / 512", "recall@1 new crops", "recall@1 stored + noise"], rows)]


def table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dims", default="32,384")
    ap.add_argument("--all-libs-upto", type=int, default=100_000,
                    help="hnswlib and faiss are built up to this size (a 1M build costs minutes each)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--real", type=int, default=20_000, help="real crops stored (0: none); 1,000 more are the queries")
    ap.add_argument("--real-dims", default="32,384", help="head sizes of the real vectors (32: --checkpoint's)")
    ap.add_argument("--checkpoint", type=Path,
                    default=Path(tempfile.gettempdir()) / "poolwatch-precision-quality" / "simclr_r18_640x3.ckpt")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "poolwatch-near-duplicates")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, no real vectors: seconds")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.dims, args.repeat, args.real, args.all_libs_upto = "300,3000", "8", 2, 0, 10**9
    sizes = sorted(int(s) for s in args.sizes.split(","))
    dims = [int(d) for d in args.dims.split(",")]
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    print(f"machine: {machine()} · load average {os.getloadavg()[0]:.2f}", flush=True)
    missing = [m for m in ("hnswlib", "faiss") if not importable(m)]
    if missing:
        print(f"not installed, left out: {', '.join(missing)} (pip install hnswlib faiss-cpu to compare them)", flush=True)
    print(f"usearch HNSW: connectivity (M) {vi.CONNECTIVITY}, expansion_add (ef_construction) {vi.EXPANSION_ADD}, "
          f"expansion_search (ef) {vi.EXPANSION_SEARCH}; EXACT_BELOW in the code {vi.EXACT_BELOW:,} "
          f"(d > {vi.WIDE}: {vi.EXACT_BELOW_WIDE:,})", flush=True)
    real = []
    if args.real:  # first: usearch loaded into a process before OpenVINO breaks OpenVINO (pipeline/vector_index.py)
        ckpt = args.checkpoint if args.checkpoint and args.checkpoint.is_file() else None
        real = [real_vectors(args.real + 1000, int(d), work, ckpt) for d in args.real_dims.split(",")]
    results = {}
    for d in dims:
        for n in sizes:
            print(f"\n== d={d}, N={n:,}", flush=True)
            rng = np.random.default_rng(d * 1_000_003 + n)
            x = rng.standard_normal((n, d), dtype=np.float32)
            fresh = rng.standard_normal((512 * 4, d), dtype=np.float32)
            near = x[rng.integers(0, n, 512)] + NOISE * rng.standard_normal((512, d), dtype=np.float32)
            methods: list[Method] = [Poolwatch(exact=True), Poolwatch(exact=False)]
            if n <= args.all_libs_upto:
                methods += alternatives()
            build = built(methods, x, work)
            bf = methods[0]
            queries = {"fresh": fresh[:512], "near": near}
            truth = {kind: bf.search(q) for kind, q in queries.items()}
            rec = recalls(methods, x, queries, truth)
            cost = lookups(methods, fresh, args.repeat)
            sweep = {}
            if n == sizes[-1] and not args.smoke:  # recall vs ef at the largest size, poolwatch's graph
                pw, q512 = methods[1], fresh[:512]
                ann = pw.index._ann  # type: ignore[attr-defined]  # the usearch graph inside the VectorIndex (bench only)
                for ef in EF_SWEEP:
                    ann.expansion_search = ef
                    ms = statistics.median(median_ms(lambda pw=pw, q=q512: pw.search(q)) for _ in range(3))
                    sweep[ef] = (ms, *(hits(x, q, pw.search(q), truth[k]) for k, q in queries.items()))
                    print(f"    ef={ef}: {ms:.0f} ms/512, recall fresh {sweep[ef][1]:.4f}, near {sweep[ef][2]:.4f}", flush=True)
                ann.expansion_search = vi.EXPANSION_SEARCH
            results[d, n] = build, cost, rec, sweep
            for name in cost:
                r = rec.get(name)
                print(f"    {name}: {cost[name][64]:.1f} ms/64, {cost[name][512]:.1f} ms/512"
                      + (f", recall@1 fresh {r['fresh']:.4f} near {r['near']:.4f}" if r else ""), flush=True)
            del methods, bf, x
            gc.collect()

    real_report = [real_recall(vecs, args.real, label, args.repeat) for vecs, label in real]

    # ---- the report ---------------------------------------------------------------------------------------
    print(f"\n## Near-duplicate lookups, {cpu_model()} ({os.cpu_count()} cores)\n")
    print(f"usearch HNSW M={vi.CONNECTIVITY}, ef_construction={vi.EXPANSION_ADD}, ef={vi.EXPANSION_SEARCH} (hnswlib and faiss: "
          f"the same); lookup: ms per batch of fresh random queries, median of {args.repeat}, methods alternated; "
          f"recall@1 vs brute force, 512 fresh / 512 near-duplicate (stored + N(0, {NOISE}²) per coordinate) queries.\n")
    rows = []
    for (d, n), (build, cost, rec, _sweep) in results.items():
        for name in cost:
            b, r = build[name], rec.get(name)
            rows.append([str(d), f"{n:,}", name, f"{b['build_s']:.1f}", f"{b['rss_mb']:.0f}", f"{b['disk_mb']:.0f}",
                         f"{b['save_s']:.1f} / {b['load_s']:.1f}" if "load_s" in b else "-",
                         f"{b['add_ms']:.0f}" if "add_ms" in b else "-",
                         f"{cost[name][64]:.1f}", f"{cost[name][512]:.1f}",
                         f"{r['fresh']:.4f} / {r['near']:.4f}" if r else "exact"])
    print(table(["d", "N", "method", "build s", "RSS +MB", "disk MB", "save / load s", "add 512 ms", "ms / 64", "ms / 512",
                 "recall@1 fresh / near"], rows))
    print("\nCrossover (brute force at least as fast as poolwatch ANN below):")
    for d in dims:
        got = [n for n in sizes if (d, n) in results]
        for b in BATCHES:
            bf = [results[d, n][1]["brute force"][b] for n in got]
            ann = [results[d, n][1]["poolwatch ANN (usearch)"][b] for n in got]
            print(f"- d={d}, batch {b}: {crossover(got, bf, ann)} vectors")
    for (d, n), (*_rest, sweep) in results.items():
        if sweep:
            print(f"\nRecall vs ef, d={d}, N={n:,} (poolwatch ANN; ms per batch of 512):\n")
            print(table(["ef", "ms / 512", "recall@1 fresh", "recall@1 near"],
                        [[str(ef), f"{ms:.0f}", f"{a:.4f}", f"{c:.4f}"] for ef, (ms, a, c) in sweep.items()]))
    for lines in real_report:
        print("\n" + "\n".join(lines))
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}; whole run {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
