"""`poolwatch train` and `enable_training=true`: a lightly-loadable checkpoint, a re-embedded store, and
sampling on the new model's vectors only."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
from lightly.utils.io import load_embeddings

from .conftest import FAST, ROOT, encode, photo, run_cli

# fp32 with exact decoding: the store's vectors are compared with lightly-embed's
TRAIN = [*FAST, "lightly.loader.batch_size=16", "lightly.trainer.max_epochs=2", "lightly.loader.num_workers=0",
         "embedding_precision=fp32", "check.exact_decode=true"]


def q(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql).fetchall()


def test_train_switches_the_model_and_sampling_follows(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    inp, shared = dirs
    for i in range(60):
        (inp / f"img_{i:03d}.jpg").write_bytes(encode(photo(i), "JPEG"))
    env = {"OMP_NUM_THREADS": "1"}
    proc = run_cli("train", f"input_dir={inp}", f"shared_dir={shared}", *TRAIN, "datapool.name=p", env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    ckpt = Path(summary["checkpoint"])
    assert ckpt == shared / "lightly_epoch_2.ckpt" and ckpt.exists()
    assert (shared / "p" / "checkpoint_latest.ckpt").exists()
    assert summary["reembedded"] == 60 and len(summary["losses"]) == 2

    db = shared / "poolwatch.db"
    models = q(db, "SELECT id, source, is_current FROM models ORDER BY id")
    assert [m[1] for m in models] == ["random", "trained"] and models[1][2] == 1
    trained_id = models[1][0]
    # every ok image has exactly one vector, of the trained model (old vectors dropped after the switch)
    assert q(db, "SELECT DISTINCT model_id FROM embeddings") == [(trained_id,)]
    assert q(db, "SELECT COUNT(*) FROM embeddings")[0][0] == 60

    # lightly-embed loads the checkpoint and gives the store's vectors
    work = tmp_path / "lightly"
    work.mkdir()
    lightly = subprocess.run([str(ROOT / ".venv" / "bin" / "lightly-embed"), f"input_dir={inp}", f"checkpoint={ckpt}",
                              "collate.input_size=32", "loader.num_workers=0", f"hydra.run.dir={work}"],
                             cwd=work, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert lightly.returncode == 0, lightly.stderr[-2000:]
    emb, _, names = load_embeddings(str(next(work.rglob("embeddings.csv"))))
    ours = {r[0]: np.frombuffer(r[1], np.float32) for r in
            q(db, "SELECT i.relpath, e.vector FROM embeddings e JOIN images i ON i.id = e.image_id")}
    for name, vec in zip(names, emb, strict=True):
        assert np.allclose(ours[name], vec, atol=1e-4, rtol=1e-5), name

    # a restart keeps the trained model (no checkpoint= given), and sampling uses its vectors only
    proc = run_cli("sample", "--json", f"input_dir={inp}", f"shared_dir={shared}", *FAST, "datapool.name=p",
                   "stopping_condition.n_samples=10", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert run["model_id"] == trained_id and run["n_candidates"] == 60
    assert q(db, "SELECT source FROM models WHERE is_current = 1") == [("trained",)]


def test_training_is_refused_with_imported_embeddings(tmp_path: Path) -> None:
    proc = run_cli("train", f"shared_dir={tmp_path}", "embeddings=e.csv")
    assert proc.returncode == 2 and "enable_training" in proc.stderr
    proc = run_cli("sample", f"shared_dir={tmp_path}", "embeddings=e.csv", "enable_training=true",
                   "stopping_condition.n_samples=2")
    assert proc.returncode == 2 and "enable_training" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
