from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openvino  # noqa: F401 - its import starts a telemetry thread pool once; before any test, so it is no leak
import pytest
import rich.style  # noqa: F401 - draws from `random` when first imported (lightly's imports do, during a first training)
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
POOLWATCH = [sys.executable, "-m", "poolwatch.daemon.cli"]


@pytest.fixture(autouse=True)
def no_thread_leaks():
    """Every thread a test starts (pools, samplers, receivers) has ended shortly after it (as watchdog's suite)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 10
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"threads left running: {[t.name for t in leaked]}"


@pytest.fixture(scope="session", autouse=True)
def one_artifact_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every poolwatch process of the suite (they inherit the environment) shares one artifact cache, so a model
    is exported once per session, not once per test. Tests of the cache itself use `own_artifact_cache`."""
    os.environ["POOLWATCH_ARTIFACTS"] = str(tmp_path_factory.mktemp("artifacts"))
    yield
    os.environ.pop("POOLWATCH_ARTIFACTS", None)


@pytest.fixture
def own_artifact_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default cache, <shared_dir>/models/artifacts: the test sees every export it causes."""
    monkeypatch.delenv("POOLWATCH_ARTIFACTS", raising=False)


def _required(what: str) -> None:
    """Skip for want of `what`, except under CI=true, where a missing server or extra fails the run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: the test command installs it; nothing may be skipped for it)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def promtool() -> str:
    """Prometheus's promtool (Debian package `prometheus`): skipped without it, except under CI=true."""
    import shutil

    path = shutil.which("promtool") or ("/usr/bin/promtool" if os.access("/usr/bin/promtool", os.X_OK) else None)
    if path is None:
        _required("promtool is missing: install the Debian package `prometheus` (scripts/system-deps.sh)")
    assert path is not None
    return path


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """One real PostgreSQL server for the session (tests/pg_server.py)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _required("psycopg is not installed: pip install 'poolwatch[postgres]'")
    from .pg_server import Server, ServerMissing

    try:
        server = Server()
    except ServerMissing as exc:
        _required(str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server: Any) -> Iterator[str]:
    """The URL of a fresh database on the session's PostgreSQL server."""
    name = postgres_server.database()
    yield postgres_server.url(name)
    postgres_server.drop(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """'' (SQLite under the test's shared_dir) or the URL of a fresh PostgreSQL database: a test that takes it
    runs on both backends."""
    if request.param == "sqlite":
        return ""
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def open_test_store(store_url: str, tmp_path: Path) -> Any:
    """`open(node=None)` opens the test's store (either backend) as a node."""
    from poolwatch.pipeline.store import Store

    def open_(node: str | None = None) -> Store:
        if store_url:
            return Store.connect(store_url, node)
        return Store.open(tmp_path / "shared" / "poolwatch.db", node=node)

    return open_


@pytest.fixture(autouse=True)
def no_daemon_survives():
    """A daemon a test started (tests/test_daemon.py's `Daemon`) never outlives the test, failed or not.
    Daemons of wider-scoped fixtures, started before this runs, are theirs to stop."""
    def started() -> list:
        module = sys.modules.get(f"{__package__}.test_daemon")
        return list(getattr(getattr(module, "Daemon", None), "registry", []))

    before = {id(d) for d in started()}
    yield
    for d in started():
        if id(d) not in before and d.proc is not None and d.proc.poll() is None:
            d.kill()


@pytest.fixture
def daemons() -> Iterator[list[Any]]:
    """Daemons (tests/test_daemon.py's `Daemon`) a test starts register here; all are killed at teardown."""
    started: list[Any] = []
    yield started
    for d in started:
        d.kill()


def photo(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A photo-like RGB image: smooth gradients, blobs and noise, different for every seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.28)]
        img[..., c] = 127 + 100 * np.sin(fx * x / w * 6.28 + fy * y / h * 6.28 + phase)
    for _ in range(4):
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(5, 30)
        mask = ((x - cx) ** 2 + (y - cy) ** 2) < r**2
        img[mask] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode(image: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*POOLWATCH, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def status_json(shared: Path) -> dict:
    proc = run_cli("status", "--json", f"shared_dir={shared}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    inp, shared = tmp_path / "input", tmp_path / "shared"
    inp.mkdir()
    return inp, shared


# embedding_precision=fp32: a store of 300 images or more would otherwise calibrate int8 and switch to it
# (auto), seconds of work no test of another feature wants; tests/test_engine.py covers auto and int8.
FAST = ["lightly.pre_trained=false", "lightly.loader.batch_size=32", "lightly.loader.num_workers=2",
        "lightly.collate.input_size=32", "embedding_precision=fp32"]


def make_dataset(root: Path, n_ok: int = 180, seed: int = 0) -> dict:
    """Photo-like images plus corrupt files of several kinds and exact duplicates; returns the truth."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("cats", "dogs"):
        (root / sub).mkdir(exist_ok=True)
    truth = {"ok": 0, "duplicate": 0, "corrupt": {}}
    for i in range(n_ok):
        folder = root / ("cats" if i % 2 else "dogs")
        fmt, ext = (("PNG", "png") if i % 5 == 0 else ("JPEG", "jpg"))
        (folder / f"img_{i:04d}.{ext}").write_bytes(encode(photo(seed * 100_000 + i), fmt))
        truth["ok"] += 1
    # exact duplicates: byte copies of earlier files under other names
    for i in range(8):
        src = root / ("cats" if i % 2 else "dogs") / f"img_{i + 1:04d}.jpg"
        if src.exists():
            (root / f"copy_of_{i}.jpg").write_bytes(src.read_bytes())
            truth["duplicate"] += 1
    jpeg = encode(photo(seed + 999_001, (160, 120)), "JPEG", quality=90)
    png = encode(photo(seed + 999_002, (160, 120)), "PNG")
    corrupt = {
        "empty.jpg": (b"", "empty"),
        "random.png": (np.random.default_rng(seed).bytes(5000), "not_an_image"),
        "text.jpg": (b"this is not an image\n" * 20, "not_an_image"),
        "png_named.jpg": (png, "format_mismatch"),
        "cut.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "cut_with_eoi.jpg": (jpeg[: len(jpeg) // 2] + b"\xff\xd9", "truncated"),
        "cut.png": (png[: len(png) // 2], "truncated"),
    }
    for name, (data, reason) in corrupt.items():
        (root / name).write_bytes(data)
        truth["corrupt"][reason] = truth["corrupt"].get(reason, 0) + 1
    (root / "notes.txt").write_text("not an image extension: ignored")
    return truth


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file under root with size, mtime and content: proof that nothing was written there."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, p.read_bytes())
    return out
