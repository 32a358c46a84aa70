"""Exact greedy k-center: poolwatch's `kcenter` against a plain vectorised numpy reference.

    .venv/bin/python bench/coreset.py                                # 1M x 32, k=10,000, clustered data
    .venv/bin/python bench/coreset.py --data uniform
    .venv/bin/python bench/coreset.py --n 200000 --k 2000 --repeat 3
    .venv/bin/python bench/coreset.py --smoke                        # seconds: keeps the script working (CI)

Data (seeded, float32, generated in chunks so that generation does not set the memory high-water mark):

* uniform:   i.i.d. standard Gaussian, N x d.
* clustered: a mixture of --clusters (1,000) Gaussian clusters. Centres ~ N(0, I_d); each cluster has its
  own spread sigma, log-uniform in [0.02, 0.5] (cluster radii sigma * sqrt(d) from 0.11 to 2.8 at d=32,
  against ~8 between centres); cluster weights ~ lognormal(0, 1), normalised; each point picks a cluster
  by weight and is centre + sigma * N(0, I_d).

Reference: the textbook vectorised greedy in float64, as the issue describes it: candidates shifted by
their mean, squared norms once, then per pick one matrix-vector product (the norm trick
|x|^2 - 2 x.c + |c|^2), a running minimum and an argmax; O(N * d) memory. It applies poolwatch's tie
rule (values within 2e-8 relative of the maximum count as tied, the lowest index wins) so that the picks
can be compared exactly; it does not recompute near pairs directly (the generated data have none close
enough to matter). First pick: np.random.default_rng(seed).integers(N), as in poolwatch. Every pick and
its distance are checked against poolwatch's. (--reference-dtype float32 runs the same greedy in float32:
half the memory traffic, but not exact, so its picks are compared and reported, not required to match.)

Each timed run is a fresh process (`--worker`) that generates the data, then runs one algorithm; the
runs alternate (reference, poolwatch, poolwatch, reference, ...) and medians are reported. Times are
wall clock (and process CPU time, which a busy shared machine disturbs less). Memory: the process's peak
RSS (ru_maxrss) less its RSS just before the run, i.e. what the algorithm added on top of the data.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TIE_RTOL = 2e-8  # poolwatch's tie band (pipeline/coreset.py, _TIE_RTOL)
CHUNK = 65536


# --- data ---------------------------------------------------------------------------------------------


def make_data(kind: str, n: int, d: int, seed: int, clusters: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    if kind == "uniform":
        for r0 in range(0, n, CHUNK):
            out[r0 : r0 + CHUNK] = rng.standard_normal((min(CHUNK, n - r0), d), dtype=np.float32)
        return out
    if kind != "clustered":
        raise SystemExit(f"unknown --data {kind!r}")
    centres = rng.standard_normal((clusters, d))
    spread = np.exp(rng.uniform(np.log(0.02), np.log(0.5), clusters))
    weights = rng.lognormal(0.0, 1.0, clusters)
    weights /= weights.sum()
    for r0 in range(0, n, CHUNK):
        m = min(CHUNK, n - r0)
        label = rng.choice(clusters, m, p=weights)
        out[r0 : r0 + m] = centres[label] + rng.standard_normal((m, d)) * spread[label, None]
    return out


# --- the reference ------------------------------------------------------------------------------------


def reference_kcenter(data: np.ndarray, k: int, seed: int, dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """Plain vectorised greedy k-center, float64 (or float32), poolwatch's tie rule. Returns (picks, distances)."""
    x = data.astype(dtype)
    x -= x.mean(axis=0, dtype=np.float64).astype(dtype)
    sqn = np.einsum("ij,ij->i", x, x)
    n = len(x)
    k = min(k, n)
    mind2 = np.full(n, np.inf, dtype)
    picks = np.empty(k, np.int64)
    dists = np.empty(k, np.float64)
    d2 = np.empty(n, dtype)
    j, dist = int(np.random.default_rng(seed).integers(n)), np.inf
    for t in range(k):
        picks[t], dists[t] = j, dist
        mind2[j] = -np.inf
        if t + 1 == k:
            break
        c = x[j]
        np.matmul(x, c * -2.0, out=d2)
        d2 += sqn
        d2 += sqn[j]
        np.minimum(mind2, d2, out=mind2)
        j = int(mind2.argmax())
        top = mind2[j]
        lower = np.flatnonzero(mind2[:j] >= top * (1.0 - TIE_RTOL))
        if len(lower):
            j = int(lower[0])
        dist = float(np.sqrt(np.float64(mind2[j])))
    return picks, dists


# --- one timed run, in its own process ------------------------------------------------------------------


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace) -> None:
    data = make_data(args.data, args.n, args.d, args.seed, args.clusters)
    base = rss_now_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    if args.worker == "reference":
        picks, dists = reference_kcenter(data, args.k, args.seed, args.reference_dtype)
        algorithm = f"reference, {args.reference_dtype}"
    else:
        from poolwatch.pipeline import coreset

        limit = min(args.k, args.n)
        algorithm = args.algorithm
        if algorithm == "auto":
            algorithm = "auto->" + ("pruned" if coreset._prefer_pruned(args.n, args.d, limit) else "plain")
        sel = coreset.kcenter(data, n_samples=args.k, seed=args.seed, device="cpu", algorithm=args.algorithm)
        picks, dists = sel.indices, sel.distances
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    np.savez(args.out, picks=np.asarray(picks, np.int64), dists=np.asarray(dists, np.float64))
    print(json.dumps({"wall": wall, "cpu": cpu, "peak_rss_mb": peak, "base_rss_mb": base,
                      "algorithm": algorithm}))


# --- the driver ---------------------------------------------------------------------------------------


def machine() -> str:
    """Like _common.machine(), plus what k-center timings depend on: usable cores, load, BLAS threads."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import cpu_model

    model = cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    threads = {k: v for k, v in os.environ.items() if k.endswith("_NUM_THREADS")}
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{dt.datetime.now().isoformat(timespec='minutes')} · {platform.node()} · {model} · "
            f"{os.cpu_count()} cores ({usable} usable) · load avg {load} · Python {platform.python_version()} · "
            f"numpy {np.__version__} · threads env {threads or 'default'}")


def run_worker(role: str, args: argparse.Namespace, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", role, "--out", str(out), "--n", str(args.n), "--d", str(args.d),
           "--k", str(args.k), "--data", args.data, "--seed", str(args.seed), "--clusters", str(args.clusters),
           "--algorithm", args.algorithm, "--reference-dtype", args.reference_dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{role} run failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="candidates (default 1,000,000)")
    ap.add_argument("--d", type=int, default=32, help="dimensions (default 32)")
    ap.add_argument("--k", type=int, default=10_000, help="picks, n_samples (default 10,000)")
    ap.add_argument("--data", choices=["clustered", "uniform"], default="clustered")
    ap.add_argument("--clusters", type=int, default=1000, help="mixture components of --data clustered")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="rounds; each round runs both (alternating order)")
    ap.add_argument("--algorithm", choices=["auto", "plain", "pruned"], default="auto",
                    help="poolwatch's kcenter(algorithm=...)")
    ap.add_argument("--reference-dtype", choices=["float64", "float32"], default="float64",
                    help="the reference's precision; float32 halves its memory traffic but is not exact, so its "
                         "picks are compared and reported, not required to match")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, both data kinds, a few seconds")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", choices=["reference", "poolwatch"], help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    configs = [args.data]
    if args.smoke:
        args.n, args.d, args.k, args.clusters, args.repeat = 60_000, 32, 300, 50, 1
        args.algorithm = "pruned"
        configs = ["clustered", "uniform"]
    print(f"machine: {machine()}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in configs:
            args.data = kind
            print(f"\n{kind}: N={args.n:,} d={args.d} k={args.k:,}"
                  + (f" clusters={args.clusters:,}" if kind == "clustered" else "") + f" seed={args.seed}")
            runs: dict[str, list[dict]] = {"reference": [], "poolwatch": []}
            picks: dict[str, np.lib.npyio.NpzFile] = {}
            for r in range(args.repeat):
                order = ["reference", "poolwatch"] if r % 2 == 0 else ["poolwatch", "reference"]
                for role in order:
                    out = Path(tmp) / f"{kind}-{role}-{r}.npz"
                    res = run_worker(role, args, out)
                    runs[role].append(res)
                    print(f"  round {r + 1} {role:9s} ({res['algorithm']}): wall {res['wall']:8.2f} s  "
                          f"cpu {res['cpu']:8.2f} s  +{res['peak_rss_mb'] - res['base_rss_mb']:.0f} MB", flush=True)
                    got = np.load(out)
                    if role in picks:
                        assert np.array_equal(got["picks"], picks[role]["picks"]), f"{role} is not deterministic"
                    picks[role] = got
            ref, pw = picks["reference"], picks["poolwatch"]
            same = bool(np.array_equal(ref["picks"], pw["picks"]))
            first_diff = None if same else int(np.argmax(ref["picks"] != pw["picks"]))
            finite = np.isfinite(ref["dists"])
            rel = np.abs(pw["dists"][finite] - ref["dists"][finite]) / ref["dists"][finite]
            if args.reference_dtype == "float64":
                assert same, f"picks differ (first at {first_diff})"
                assert rel.max() <= 1e-6, f"distances differ by up to {rel.max():.2e} relative"

            row = {"data": kind, "n": args.n, "d": args.d, "k": args.k, "clusters": args.clusters,
                   "seed": args.seed, "repeat": args.repeat, "algorithm": runs["poolwatch"][0]["algorithm"],
                   "reference_dtype": args.reference_dtype}
            for role in runs:
                row[role] = {"wall_s": statistics.median(x["wall"] for x in runs[role]),
                             "cpu_s": statistics.median(x["cpu"] for x in runs[role]),
                             "extra_peak_mb": statistics.median(x["peak_rss_mb"] - x["base_rss_mb"] for x in runs[role]),
                             "walls": [x["wall"] for x in runs[role]]}
            row["speedup_wall"] = row["reference"]["wall_s"] / row["poolwatch"]["wall_s"]
            row["speedup_cpu"] = row["reference"]["cpu_s"] / row["poolwatch"]["cpu_s"]
            row["identical_picks"] = same
            row["first_differing_pick"] = first_diff
            row["max_rel_distance_diff"] = float(rel.max()) if len(rel) else 0.0
            results.append(row)
            verdict = (f"identical picks ({len(ref['picks']):,}), distances within "
                       f"{row['max_rel_distance_diff']:.1e} relative" if same else
                       f"PICKS DIFFER from pick {first_diff} on (float32 reference)")
            print(f"  median: reference {row['reference']['wall_s']:.2f} s, poolwatch {row['poolwatch']['wall_s']:.2f} s"
                  f" -> {row['speedup_wall']:.1f}x wall ({row['speedup_cpu']:.1f}x cpu); {verdict}; "
                  f"extra peak RSS: reference {row['reference']['extra_peak_mb']:.0f} MB, "
                  f"poolwatch {row['poolwatch']['extra_peak_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
