"""Shared bench helpers: seeded photo-like JPEGs, the machine, the daemon as a subprocess, its store and metrics."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import platform
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def postgres_server() -> Iterator[Any]:
    """A real PostgreSQL server in a temp dir for the length of a bench (the tests' own, tests/pg_server.py)."""
    sys.path.insert(0, str(ROOT))
    from tests.pg_server import Server

    server = Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    """A photo-like image (smooth colour fields, shapes, sensor noise), different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.03, 0.2) * w
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
        base[mask] = base[mask] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    base += rng.normal(0, 6, base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def make_jpegs(folder: Path, n: int, size: tuple[int, int], seed: int = 0, quality: int = 90) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:05d}.jpg"
        if not p.exists():
            buf = io.BytesIO()
            photo(seed * 1_000_003 + i, size).save(buf, "JPEG", quality=quality)
            p.write_bytes(buf.getvalue())
        paths.append(p)
    return paths


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def machine() -> str:
    model = cpu_model()
    gpu = "no GPU"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a broken torch or driver only means the line says "no GPU"
        pass
    return (f"{dt.date.today().isoformat()} · {platform.node()} · {model} · {os.cpu_count()} cores · {gpu} · "
            f"Python {platform.python_version()}")


def children_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def committed(shared: Path) -> dict[str, float]:
    """relpath -> commit time (time.time()) of every image row, read-only."""
    db = shared / "poolwatch.db"
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(conn.execute("SELECT relpath, updated FROM images"))
    finally:
        conn.close()


def wait(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(poll)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def proc_memory_mb(pid: int) -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile of a process, in MB."""
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) / 1024
    return out


def start_daemon(inp: Path, shared: Path, port: int, extra: list[str], log: Path | None = None) -> subprocess.Popen:
    """`poolwatch run` on inp/shared; returns once /healthz answers."""
    cmd = [str(Path(sys.executable).parent / "poolwatch"), "run", f"input_dir={inp}", f"shared_dir={shared}",
           f"metrics.port={port}", "lightly.pre_trained=false", *extra,
           "--log-level", "WARNING" if log is None else "INFO"]
    if log is None:
        daemon = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    else:
        with open(log, "ab") as out:  # the child has its own copy of the descriptor
            daemon = subprocess.Popen(cmd, stdout=out, stderr=out)

    def healthy() -> bool:
        if daemon.poll() is not None:
            raise SystemExit(f"the daemon exited with {daemon.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    wait(healthy, 120, "the daemon to start", poll=0.1)
    return daemon


def terminate(daemon: subprocess.Popen, timeout: float = 120) -> int:
    """SIGTERM, then its exit code (a graceful stop is part of what the benches check)."""
    daemon.send_signal(signal.SIGTERM)
    return daemon.wait(timeout=timeout)


def clean_up(daemon: subprocess.Popen, work: Path) -> None:
    """Whatever happened: no daemon left running, no temp tree left behind."""
    if daemon.poll() is None:
        daemon.kill()
        daemon.wait(30)
    shutil.rmtree(work, ignore_errors=True)


def scrape(port: int) -> dict[str, float]:
    """The daemon's /metrics as {'name{label="v"}': value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out
