"""`poolwatch ingest` end to end, as a user runs it: real files, a real SQLite store, subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from .conftest import FAST, encode, make_dataset, photo, run_cli, snapshot, status_json


def ingest(inp: Path, shared: Path, *extra: str) -> dict:
    proc = run_cli("ingest", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_counts_match_truth_and_second_pass_does_nothing(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    truth = make_dataset(inp, n_ok=180)
    before = snapshot(inp)
    first = ingest(inp, shared)
    n_files = truth["ok"] + truth["duplicate"] + sum(truth["corrupt"].values())
    assert first["discovered"] == n_files and first["processed"] == n_files
    status = status_json(shared)
    assert status["images"]["ok"] == truth["ok"]
    assert status["images"]["duplicate"] == truth["duplicate"]
    assert status["corrupt_by_reason"] == truth["corrupt"]
    assert status["embedded"] == truth["ok"]
    assert status["model"]["source"] == "random"

    db = shared / "poolwatch.db"
    rows_before = table(db, "SELECT * FROM images ORDER BY id")
    vectors_before = table(db, "SELECT * FROM embeddings ORDER BY image_id")
    second = ingest(inp, shared)
    assert second["processed"] == 0 and second["forward_passes"] == 0
    assert table(db, "SELECT * FROM images ORDER BY id") == rows_before
    assert table(db, "SELECT * FROM embeddings ORDER BY image_id") == vectors_before
    # nothing under the input dir was modified or created
    assert snapshot(inp) == before


def test_changed_file_is_the_only_one_reprocessed(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    make_dataset(inp, n_ok=40)
    ingest(inp, shared)
    target = inp / "cats" / "img_0001.jpg"
    old = table(shared / "poolwatch.db", "SELECT id, hash FROM images WHERE relpath = 'cats/img_0001.jpg'")[0]
    target.write_bytes(encode(photo(424242), "JPEG"))
    result = ingest(inp, shared)
    assert result["processed"] == 1 and result["ok"] == 1 and result["forward_passes"] == 1
    new = table(shared / "poolwatch.db", "SELECT id, hash FROM images WHERE relpath = 'cats/img_0001.jpg'")[0]
    assert new[0] == old[0] and new[1] != old[1]
    # only touching the file (same bytes, new mtime) re-reads just that file too
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))
    result = ingest(inp, shared)
    assert result["processed"] == 1
    # a deleted file becomes missing, and only that one
    (inp / "dogs" / "img_0002.jpg").unlink()
    result = ingest(inp, shared)
    assert result["missing"] == 1 and result["processed"] == 0
    assert status_json(shared)["images"]["missing"] == 1


@pytest.mark.usefixtures("own_artifact_cache")  # the weights file is written where the model is first built
def test_random_weights_are_saved_and_vectors_identical_across_processes(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    inp, shared = dirs
    make_dataset(inp, n_ok=20)
    ingest(inp, shared)
    saved = list((shared / "models").glob("random-*.pt"))
    assert len(saved) == 1
    # a second, separate process with a fresh store but the saved weights
    shared2 = tmp_path / "shared2"
    (shared2 / "models").mkdir(parents=True)
    shutil.copy(saved[0], shared2 / "models" / saved[0].name)
    ingest(inp, shared2)
    q = ("SELECT i.relpath, e.vector FROM embeddings e JOIN images i ON i.id = e.image_id ORDER BY i.relpath")
    a, b = table(shared / "poolwatch.db", q), table(shared2 / "poolwatch.db", q)
    assert len(a) == 20 and a == b  # bitwise
    weights = table(shared / "poolwatch.db", "SELECT weights_hash FROM models")
    assert weights == table(shared2 / "poolwatch.db", "SELECT weights_hash FROM models")
    assert np.frombuffer(a[0][1], np.float32).shape == (32,)


def test_offline_pretrained_falls_back_loudly(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    make_dataset(inp, n_ok=4)
    # No internet here: lightly's pretrained URL fails and the fallback must say so.
    proc = run_cli("ingest", f"input_dir={inp}", f"shared_dir={shared}", "lightly.loader.num_workers=0",
                   env={"TORCH_HOME": str(shared / "torch-home")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RANDOM weights" in proc.stderr and "checkpoint=" in proc.stderr
    assert "WARNING" in proc.stderr


def test_status_text_and_sanity_check(dirs: tuple[Path, Path]) -> None:
    inp, shared = dirs
    make_dataset(inp, n_ok=6)
    ingest(inp, shared)
    proc = run_cli("status", f"shared_dir={shared}")
    assert proc.returncode == 0 and "source random" in proc.stdout
    ok = run_cli("sanity-check", f"input_dir={inp}", f"shared_dir={shared}", *FAST)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "sanity check passed" in ok.stdout
    bad = run_cli("ingest", "sanity_check=true", f"input_dir={inp / 'absent'}", f"shared_dir={shared}", *FAST)
    assert bad.returncode == 1 and "FAILED  input_dir" in bad.stdout


def test_missing_input_dir_is_an_outage_not_a_deletion(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    inp, shared = dirs
    make_dataset(inp, n_ok=10)
    ingest(inp, shared)
    moved = tmp_path / "moved-away"
    inp.rename(moved)
    proc = run_cli("ingest", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST)
    assert proc.returncode == 1 and "outage" in proc.stderr
    assert status_json(shared)["images"]["missing"] == 0
    moved.rename(inp)
    assert ingest(inp, shared)["processed"] == 0
