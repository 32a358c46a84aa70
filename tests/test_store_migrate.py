"""`poolwatch store migrate --to postgresql://...`: a SQLite store moved into a real PostgreSQL server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from poolwatch.pipeline.store import Store

from .conftest import FAST, make_dataset, run_cli


def test_a_sqlite_store_moves_into_postgresql_and_carries_on_there(tmp_path: Path, pg_url: str) -> None:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    weird = inp / "caf\udce9"  # a folder name that is not UTF-8 survives the move
    make_dataset(inp, n_ok=24)
    weird.mkdir()
    (weird / "x.jpg").write_bytes((inp / "dogs" / "img_0000.png").read_bytes())
    args = [f"input_dir={inp}", f"shared_dir={shared}", "node.name=site1", *FAST]
    assert run_cli("ingest", *args).returncode == 0
    sample = run_cli("sample", "--json", "datapool.name=pool", "stopping_condition.n_samples=5", *args)
    assert sample.returncode == 0, sample.stderr

    url_with_password = pg_url.replace("postgres@", "postgres:hunter2-secret@")  # trust auth: carried, not needed
    moved = run_cli("store", "migrate", "--to", url_with_password, *args)
    assert moved.returncode == 0, moved.stderr
    assert "hunter2-secret" not in moved.stdout + moved.stderr
    rows = json.loads(moved.stdout)["rows"]

    with Store.open(shared / "poolwatch.db") as old, Store.connect(pg_url, "site1") as new:
        assert rows["images"] == len(old.images()) == len(new.images())
        assert new.summary()["images"] == old.summary()["images"] and new.nodes() == {"site1": rows["images"]}
        assert [(r["relpath"], r["status"], r["duplicate_of"], r["near_duplicate_of"]) for r in new.images()] == \
               [(r["relpath"], r["status"], r["duplicate_of"], r["near_duplicate_of"]) for r in old.images()]
        model = old.current_model()
        assert model is not None and new.current_model() == model
        ids_old, v_old = old.vectors(model.id)
        ids_new, v_new = new.vectors(model.id)
        assert np.array_equal(ids_old, ids_new) and np.array_equal(v_old, v_new)
        assert new.pool_members("pool") == old.pool_members("pool") and len(new.runs()) == len(old.runs())
        assert new.candidate_ids(model.id, "pool", False) == old.candidate_ids(model.id, "pool", False)
        assert new.row_problems() == [] and new.image_by_path(str(inp), "caf\udce9/x.jpg") is not None  # not UTF-8

    # The node carries on against PostgreSQL: nothing is read again, and new rows get new ids.
    again = run_cli("ingest", "--json", f"store.url={pg_url}", *args)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["processed"] == 0
    (inp / "new.jpg").write_bytes((inp / "dogs" / "img_0002.jpg").read_bytes()[:-1] + b"\xd9")
    assert run_cli("ingest", f"store.url={pg_url}", *args).returncode == 0
    with Store.connect(pg_url, "site1") as new:
        assert len(new.images()) == rows["images"] + 1

    # A second migration into the same (now non-empty) database is refused, with one line.
    refused = run_cli("store", "migrate", "--to", pg_url, *args)
    assert refused.returncode != 0 and "not empty" in refused.stderr and "Traceback" not in refused.stderr
