"""The store's interface on both backends: a real SQLite file and a real PostgreSQL server (`store_url`)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from poolwatch.pipeline.store import CandidateFilter, ImageRecord, Store, StoreError
from poolwatch.pipeline.store.schema import POSTGRESQL, SQLITE


def rec(relpath: str, content: str, status: str = "ok", root: str = "/in", **kw: object) -> ImageRecord:
    return ImageRecord(root=root, relpath=relpath, size=len(content), mtime_ns=1, hash=content, status=status, **kw)  # type: ignore[arg-type]


def model(store: Store, dim: int = 4, weights: str = "w") -> int:
    model_id = store.register_model(weights_hash=weights, input_size=64, source="test", detail=None, arch={}, dim=dim,
                                    path=None)
    store.set_current_model(model_id)
    return model_id


def add(store: Store, relpath: str, content: str, model_id: int, vector: list[float], **kw: object) -> int:
    with store.transaction():
        image_id = store.upsert_image(rec(relpath, content, **kw))
        store.put_embedding(image_id, model_id, np.asarray(vector, dtype=np.float32))
    return image_id


def test_a_new_store_has_every_migration_and_both_dialects_have_the_same_numbers(open_test_store) -> None:
    assert len(SQLITE) == len(POSTGRESQL)
    with open_test_store("a") as store:
        assert store.schema_version == len(SQLITE)
        assert store.integrity_check() == "ok" and store.row_problems() == []
    with open_test_store("a") as again:  # reopening migrates nothing and keeps the node
        assert again.schema_version == len(SQLITE) and again.node == "a"


@pytest.fixture
def open_pg(pg_url: str):  # noqa: ANN201 - a factory
    """Nodes of one PostgreSQL store (a SQLite store serves one node: test_a_sqlite_store_serves_one_node)."""
    return lambda node: Store.connect(pg_url, node)


def test_a_file_is_identified_per_node_and_each_node_sees_its_own_paths(open_pg) -> None:
    with open_pg("a") as a, open_pg("b") as b:
        m = model(a)
        ia = add(a, "x/1.jpg", "A", m, [1, 0, 0, 0])
        ib = add(b, "x/1.jpg", "B", m, [0, 1, 0, 0])  # the same root and path on another machine: another file
        assert ia != ib
        assert set(a.known_files("/in", m)) == {"x/1.jpg"} and a.known_files("/in", m)["x/1.jpg"].id == ia
        assert b.known_files("/in", m)["x/1.jpg"].id == ib
        with a.transaction():
            assert a.mark_missing("/in", ["x/1.jpg"]) == 1  # a's file is gone; b's is untouched
        assert b.image(ib)["status"] == "ok" and a.image(ia)["status"] == "missing"  # type: ignore[index]
        assert b.nodes() == {"a": 1, "b": 1}
        assert {loc.node for loc in a.locations([ia, ib]).values()} == {"a", "b"}
        ids, _ = b.candidate_vectors(m, None, False)
        assert ids.tolist() == [ib]  # candidates: every node's ok images (a's is missing now)


def test_a_sqlite_store_serves_one_node(tmp_path: Path) -> None:
    db = tmp_path / "pw.db"
    with Store.open(db) as store:
        first = store.node
        with store.transaction():
            store.upsert_image(rec("a.jpg", "A"))
    with Store.open(db) as store:  # no name given: the store's own
        assert store.node == first and set(store.known_files("/in")) == {"a.jpg"}
    with Store.open(db, node="renamed") as store:  # another name: the rows are adopted, nothing is re-read
        assert set(store.known_files("/in")) == {"a.jpg"} and store.nodes() == {"renamed": 1}


def test_an_older_sqlite_store_is_migrated_and_its_rows_get_the_node(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    for number, migration in enumerate(SQLITE[:4], start=1):
        conn.executescript(migration)
        conn.execute(f"PRAGMA user_version = {number}")
    conn.execute("INSERT INTO images (root, relpath, size, mtime_ns, hash, status, first_seen, updated)"
                 " VALUES ('/in', 'a.jpg', 1, 1, 'h', 'ok', 0, 0)")
    conn.close()
    with Store.open(db, node="n1") as store:
        assert store.schema_version == len(SQLITE)
        assert store.known_files("/in")["a.jpg"].status == "ok" and store.nodes() == {"n1": 1}


def test_paths_that_are_not_utf8_round_trip(open_test_store) -> None:
    weird = "caf\udce9/\udcff.jpg"  # bytes 0xe9, 0xff: not UTF-8
    with open_test_store("a") as store:
        m = model(store)
        image_id = add(store, weird, "W", m, [1, 1, 1, 1])
        assert store.paths([image_id]) == {image_id: ("/in", weird)}
        assert set(store.known_files("/in", m)) == {weird}
        assert store.top_folders("/in") == ["caf\udce9"]
        assert store.image_by_path("/in", weird)["id"] == image_id  # type: ignore[index]


def test_changed_content_drops_its_vectors_and_the_links_to_it(open_test_store) -> None:
    with open_test_store("a") as store:
        m = model(store)
        original = add(store, "o.jpg", "O", m, [1, 0, 0, 0])
        copy = add(store, "c.jpg", "C", m, [1, 0.01, 0, 0], near_duplicate_of=original, near_distance=0.01, near_model_id=m)
        assert store.near_duplicate_groups() == [(original, [(copy, pytest.approx(0.01))])]
        with store.transaction():
            store.upsert_image(rec("o.jpg", "O2"))
        assert not store.has_vector(original, m) and store.near_links([copy]) == {copy: ("ok", None)}


def test_candidates_pool_and_filters(open_test_store) -> None:
    with open_test_store("a") as store:
        m = model(store)
        ids = [add(store, f"{i}.jpg", str(i), m, [i, 0, 0, 0], quality={"sharpness": 5.0 if i == 2 else 50.0})
               for i in range(4)]
        near = add(store, "n.jpg", "n", m, [0, 0.001, 0, 0], near_duplicate_of=ids[0], near_distance=0.001, near_model_id=m)
        assert store.candidate_ids(m, None, False) == sorted([*ids, near])
        blurry = CandidateFilter(near_duplicates=True, quality=(("sharpness", "<", 20.0),))
        assert store.candidate_ids(m, None, False, blurry) == [ids[0], ids[1], ids[3]]
        assert store.quality_counts({"blurry": ("sharpness", "<", 20.0)}) == {"blurry": 1}
        assert store.worst_quality(("sharpness", "<", 20.0), 5) == [(ids[2], "/in", "2.jpg", 5.0)]
        run = store.begin_run(trigger="test", config_json="{}", method="coreset", pool="p", model_id=m)
        store.finish_run(run, n_candidates=5, n_selected=1, stop_reason="n_samples", output_dir="/out", stats={},
                         decisions=[(ids[0], True, 0, None), (ids[1], False, None, 0.5)], pool="p", pool_add=[ids[0]])
        assert store.pool_members("p") == [ids[0]]
        assert store.candidate_ids(m, "p", False) == [ids[2], ids[3], near]  # in the pool or decided: out
        assert store.candidate_ids(m, "p", True) == [ids[1], ids[2], ids[3], near]
        got_ids, matrix = store.candidate_vectors(m, "p", True)
        assert got_ids.tolist() == [ids[1], ids[2], ids[3], near]
        assert matrix[:, 0].tolist() == [1.0, 2.0, 3.0, 0.0] and matrix.dtype == np.float32
        assert [d["image_id"] for d in store.decisions(run)] == [ids[0], ids[1]]
        assert store.run(run)["status"] == "ok" and store.add_to_pool("p", [ids[0], ids[1]]) == 1  # type: ignore[index]


def test_a_big_vector_read_streams_into_one_array(open_test_store) -> None:
    with open_test_store("a") as store:
        m = model(store, dim=8)
        rng = np.random.default_rng(0)
        vectors = rng.standard_normal((3000, 8)).astype(np.float32)  # more rows than one streamed chunk
        with store.transaction():
            for i, v in enumerate(vectors):
                store.put_embedding(store.upsert_image(rec(f"{i}.jpg", f"c{i}")), m, v)
        ids, matrix = store.vectors(m)
        assert len(ids) == 3000 and np.array_equal(matrix, vectors)
        some = store.vectors(m, image_ids=[int(ids[5]), int(ids[7])])[1]
        assert np.array_equal(some, vectors[[5, 7]])


def test_the_index_catches_up_on_other_nodes_commits_by_sequence(open_test_store) -> None:
    with open_test_store("a") as a, open_test_store("b") as b:
        m = model(a)
        add(a, "1.jpg", "1", m, [1, 0, 0, 0])
        seen = a.last_seq(m)
        later = add(b, "2.jpg", "2", m, [0, 1, 0, 0])
        ids, tags, last = a.tags_since(m, seen)
        assert ids.tolist() == [later] and last > seen and len(tags) == 1
        assert a.tags_since(m, last)[0].size == 0


def test_a_setting_recorded_once_is_the_first_nodes(open_test_store) -> None:
    with open_test_store("a") as a, open_test_store("b") as b:
        assert a.setting_once("threshold", {"value": 1.5}) == {"value": 1.5}
        assert b.setting_once("threshold", {"value": 9.0}) == {"value": 1.5}
        b.set_setting("threshold", {"value": 2.0})
        assert a.setting("threshold") == {"value": 2.0}


def test_runs_left_running_are_recovered_by_their_own_node_only(open_pg) -> None:
    with open_pg("a") as a, open_pg("b") as b:
        run = a.begin_run(trigger="t", config_json="{}", method="coreset", pool=None, model_id=None)
        assert a.interrupted_runs() == [run] and b.interrupted_runs() == []


def test_one_sampling_lock_across_nodes(open_test_store, store_url: str) -> None:
    with open_test_store("a") as a, open_test_store("b") as b:
        assert a.try_sampling_lock()
        if store_url:  # SQLite: the share lock file keeps the store to one process (daemon/lock.py)
            assert not b.try_sampling_lock()
            a.release_sampling_lock()
            assert b.try_sampling_lock()
            b.close()  # a closed (or killed) session's lock is free again
            assert a.try_sampling_lock()


def test_concurrent_writers_are_serialised(open_test_store) -> None:
    """Two handles (nodes, on PostgreSQL) that read-then-write at once: no row is lost or made twice."""
    errors: list[BaseException] = []

    def writer(node: str, tag: str, start: threading.Event) -> None:
        try:
            with open_test_store(node) as store:
                m = model(store)
                start.wait(10)
                for i in range(40):
                    with store.transaction():
                        content = f"shared-{i}"  # the same bytes arrive at both: the first stays
                        original = store.first_ok_with_hash(content)
                        status = "duplicate" if original else "ok"
                        image_id = store.upsert_image(rec(f"{tag}-{i}.jpg", content, status=status, duplicate_of=original))
                        if status == "ok":
                            store.put_embedding(image_id, m, np.full(4, i, dtype=np.float32))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    nodes = ("a", "b") if open_test_store(None).dialect == "postgresql" else ("a", "a")
    start = threading.Event()
    threads = [threading.Thread(target=writer, args=(n, tag, start)) for n, tag in zip(nodes, "xy", strict=True)]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(60)
    assert not errors, errors
    with open_test_store(nodes[0]) as store:
        counts = store.counts_by_status()
        assert (counts["ok"], counts["duplicate"]) == (40, 40)
        assert store.row_problems() == []
        seqs = [r[0] for r in store.b.execute("SELECT seq FROM embeddings ORDER BY seq")]
        assert seqs == list(range(1, 41))  # one sequence, no gaps, no repeats


def test_a_password_is_never_in_an_error(postgres_server) -> None:
    url = postgres_server.url("no_such_database_here", password="s3cr3t-pw")
    with pytest.raises(StoreError) as err:
        Store.connect(url, "a", busy_timeout=5, describe="postgresql://postgres:***@/no_such_database_here")
    assert "s3cr3t-pw" not in str(err.value) and "no_such_database_here" in str(err.value)
