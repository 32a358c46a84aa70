"""Per-file limits of the decode workers: a file that takes too long is stopped and gets a verdict, a
worker that dies is replaced, and decoding hostile bytes keeps memory bounded. Real processes, real files."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from poolwatch.daemon import runtime
from poolwatch.pipeline.config import load_config
from poolwatch.pipeline.decode import DecodeSettings, FileRef, collect, read_and_decode
from poolwatch.pipeline.ingest import decode_batches

from .conftest import FAST, encode, photo, run_cli

SETTINGS = DecodeSettings(input_size=32)


def slow_png(path: Path) -> None:
    """A 12,000 x 12,000 PNG (1.7 MB on disk, 432 MB decoded): over a second to decode on any machine here,
    yet within max_pixels, so only the time limit stops it."""
    Image.new("RGB", (12_000, 12_000), (10, 200, 30)).save(path, compress_level=1)


@pytest.fixture(scope="module")
def slow_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slow") / "huge.png"
    slow_png(path)
    return path


def refs_for(folder: Path, names: list[str]) -> list[FileRef]:
    return [FileRef(str(folder), n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in names]


def test_a_file_past_the_time_limit_gets_a_verdict_and_the_pool_goes_on(tmp_path: Path, slow_file: Path) -> None:
    for i in range(5):
        (tmp_path / f"ok{i}.jpg").write_bytes(encode(photo(i)))
    os.link(slow_file, tmp_path / "huge.png")
    config = load_config(["lightly.loader.num_workers=2", "check.decode_timeout=0.3"])
    limit: list[float | None] = [runtime.decode_timeout(config)]
    pool = runtime.decode_executor(config, timeout=lambda: limit[0])  # read at every file, as the daemon does
    assert pool is not None
    try:
        names = ["ok0.jpg", "huge.png", "ok1.jpg", "ok2.jpg"]
        [batch] = list(decode_batches(refs_for(tmp_path, names), SETTINGS, 8, pool))
        verdicts = {d.ref.relpath: d.verdict for d in batch}
        assert verdicts["huge.png"].reason == "decode_timeout" and not verdicts["huge.png"].ok
        assert "decode_timeout" in verdicts["huge.png"].detail
        assert all(verdicts[n].ok for n in names if n != "huge.png"), verdicts
        # the stopped worker was replaced: the pool still decodes, in order
        [after] = list(decode_batches(refs_for(tmp_path, ["ok3.jpg", "ok4.jpg"]), SETTINGS, 8, pool))
        assert [d.ref.relpath for d in after] == ["ok3.jpg", "ok4.jpg"] and all(d.verdict.ok for d in after)
        # without a limit the same file decodes fine: the verdict is about time, not content
        limit[0] = None  # a reload's new check.decode_timeout applies from the next file on
        [again] = list(decode_batches(refs_for(tmp_path, ["huge.png"]), SETTINGS, 8, pool))
        assert again[0].verdict.ok and again[0].verdict.width == 12_000
    finally:
        pool.shutdown(cancel_futures=True)


def test_a_decode_worker_that_dies_is_a_verdict_and_is_replaced(tmp_path: Path) -> None:
    (tmp_path / "ok.jpg").write_bytes(encode(photo(1)))
    pool = runtime.decode_executor(load_config(["lightly.loader.num_workers=1"]))
    assert pool is not None
    try:
        ref = refs_for(tmp_path, ["ok.jpg"])[0]
        dead = collect(pool.submit(os._exit, 9), ref)  # what a segfault in a native decoder looks like from here
        assert not dead.verdict.ok and dead.verdict.reason == "decoder_crashed", dead.verdict
        assert collect(pool.submit(read_and_decode, ref, SETTINGS), ref).verdict.ok
    finally:
        pool.shutdown()


def test_cli_ingest_records_the_timeout_and_ingests_the_rest(tmp_path: Path, slow_file: Path) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    inp.mkdir()
    for i in range(6):
        (inp / f"ok{i}.jpg").write_bytes(encode(photo(10 + i)))
    os.link(slow_file, inp / "huge.png")
    proc = run_cli("ingest", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "check.decode_timeout=0.3",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr
    conn = sqlite3.connect(shared / "poolwatch.db")
    rows = dict(((rel, (status, reason)) for rel, status, reason in conn.execute("SELECT relpath, status, reason FROM images")))
    conn.close()
    assert rows.pop("huge.png") == ("corrupt", "decode_timeout")
    assert set(rows) == {f"ok{i}.jpg" for i in range(6)} and all(v == ("ok", None) for v in rows.values()), rows
    # retried on change: a smaller file under the same name is decoded and accepted
    (inp / "huge.png").unlink()
    (inp / "huge.png").write_bytes(encode(photo(99), "PNG"))
    proc = run_cli("ingest", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "check.decode_timeout=0.3", timeout=300)
    assert proc.returncode == 0, proc.stderr
    conn = sqlite3.connect(shared / "poolwatch.db")
    assert conn.execute("SELECT status FROM images WHERE relpath='huge.png'").fetchone() == ("ok",)
    conn.close()


MEMORY_PROBE = r"""
import sys
from pathlib import Path
from poolwatch.pipeline.decode import DecodeSettings, FileRef, read_and_decode
def hwm_mb():  # this process's own peak (ru_maxrss would include the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) // 1024
folder = Path(sys.argv[1])
settings = DecodeSettings(input_size=64, max_pixels=50_000_000)
base = hwm_mb()
for p in sorted(folder.iterdir()):
    d = read_and_decode(FileRef(str(folder), p.name, 0, 0), settings)
    assert d.verdict is not None
print(base, hwm_mb())
"""


def test_hostile_corpus_decodes_in_bounded_memory(tmp_path: Path) -> None:
    """Every hostile file, the decompression bomb included, through one decode process: its peak RSS stays
    within what the largest legitimate image (max_pixels) may cost, and far from the bomb's claim."""
    from .test_hostile_inputs import corpus

    for name, data in corpus().items():
        (tmp_path / name).write_bytes(data)
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    base_mb, peak_mb = map(int, proc.stdout.split())
    print(f"decode process: {base_mb} MB after imports, {peak_mb} MB peak over {len(corpus())} hostile files")
    # the bomb claims 20,000 x 20,000 (400 MP, 1.2 GB as RGB); the largest real file here is 1 x 65,535
    assert peak_mb - base_mb < 300, (base_mb, peak_mb)
