"""Two nodes, one PostgreSQL store: throughput of two real daemons ingesting a burst each, and nothing lost.

    python bench/multinode.py                 # 2 nodes x 5,000 photo-like 320x240 JPEGs, then 1 node (SQLite) x 5,000
    python bench/multinode.py --smoke         # seconds, for CI

Starts a PostgreSQL server in a temp dir (the tests' own, tests/pg_server.py), two daemons (`poolwatch run`,
node.name=a and b, each with its own input and shared dir, store.url the one database), moves each node's
files into its input dir at once (inotify events), and times until every file is an `ok` row. Then checks the
rows: each file exactly once, none lost, none pending, the rules of the store (`Store.row_problems`). The
reference is one daemon on its own SQLite store with one node's share of the files, on the same machine.
Both nodes share this machine's cores, so the two-node figure is what one PostgreSQL store costs, not what
two machines would do (each node of a fleet has its own cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from _common import free_port, machine, make_jpegs, postgres_server, start_daemon, terminate, wait

from poolwatch.pipeline.store import Store


def burst(files: list[Path], inp: Path) -> None:
    for f in files:
        os.rename(f, inp / f.name)


def run_nodes(work: Path, n: int, size: tuple[int, int], url: str | None, nodes: list[str]) -> dict[str, float]:
    staged = {}
    for i, name in enumerate(nodes):
        staged[name] = make_jpegs(work / name / "staging", n, size, seed=1_000_000 * (i + 1))
        (work / name / "input").mkdir(parents=True)
    daemons = {}
    try:
        for name in nodes:
            extra = [f"node.name={name}", *([f"store.url={url}"] if url else [])]
            daemons[name] = start_daemon(work / name / "input", work / name / "shared", free_port(), extra,
                                         log=work / f"{name}.log")

        def opened() -> Store:
            return Store.connect(url, "bench") if url else Store.open(work / nodes[0] / "shared" / "poolwatch.db")

        done: dict[str, float] = {}
        start = time.perf_counter()
        for name in nodes:
            burst(staged[name], work / name / "input")
        with opened() as store:
            def finished() -> bool:
                for name in nodes:
                    if name not in done and store.counts_by_status(name)["ok"] >= n:
                        done[name] = time.perf_counter() - start
                return len(done) == len(nodes)
            wait(finished, 3600, "every file in the store", poll=0.25)
            total = max(done.values())
            counts = store.counts_by_status()
            images = store.images()
            problems = store.row_problems()
        identities = {(r["node"], r["root"], r["relpath"]) for r in images}
        lost = len(nodes) * n - counts["ok"]
        print(f"| {len(nodes)} node(s) x {n:,} files, {'PostgreSQL' if url else 'SQLite'} | {len(nodes) * n / total:.1f} files/s"
              f" in all | " + ", ".join(f"node {k}: {n / v:.1f} files/s ({v:.1f} s)" for k, v in sorted(done.items())) +
              f" | lost {lost}, rows {len(images)} (distinct files {len(identities)}), pending {counts['pending']},"
              f" problems {problems or 'none'} |")
        assert lost == 0 and len(identities) == len(images) == len(nodes) * n and not problems
        return {"seconds": total, "lost": lost}
    finally:
        for d in daemons.values():
            if d.poll() is None:
                terminate(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=5000, help="files per node")
    ap.add_argument("--size", default="320x240")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.files, args.size = 30, "96x72"
    size = tuple(int(x) for x in args.size.split("x"))
    print(f"machine: {machine()}")
    work = Path(tempfile.mkdtemp(prefix="pw-bench-multinode-"))
    try:
        with postgres_server() as server:
            run_nodes(work / "pg", args.files, size, server.url(server.database()), ["a", "b"])  # type: ignore[arg-type]
        if not args.smoke:  # the same code path; the smoke keeps to the shared store
            run_nodes(work / "sqlite", args.files, size, None, ["a"])  # type: ignore[arg-type]
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
