"""`poolwatch ingest --ray` on a real local Ray cluster (one for the session, 2 CPUs): the same verdicts and vectors
as a plain `poolwatch ingest`, a driver killed mid-pass resumes, and a missing extra is one line."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from poolwatch.daemon.ray_ingest import PIP_COMMAND

from .conftest import FAST, POOLWATCH, _required, encode, make_dataset, photo, run_cli
from .test_ingest_cli import ingest, table

N_FILES = 300
RAY_START_TIMEOUT = 60
CLI_TIMEOUT = 180
# Vectors of one model from two processes (batches of other sizes, one thread against two): OpenVINO fp32 agrees to
# float32 rounding; measured max |a-b| 0 here. np.allclose's defaults (rtol 1e-5, atol 1e-8) would do, this leaves
# room for another CPU's kernels while staying far below the DESIGN's 1e-4 (relative) for the fp32 path.
RTOL, ATOL = 1e-4, 1e-6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RayCluster:
    """`ray start --head --block` with 2 CPUs, in its own session and temp dir, started at once; `address` waits until
    it is up (a test does its local work meanwhile). The block process stops its cluster on SIGTERM; its process
    group goes after it, so nothing it started outlives the session."""

    def __init__(self) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="pw-ray-"))  # short: Ray's unix sockets live under it (108 bytes max)
        self.port = free_port()
        self.log = self.temp / "ray-start.log"
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=2",
               f"--port={self.port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
               "--disable-usage-stats", f"--temp-dir={self.temp}", f"--dashboard-agent-listen-port={free_port()}"]
        if importlib.util.find_spec("grpc") is not None:  # ray[client]: its server would take port 10001 every time
            cmd.append(f"--ray-client-server-port={free_port()}")
        # Token authentication, as Ray's own default for new clusters, with a token of the session's own: nothing is
        # read from or written to ~/.ray. The drivers get it through `env`.
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env})

    @functools.cached_property
    def address(self) -> str:
        deadline = time.monotonic() + RAY_START_TIMEOUT
        while b"Ray runtime started" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start failed: {self.log.read_text()[-3000:]}")
            time.sleep(0.05)
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # whatever of its group is left (the group is its own)
        self.proc.wait(timeout=10)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    if importlib.util.find_spec("ray") is None:
        _required(f"ray is not installed: {PIP_COMMAND}")
    cluster = RayCluster()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 files: photos, 7 corrupt files, 8 byte-identical copies and 10 re-saved copies (near duplicates); read
    only, as every input dir is to poolwatch, so the tests share them."""
    root = tmp_path_factory.mktemp("ray-input")
    make_dataset(root, n_ok=N_FILES - 7 - 8 - 10)
    originals = sorted((root / "dogs").glob("*.jpg"))
    for i, src in enumerate(originals[:8]):
        (root / f"same_bytes_{i}.jpg").write_bytes(src.read_bytes())
    for i in range(10):
        (root / f"resaved_{i}.jpg").write_bytes(encode(photo(i * 2), "JPEG", quality=60))  # dogs/img_{2i}, re-saved
    assert sum(1 for p in root.rglob("*") if p.is_file() and p.suffix != ".txt") == N_FILES
    return root


def ray_args(inp: Path, shared: Path, cluster: RayCluster, *extra: str) -> list[str]:
    return ["ingest", "--ray", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST,
            f"ray.address={cluster.address}", *extra]


def ray_ingest(inp: Path, shared: Path, cluster: RayCluster, *extra: str) -> tuple[dict[str, Any], str]:
    proc = run_cli(*ray_args(inp, shared, cluster, *extra), timeout=CLI_TIMEOUT, env=cluster.env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def verdicts(db: Path) -> dict[str, dict[str, Any]]:
    """Each file's row, ids replaced by paths (duplicate_of, near_duplicate_of, and the ids a detail names)."""
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in conn.execute("SELECT * FROM images")]
    path = {r["id"]: r["relpath"] for r in rows}
    out = {}
    for r in rows:
        for key in ("duplicate_of", "near_duplicate_of"):
            r[key] = path.get(r[key]) if r.get(key) is not None else None
        if r["detail"]:
            r["detail"] = re.sub(r"image (\d+)", lambda m: f"image {path[int(m.group(1))]}", r["detail"])
        for volatile in ("id", "root", "first_seen", "updated", "near_model_id", "near_distance"):
            r.pop(volatile, None)
        out[r["relpath"]] = r
    return out


def vectors(db: Path) -> dict[str, np.ndarray]:
    q = "SELECT i.relpath, e.vector FROM embeddings e JOIN images i ON i.id = e.image_id"
    return {rel: np.frombuffer(blob, np.float32) for rel, blob in table(db, q)}


def near_distances(db: Path) -> dict[str, float]:
    return dict(table(db, "SELECT relpath, near_distance FROM images WHERE near_distance IS NOT NULL"))


def test_same_verdicts_and_vectors_as_a_local_ingest(inputs: Path, tmp_path: Path, ray_cluster: RayCluster) -> None:
    inp = inputs
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    plain = ingest(inp, local)  # while the cluster starts
    # shards of 20 against batches of 32: the batches are put back together from several actors' shards
    summary, log = ray_ingest(inp, on_ray, ray_cluster, "ray.shard_size=20")
    assert plain["processed"] == summary["processed"] == N_FILES
    assert "2 actors ready" in log and "1 threads and 1 decode workers each" in log, log[-3000:]
    for key in ("ok", "corrupt", "duplicate", "near_duplicate", "missing"):
        assert summary[key] == plain[key], key
    assert plain["duplicate"] == 8 and plain["corrupt"] == 7 and plain["near_duplicate"] > 0

    a, b = verdicts(local / "poolwatch.db"), verdicts(on_ray / "poolwatch.db")
    assert len(a) == N_FILES and a == b
    near_a, near_b = near_distances(local / "poolwatch.db"), near_distances(on_ray / "poolwatch.db")
    assert near_a.keys() == near_b.keys()
    assert np.allclose([near_a[k] for k in near_a], [near_b[k] for k in near_a], rtol=RTOL, atol=ATOL)
    va, vb = vectors(local / "poolwatch.db"), vectors(on_ray / "poolwatch.db")
    assert va.keys() == vb.keys() and len(va) == plain["ok"]
    for rel in va:
        assert np.allclose(va[rel], vb[rel], rtol=RTOL, atol=ATOL), (rel, np.abs(va[rel] - vb[rel]).max())
    assert table(on_ray / "poolwatch.db", "PRAGMA integrity_check") == [("ok",)]
    # nothing left: the cluster is not even joined
    again, log = ray_ingest(inp, on_ray, ray_cluster)
    assert again["processed"] == 0 and "actors ready" not in log


def rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return int(conn.execute("SELECT count(*) FROM images").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the schema is being made
        return 0


def test_killed_driver_resumes_without_doing_anything_twice(inputs: Path, tmp_path: Path,
                                                            ray_cluster: RayCluster) -> None:
    inp, shared = inputs, tmp_path / "shared"
    db = shared / "poolwatch.db"
    # one actor, batches and shards of 8: 38 commits, the driver is killed half-way, more than a second before the end
    small = ["ray.num_actors=1", "ray.shard_size=8", "lightly.loader.batch_size=8"]
    with (tmp_path / "driver.log").open("wb") as err:
        driver = subprocess.Popen([*POOLWATCH, *ray_args(inp, shared, ray_cluster, *small)], stdout=subprocess.DEVNULL,
                                  stderr=err, env={**os.environ, **ray_cluster.env})
    try:
        deadline = time.monotonic() + CLI_TIMEOUT
        while rows(db) < N_FILES // 2:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no batch was committed in time"
            time.sleep(0.01)
        assert driver.poll() is None, "the pass ended before it could be killed"
        os.kill(driver.pid, signal.SIGKILL)
    finally:
        driver.kill()
        driver.wait(timeout=30)
    committed = rows(db)
    assert N_FILES // 2 <= committed < N_FILES

    rerun, _log = ray_ingest(inp, shared, ray_cluster, *small)
    assert rerun["processed"] == N_FILES - committed  # only what was left
    assert table(db, "SELECT count(*), count(DISTINCT relpath) FROM images") == [(N_FILES, N_FILES)]
    counts = dict(table(db, "SELECT status, count(*) FROM images GROUP BY status"))
    assert counts == {"ok": N_FILES - 7 - 8, "duplicate": 8, "corrupt": 7}
    assert table(db, "SELECT count(*), count(DISTINCT image_id) FROM embeddings") == [(N_FILES - 15, N_FILES - 15)]
    assert table(db, "PRAGMA integrity_check") == [("ok",)]


def test_missing_ray_is_one_line_naming_the_pip_command(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    make_dataset(inp, n_ok=2)
    hide = "import sys; sys.modules['ray'] = None; from poolwatch.daemon.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", hide, "ingest", "--ray", f"input_dir={inp}", f"shared_dir={shared}",
                           *FAST], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poolwatch: error: ingest --ray needs Ray"), proc.stderr
    assert lines[0].endswith(PIP_COMMAND)
    assert not (shared / "poolwatch.db").exists()  # nothing was loaded or written before
