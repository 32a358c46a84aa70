"""Backlog ingest on Ray: `poolwatch ingest` (one process) vs `poolwatch ingest --ray` with 1 actor and one per core.

    python bench/ray_ingest.py                    # 600 JPEGs at 640x480, 3 rounds, a local cluster per run
    python bench/ray_ingest.py --address HOST:PORT  # the --ray variants join that cluster instead
    python bench/ray_ingest.py --smoke            # seconds: keeps the script working (CI)

Each variant runs as its own process, end to end (start-up, model load, for --ray the cluster and the actors,
decode, embed, commit) into a fresh store, with one artifact cache for all (every run after the first finds the
model's artifact cached, as every start after a first does), the variants alternating in each of --repeat rounds;
medians are reported. Besides the end-to-end rate, the table splits a --ray run as its driver logs it: the start-up
(the cluster, the actors loading their engines; with Ray Data they start inside the pass) and the files/s after it,
per actor too, which is what a cluster's throughput is estimated from, and the time the driver (the one writer)
spent committing, looking up near duplicates and calibrating, which bounds it. The `Ray Data` variant feeds the
same actors through Ray Data (`map_batches` on an actor pool, order preserved) instead of the driver's own queue:
the design choice of daemon/ray_ingest.py, measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from _common import machine, make_jpegs

BIN = Path(sys.executable).parent
RAY_LINE = re.compile(r"Ray: (\d+) files on (\d+) actors in ([\d.]+)s: ([\d.]+) files/s, ([\d.]+) files/s per actor; "
                      r"the driver spent ([\d.]+)s")


def variants(actors: Sequence[int], data: bool) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"poolwatch ingest (one process)": []}
    for n in actors:
        out[f"ingest --ray, {n} actor{'s' if n > 1 else ''}"] = ["--ray", f"ray.num_actors={n}"]
    if data:
        n = max(actors)
        out[f"ingest --ray, {n} actor{'s' if n > 1 else ''}, fed by Ray Data"] = ["--ray-data", f"ray.num_actors={n}"]
    return out


def run_once(folder: Path, shared: Path, flags: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """One ingest into a fresh store in `shared` (models/ kept): wall seconds, its summary and its Ray line."""
    for stale in [*shared.glob("poolwatch.db*"), shared / "index"]:
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    options = [f for f in flags if f.startswith("--")]
    overrides = [f for f in flags if not f.startswith("--")]
    if "--ray-data" in options:  # this script, as a child: `poolwatch ingest --ray` with the Ray Data feed
        cmd = [sys.executable, __file__, "--child-ray-data", "--", "ingest", "--ray"]
    else:
        cmd = [str(BIN / "poolwatch"), "ingest", *options]
    if args.address and options:
        overrides.append(f"ray.address={args.address}")
    cmd += ["--json", f"input_dir={folder}", f"shared_dir={shared}", "lightly.pre_trained=false",
            f"lightly.loader.batch_size={args.batch}", f"ray.shard_size={args.shard}",
            f"ray.num_cpus_per_actor={args.cpus_per_actor}", *args.poolwatch_arg, *overrides]
    env = {**os.environ, "POOLWATCH_ARTIFACTS": os.environ.get("POOLWATCH_ARTIFACTS", str(shared.parent / "artifacts"))}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    ray = RAY_LINE.search(proc.stderr)
    mode = re.search(r"on (\w+) with (\w+ \w+), (\w+) decode", proc.stderr)
    return {"wall": wall, "summary": summary, "mode": " ".join(mode.groups()) if mode else "?",
            "ray": {"files": int(ray[1]), "actors": int(ray[2]), "seconds": float(ray[3]), "rate": float(ray[4]),
                    "per_actor": float(ray[5]), "driver": float(ray[6])} if ray else None}


def bench(folder: Path, n: int, work: Path, args: argparse.Namespace) -> None:
    chosen = variants(args.actors, not args.no_data)
    shared = {v: work / f"shared-{i}" for i, v in enumerate(chosen)}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in chosen}
    if not args.smoke:
        run_once(folder, shared[next(iter(chosen))], [], args)  # the first start exports the model: not counted
    for _ in range(args.repeat):
        for v, flags in chosen.items():
            runs[v].append(run_once(folder, shared[v], flags, args))
    med = statistics.median
    where = f"the cluster at {args.address}" if args.address else "a local cluster started by each run (ray.address='')"
    print(f"\n## {n} JPEGs at {args.size[0]}x{args.size[1]}, batch {args.batch}, shards of {args.shard}, {args.repeat} "
          f"rounds (medians); --ray on {where}; model {runs[next(iter(chosen))][0]['mode']}")
    print("| variant | files/s end to end | files/s of the pass | start-up of the pass s (cluster, actors) | "
          "files/s after start-up | files/s per actor | driver busy s (its ceiling, files/s) |")
    print("|---|---|---|---|---|---|---|")
    per_actor: dict[str, tuple[int, float]] = {}  # the driver-fed --ray rows: actors, files/s per actor
    for v, rs in runs.items():
        e2e = med([n / r["wall"] for r in rs])
        pass_rate = med([r["summary"]["images_per_second"] for r in rs])
        if rs[0]["ray"] is None:
            print(f"| {v} | {e2e:.1f} | {pass_rate:.1f} | | | | |")
            continue
        start = med([r["summary"]["seconds"] - r["ray"]["seconds"] for r in rs])
        rate, actor = med([r["ray"]["rate"] for r in rs]), med([r["ray"]["per_actor"] for r in rs])
        driver = med([r["ray"]["driver"] for r in rs])
        if "Ray Data" not in v:
            per_actor[v] = (rs[0]["ray"]["actors"], actor)
        print(f"| {v} | {e2e:.1f} | {pass_rate:.1f} | {start:.1f} | {rate:.1f} | {actor:.1f} | {driver:.2f} "
              f"({n / driver if driver > 0 else float('inf'):.0f}) |")
    if per_actor:
        # The row with the most actors: on a local cluster of one actor per core, each actor has a core of its own
        # there (with fewer actors, an actor's decode worker borrows the idle cores), which is what a cluster's
        # nodes give their actors.
        most = max(per_actor, key=lambda v: per_actor[v][0])
        ceiling = med([n / r["ray"]["driver"] for r in runs[most] if r["ray"]["driver"] > 0] or [float("inf")])
        print(f"\nestimate: k actors of {args.cpus_per_actor} CPU each give about min(k x {per_actor[most][1]:.0f}, "
              f"{ceiling:.0f}) files/s after start-up: the per-actor rate of '{most}' and its driver's ceiling on "
              "this machine (its busy time includes the one-time threshold calibration)")


# --- the Ray Data feed (a child process: `poolwatch ingest --ray` with RaySource._made replaced) ---------------------

def ray_data_child(argv: list[str]) -> int:
    import logging

    import numpy as np

    from poolwatch.daemon import cli, ray_ingest
    from poolwatch.pipeline.decode import FileRef
    from poolwatch.pipeline.ingest import Made

    class DataWorker(ray_ingest.ShardWorker):
        """The same shard worker as a Ray Data callable class (whose constructor arguments are not resolved)."""

        def __init__(self, *args: Any) -> None:
            import ray

            super().__init__(*args[:-1], ray.get(args[-1]))

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            made = self.process(list(batch["ref"]))
            out = np.empty(len(made), dtype=object)
            out[:] = made
            return {"made": out}

    class DataSource(ray_ingest.RaySource):
        """Ray Data starts its own actors (map_batches, an actor pool of ray.num_actors); the driver reads the
        results back in plan order."""

        def _start_actors(self) -> None:
            self.actors = [None] * ray_ingest.plan_actors(self.config, self.ray.available_resources())

        def _made(self, todo: Sequence[FileRef]) -> Iterator[Made]:
            import ray.data  # after the CLI set Ray up (ray_ingest.require_ray)

            r = self.config.ray
            threads = ray_ingest.actor_threads(r.num_cpus_per_actor)
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = True
            ctx.enable_progress_bars = False
            env = {k: os.environ[k] for k in ray_ingest.ENV_PASSED if k in os.environ}
            model = ray.put(ray_ingest.Shipped.of(self.engine))
            ds = ray.data.from_items([{"ref": ref} for ref in todo])
            out = ds.map_batches(DataWorker, fn_constructor_args=(ray_ingest.actor_config(self.config, threads),
                                                                  self.settings, threads, logging.WARNING, env, model),
                                 batch_size=r.shard_size, concurrency=len(self.actors), num_cpus=r.num_cpus_per_actor,
                                 num_gpus=r.num_gpus_per_actor, batch_format="numpy")
            for row in out.iter_rows():
                yield row["made"]

        def close(self) -> None:
            self.actors = []
            super().close()

    ray_ingest.RaySource = DataSource  # type: ignore[misc]  # ingest_once imports it at call time
    return cli.main(argv)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child-ray-data":
        sys.exit(ray_data_child(sys.argv[3:]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=600)
    ap.add_argument("--size", type=int, nargs=2, default=(640, 480), metavar=("W", "H"))
    ap.add_argument("--batch", type=int, default=64, help="lightly.loader.batch_size (the driver's commits)")
    ap.add_argument("--shard", type=int, default=64, help="ray.shard_size")
    ap.add_argument("--actors", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    ap.add_argument("--cpus-per-actor", type=int, default=1, help="ray.num_cpus_per_actor")
    ap.add_argument("--no-data", action="store_true", help="skip the Ray Data variant")
    ap.add_argument("--address", default="", help="ray.address for the --ray variants ('' = a local cluster per run)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "poolwatch-bench-ingest")
    ap.add_argument("--poolwatch-arg", action="append", default=[], help="extra key=value for poolwatch")
    ap.add_argument("--smoke", action="store_true", help="tiny run to keep the script working")
    args = ap.parse_args()
    if args.smoke:
        args.n, args.size, args.repeat, args.batch, args.shard, args.actors = 16, (160, 120), 1, 8, 4, [1]
    print(f"machine: {machine()}")
    folder = args.data / f"{args.size[0]}x{args.size[1]}-{args.n}"
    make_jpegs(folder, args.n, tuple(args.size))
    work = Path(tempfile.mkdtemp(prefix="pw-bench-ray-"))
    try:
        bench(folder, args.n, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
