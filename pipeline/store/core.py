"""The store: one interface over SQLite (one file, WAL; the embedded default) and PostgreSQL (shared by many
nodes). With backends.py and schema.py, the only place that speaks SQL.

Every write is a short transaction (`with store.transaction():`); a batch of ingested images is one
transaction, so a crash leaves each image either fully recorded or not recorded at all (and the next
scan finds it again). Schema changes go through the numbered migrations of schema.py.

A `Store` is opened as a node (`node.name`): a file's identity is (node, root, relpath, size, mtime_ns), and
the queries by path see the handle's own node only; queries by id, candidates and runs see every node.
Each thread opens its own `Store` (connections are not shared between threads).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from .backends import Backend, PostgresBackend, SqliteBackend
from .records import (
    QUALITY_COLUMNS,
    STATUSES,
    CandidateFilter,
    ImageRecord,
    KnownFile,
    Location,
    ModelRecord,
    StoreError,
    quality_condition,
    vector_hash,
    vector_tag,
)

STREAM_ROWS = 8192  # rows a streamed vector read takes from the engine at a time


def _dec(value: str | bytes | memoryview) -> str:
    if isinstance(value, memoryview):
        value = value.tobytes()
    return value if isinstance(value, str) else os.fsdecode(value)


def _row(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("root", "relpath"):
        if isinstance(row.get(key), (bytes, memoryview)):
            row[key] = _dec(row[key])
    return row


class Store:
    """A poolwatch store. Open with `Store.open(path)` (SQLite), `Store.connect(url)` (PostgreSQL) or
    `open_store(config)`; close with `close()` or `with`."""

    def __init__(self, backend: Backend, node: str) -> None:
        self.b = backend
        self.node = node
        self._seq: dict[int, int] = {}  # model id -> the last vector sequence number of this transaction

    # ---- lifecycle ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, busy_timeout: float = 30.0, node: str | None = None) -> Store:
        """A SQLite store. It serves one node: `node` (None: the one it has, else this host's name)."""
        path = Path(path)
        try:
            backend = SqliteBackend(path, busy_timeout)
        except Exception as exc:
            raise StoreError(f"cannot open the store {str(path)!r}: {exc}") from None
        store = cls(backend, node or "")
        try:
            store._migrate()
            store._adopt_node(node)
        except StoreError:
            store.close()
            raise
        except Exception as exc:
            store.close()
            raise StoreError(f"cannot open the store {str(path)!r}: {exc}") from None
        return store

    @classmethod
    def connect(cls, url: str, node: str | None = None, busy_timeout: float = 30.0, describe: str = "") -> Store:
        """A PostgreSQL store shared by many nodes; this handle is `node` (None: this host's name)."""
        backend = PostgresBackend(url, describe or "(PostgreSQL)", busy_timeout)
        store = cls(backend, node or socket.gethostname())
        try:
            store._migrate()
        except Exception as exc:
            store.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot use the store {backend.describe}: {str(exc).strip().splitlines()[0]}") from None
        return store

    @property
    def dialect(self) -> str:
        return self.b.dialect

    @property
    def path(self) -> str:
        """The store for messages: its file, or its URL with the password masked."""
        return self.b.describe

    def close(self) -> None:
        self.b.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return self.b.schema_version()

    def _migrate(self) -> None:
        migrations = self.b.migrations
        version = self.schema_version
        if version > len(migrations):
            raise StoreError(f"the store {self.path!r} has schema {version}, newer than this poolwatch ({len(migrations)})")
        for number in range(version + 1, len(migrations) + 1):
            with self.transaction():
                if self.schema_version >= number:  # another process migrated it while we waited for the lock
                    continue
                for statement in migrations[number - 1].split(";"):
                    if statement.strip():
                        self.b.execute(statement)
                self.b.set_schema_version(number)

    def _adopt_node(self, node: str | None) -> None:
        """A SQLite store has one node: rows of an older schema (no node) and, when `node` names another one,
        every row, become this node's."""
        recorded = self.setting("node")
        self.node = node or recorded or socket.gethostname()
        if recorded == self.node:
            return
        with self.transaction():
            self.b.execute("UPDATE images SET node = ? WHERE node != ?", (self.node, self.node))
            self.b.execute("INSERT INTO settings (key, value) VALUES ('node', ?)"
                           " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (json.dumps(self.node),))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction, serialised with every other writer; nested use joins the outer one."""
        if self.b.in_transaction:
            yield
            return
        self.b.begin_write()
        self._seq.clear()
        try:
            yield
            self.b.verify()
        except BaseException:
            self.b.rollback()
            raise
        self.b.commit()

    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads that see one state of the store (a count and the rows it counted)."""
        if self.b.in_transaction:
            yield
            return
        self.b.begin_snapshot()
        try:
            yield
        finally:
            self.b.commit()

    def verify_file(self) -> None:
        """Raise StoreError when the store file was removed or replaced since it was opened (SQLite)."""
        self.b.verify()

    def integrity_check(self) -> str:
        return self.b.integrity_check()

    def row_problems(self) -> list[str]:
        """What the rows say against the store's rules (empty when all hold), on either engine."""
        checks = {
            "files recorded twice": "SELECT COUNT(*) FROM (SELECT 1 FROM images GROUP BY node, root, relpath"
                                    " HAVING COUNT(*) > 1) t",
            "ok images with the same bytes": "SELECT COUNT(*) FROM (SELECT 1 FROM images WHERE status = 'ok' AND hash IS NOT"
                                             " NULL GROUP BY hash HAVING COUNT(*) > 1) t",
            "duplicates without their original": "SELECT COUNT(*) FROM images i WHERE i.status = 'duplicate' AND NOT EXISTS"
                                                 " (SELECT 1 FROM images o WHERE o.id = i.duplicate_of)",
            "vectors of no image or model": "SELECT COUNT(*) FROM embeddings e WHERE NOT EXISTS (SELECT 1 FROM images i"
                                            " WHERE i.id = e.image_id) OR NOT EXISTS (SELECT 1 FROM models m WHERE m.id ="
                                            " e.model_id)",
            "vectors of the wrong size": "SELECT COUNT(*) FROM embeddings e JOIN models m ON m.id = e.model_id"
                                         " WHERE length(e.vector) != 4 * m.dim",
            "ok images without a hash": "SELECT COUNT(*) FROM images WHERE status = 'ok' AND hash IS NULL",
            "decisions of no image": "SELECT COUNT(*) FROM decisions d WHERE NOT EXISTS (SELECT 1 FROM images i"
                                     " WHERE i.id = d.image_id)",
        }
        problems = []
        for what, sql in checks.items():
            n = int(self.b.execute(sql).fetchone()[0])
            if n:
                problems.append(f"{n} {what}")
        return problems

    # ---- images ---------------------------------------------------------------------------
    _KNOWN = ("SELECT relpath, id, size, mtime_ns, status,"
              " EXISTS (SELECT 1 FROM embeddings e WHERE e.image_id = i.id AND e.model_id = ?) FROM images i"
              " WHERE node = ? AND root = ?")

    def known_files(self, root: str, model_id: int | None = None) -> dict[str, KnownFile]:
        """Every row of this node's root, with whether `model_id` has a vector for it: one query for a whole scan."""
        rows = self.b.execute(self._KNOWN, (model_id, self.node, self.b.path(root)))
        return {_dec(r[0]): KnownFile(r[1], r[2], r[3], r[4], bool(r[5])) for r in rows}

    def known_file(self, root: str, relpath: str, model_id: int) -> KnownFile | None:
        row = self.b.execute(f"{self._KNOWN} AND relpath = ?",
                             (model_id, self.node, self.b.path(root), self.b.path(relpath))).fetchone()
        return KnownFile(row[1], row[2], row[3], row[4], bool(row[5])) if row else None

    def upsert_image(self, rec: ImageRecord) -> int:
        """Insert or update this node's row of (root, relpath); returns its id. Use inside a transaction."""
        now = time.time()
        root, relpath = self.b.path(rec.root), self.b.path(rec.relpath)
        row = self.b.execute("SELECT id, hash FROM images WHERE node = ? AND root = ? AND relpath = ?",
                             (self.node, root, relpath)).fetchone()
        quality = rec.quality or {}
        values = (rec.size, rec.mtime_ns, rec.hash, rec.status, rec.reason, rec.detail, rec.duplicate_of,
                  rec.width, rec.height, rec.format, rec.attempts, *(quality.get(c) for c in QUALITY_COLUMNS),
                  rec.near_duplicate_of, rec.near_distance, rec.near_model_id, now)
        columns = ("size", "mtime_ns", "hash", "status", "reason", "detail", "duplicate_of", "width", "height", "format",
                   "attempts", *QUALITY_COLUMNS, "near_duplicate_of", "near_distance", "near_model_id", "updated")
        if row is None:
            marks = ",".join("?" * (len(columns) + 4))
            cur = self.b.execute(f"INSERT INTO images ({', '.join(columns)}, node, root, relpath, first_seen)"
                                 f" VALUES ({marks}) RETURNING id", (*values, self.node, root, relpath, now))
            return int(cur.fetchone()[0])
        image_id, old_hash = int(row[0]), row[1]
        self.b.execute(f"UPDATE images SET {', '.join(f'{c}=?' for c in columns)} WHERE id=?", (*values, image_id))
        if old_hash != rec.hash or rec.status != "ok":
            # Changed content gets new vectors; its old decisions stay as history. Near copies of what it was
            # are no longer copies of it.
            self.b.execute("DELETE FROM embeddings WHERE image_id = ?", (image_id,))
            self.b.execute("UPDATE images SET near_duplicate_of = NULL, near_distance = NULL, near_model_id = NULL"
                           " WHERE near_duplicate_of = ?", (image_id,))
        return image_id

    def first_ok_with_hash(self, content_hash: str, exclude_id: int | None = None) -> int | None:
        row = self.b.execute(
            "SELECT MIN(id) FROM images WHERE hash = ? AND status = 'ok' AND id != ?",
            (content_hash, -1 if exclude_id is None else exclude_id),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def revive(self, root: str, relpaths: Iterable[str], model_id: int) -> list[str]:
        """`missing` images that are back with their identity unchanged become `ok` again without being read,
        when they still have a vector of `model_id` and no other `ok` image holds their bytes (else the
        caller reads them: the duplicate rule decides). Returns the relpaths revived. Use in a transaction."""
        revived = []
        now = time.time()
        for rel in relpaths:
            cur = self.b.execute(
                "UPDATE images SET status = 'ok', reason = NULL, detail = NULL, updated = ? WHERE node = ? AND root = ?"
                " AND relpath = ? AND status = 'missing'"
                " AND EXISTS (SELECT 1 FROM embeddings e WHERE e.image_id = images.id AND e.model_id = ?)"
                " AND NOT EXISTS (SELECT 1 FROM images o WHERE o.hash = images.hash AND o.status = 'ok' AND o.id != images.id)",
                (now, self.node, self.b.path(root), self.b.path(rel), model_id),
            )
            if cur.rowcount:
                revived.append(rel)
        return revived

    def mark_missing(self, root: str, relpaths: Iterable[str]) -> int:
        now = time.time()
        return self.b.executemany(
            "UPDATE images SET status='missing', reason=NULL, detail=NULL, updated=?"
            " WHERE node=? AND root=? AND relpath=? AND status != 'missing'",
            [(now, self.node, self.b.path(root), self.b.path(rel)) for rel in relpaths],
        )

    def image(self, image_id: int) -> dict[str, Any] | None:
        rows = self.b.query_dicts("SELECT * FROM images WHERE id = ?", (int(image_id),))
        return _row(rows[0]) if rows else None

    def image_by_path(self, root: str, relpath: str, node: str | None = None) -> dict[str, Any] | None:
        rows = self.b.query_dicts("SELECT * FROM images WHERE node = ? AND root = ? AND relpath = ?",
                                  (node or self.node, self.b.path(root), self.b.path(relpath)))
        return _row(rows[0]) if rows else None

    def images(self, status: str | None = None) -> list[dict[str, Any]]:
        if status is None:
            return [_row(r) for r in self.b.query_dicts("SELECT * FROM images ORDER BY id")]
        return [_row(r) for r in self.b.query_dicts("SELECT * FROM images WHERE status = ? ORDER BY id", (status,))]

    def counts_by_status(self, node: str | None = None) -> dict[str, int]:
        """Images by status, of every node or of one."""
        counts = {s: 0 for s in STATUSES}
        where, params = (" WHERE node = ?", (node,)) if node is not None else ("", ())
        for status, n in self.b.execute(f"SELECT status, COUNT(*) FROM images{where} GROUP BY status", params):
            counts[status] = int(n)
        return counts

    def node_roots(self) -> dict[str, list[str]]:
        """node -> the input roots its images are under, sorted."""
        out: dict[str, list[str]] = {}
        for node, root in self.b.execute("SELECT DISTINCT node, root FROM images"):
            out.setdefault(str(node), []).append(_dec(root))
        return {n: sorted(r) for n, r in sorted(out.items())}

    def nodes(self) -> dict[str, int]:
        """node -> images it holds."""
        return {str(n): int(c) for n, c in self.b.execute("SELECT node, COUNT(*) FROM images GROUP BY node ORDER BY node")}

    def corrupt_by_reason(self) -> dict[str, int]:
        rows = self.b.execute("SELECT reason, COUNT(*) FROM images WHERE status='corrupt' GROUP BY reason ORDER BY reason")
        return {r: int(n) for r, n in rows}

    # ---- settings (choices made once per store, the same for every node) -------------------------
    def setting(self, key: str) -> Any:
        row = self.b.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_setting(self, key: str, value: Any) -> None:
        with self.transaction():
            self.b.execute("INSERT INTO settings (key, value) VALUES (?, ?)"
                           " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value, sort_keys=True)))

    def setting_once(self, key: str, value: Any) -> Any:
        """Record `value` unless another node recorded one first; returns what the store holds."""
        with self.transaction():
            self.b.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                           (key, json.dumps(value, sort_keys=True)))
            return self.setting(key)

    def ok_images_by_hash(self, limit: int) -> list[tuple[str, str, str]]:
        """(root, relpath, hash) of the first `limit` ok images of this node in content-hash order: a choice of
        images that does not depend on the order they arrived in, and that this node can read (int8 calibration)."""
        rows = self.b.execute(
            "SELECT root, relpath, hash FROM images WHERE node = ? AND status = 'ok' AND hash IS NOT NULL"
            " AND root NOT LIKE 'embeddings:%' ORDER BY hash, id LIMIT ?", (self.node, limit),
        )
        return [(_dec(r[0]), _dec(r[1]), str(r[2])) for r in rows]

    def count_ok(self) -> int:
        """This node's ok images (those it can read)."""
        return int(self.b.execute("SELECT COUNT(*) FROM images WHERE node = ? AND status = 'ok'"
                                  " AND root NOT LIKE 'embeddings:%'", (self.node,)).fetchone()[0])

    # ---- models ---------------------------------------------------------------------------
    def register_model(self, *, weights_hash: str, input_size: int, source: str, detail: str | None,
                       arch: dict[str, Any], dim: int, path: str | None) -> int:
        """Get-or-create the model row for these weights at this input size; returns its id."""
        with self.transaction():
            row = self.b.execute("SELECT id FROM models WHERE weights_hash = ? AND input_size = ?",
                                 (weights_hash, input_size)).fetchone()
            if row:
                return int(row[0])
            cur = self.b.execute(
                "INSERT INTO models (weights_hash, input_size, source, detail, arch, dim, path, created)"
                " VALUES (?,?,?,?,?,?,?,?) RETURNING id",
                (weights_hash, input_size, source, detail, json.dumps(arch, sort_keys=True), dim, path, time.time()),
            )
            return int(cur.fetchone()[0])

    def set_current_model(self, model_id: int) -> None:
        with self.transaction():
            self.b.execute("UPDATE models SET is_current = CASE WHEN id = ? THEN 1 ELSE 0 END", (model_id,))

    def model(self, model_id: int) -> ModelRecord | None:
        row = self.b.execute(
            "SELECT id, weights_hash, input_size, source, detail, arch, dim, path, is_current FROM models WHERE id=?",
            (int(model_id),),
        ).fetchone()
        if row is None:
            return None
        return ModelRecord(int(row[0]), row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], bool(row[8]))

    def current_model(self) -> ModelRecord | None:
        row = self.b.execute("SELECT id FROM models WHERE is_current = 1").fetchone()
        return self.model(int(row[0])) if row else None

    def models(self) -> list[ModelRecord]:
        return [m for m in (self.model(int(r[0])) for r in self.b.execute("SELECT id FROM models ORDER BY id")) if m]

    def coverage(self, model_id: int) -> tuple[int, int]:
        """(ok images with a vector of this model, ok images) - re-embedding progress."""
        row = self.b.execute(
            "SELECT COUNT(*), COUNT(e.image_id) FROM images i LEFT JOIN embeddings e"
            " ON e.image_id = i.id AND e.model_id = ? WHERE i.status = 'ok' AND i.root NOT LIKE 'embeddings:%'",
            (model_id,),
        ).fetchone()
        return int(row[1]), int(row[0])

    def sampling_model(self) -> ModelRecord | None:
        """The model a sampling run uses: the current one once every `ok` image has its vector; until
        then (re-embedding in progress) the newest model that still covers every `ok` image, so a run
        never mixes vectors of two models."""
        current = self.current_model()
        if current is None:
            return None
        done, total = self.coverage(current.id)
        if done >= total:
            return current
        for model in reversed(self.models()):
            if model.id != current.id and model.source != "imported" and self.coverage(model.id)[0] >= total:
                return model
        return current

    def drop_old_vectors(self) -> int:
        """Once the current model covers every `ok` image, delete other models' vectors (imported ones stay)."""
        current = self.current_model()
        if current is None:
            return 0
        done, total = self.coverage(current.id)
        if done < total:
            return 0
        with self.transaction():
            return self.b.execute(
                "DELETE FROM embeddings WHERE model_id != ? AND model_id IN (SELECT id FROM models WHERE source != 'imported')",
                (current.id,),
            ).rowcount

    # ---- embeddings -----------------------------------------------------------------------
    def put_embedding(self, image_id: int, model_id: int, vector: np.ndarray) -> None:
        """Store a vector (in a transaction); it gets the model's next commit sequence number."""
        vec = np.ascontiguousarray(vector, dtype=np.float32)
        if not self.b.in_transaction:
            with self.transaction():
                self.put_embedding(image_id, model_id, vec)
            return
        seq = self._seq.get(model_id)
        if seq is None:
            seq = int(self.b.execute("SELECT COALESCE(MAX(seq), 0) FROM embeddings WHERE model_id = ?",
                                     (model_id,)).fetchone()[0])
        self._seq[model_id] = seq = seq + 1
        self.b.execute(
            "INSERT INTO embeddings (image_id, model_id, vector, vhash, seq) VALUES (?,?,?,?,?)"
            " ON CONFLICT (image_id, model_id) DO UPDATE SET vector = excluded.vector, vhash = excluded.vhash,"
            " seq = excluded.seq",
            (int(image_id), int(model_id), vec.tobytes(), vector_hash(vec), seq),
        )

    def first_ok_with_vector(self, model_id: int, vhash: str, exclude_id: int | None = None) -> int | None:
        # MIN, not ORDER BY ... LIMIT 1: the latter walks the images by id instead of the (model, vhash) index
        row = self.b.execute(
            "SELECT MIN(e.image_id) FROM embeddings e JOIN images i ON i.id = e.image_id"
            " WHERE e.model_id = ? AND e.vhash = ? AND i.status = 'ok' AND i.id != ?",
            (model_id, vhash, -1 if exclude_id is None else exclude_id),
        ).fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def has_vector(self, image_id: int, model_id: int) -> bool:
        return self.b.execute("SELECT 1 FROM embeddings WHERE image_id = ? AND model_id = ?",
                              (int(image_id), int(model_id))).fetchone() is not None

    def count_embeddings(self, model_id: int) -> int:
        return int(self.b.execute("SELECT COUNT(*) FROM embeddings WHERE model_id = ?", (model_id,)).fetchone()[0])

    def _dim(self, model_id: int) -> int:
        model = self.model(model_id)
        if model is None:
            raise StoreError(f"no model with id {model_id}")
        return model.dim

    def _read_vectors(self, model_id: int, sql: str, params: Sequence[Any], dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, N×d float32) of `sql`'s (id, vector) rows of this model, streamed into arrays preallocated for every
        vector of the model (an index-only count; the rows are a subset of them), in one snapshot of the store."""
        with self.snapshot():
            n = int(self.b.execute("SELECT COUNT(*) FROM embeddings WHERE model_id = ?", (model_id,)).fetchone()[0])
            ids = np.empty(n, dtype=np.int64)
            matrix = np.empty((n, dim), dtype=np.float32)
            filled = 0
            for rows in self.b.stream(sql, params, STREAM_ROWS):
                k = len(rows)
                if filled + k > n:
                    raise StoreError("the store changed during a snapshot read")  # cannot happen in a snapshot
                ids[filled:filled + k] = [r[0] for r in rows]
                matrix[filled:filled + k] = np.frombuffer(b"".join([r[1] for r in rows]), dtype=np.float32).reshape(k, dim)
                filled += k
        if filled < n:  # fewer candidates than vectors: give the unused rows back
            ids, matrix = ids[:filled].copy(), matrix[:filled].copy()
        return ids, matrix

    def vectors(
        self, model_id: int, image_ids: Sequence[int] | None = None, ok_only: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, N×d float32 matrix) of the images embedded by this model, ordered by image id;
        only `ok` images unless ok_only=False; restricted to `image_ids` when given."""
        dim = self._dim(model_id)
        base = " FROM embeddings e"
        if ok_only:
            base += " JOIN images i ON i.id = e.image_id AND i.status = 'ok'"
        base += " WHERE e.model_id = ?"
        ids, matrix = self._read_vectors(model_id, "SELECT e.image_id, e.vector" + base + " ORDER BY e.image_id",
                                         (model_id,), dim)
        if image_ids is not None:
            keep = np.isin(ids, np.fromiter((int(i) for i in image_ids), dtype=np.int64))
            ids, matrix = ids[keep], matrix[keep]
        return ids, matrix

    # ---- runs, decisions, pools -------------------------------------------------------------
    def begin_run(self, *, trigger: str, config_json: str, method: str, pool: str | None, model_id: int | None,
                  dump: bool = False) -> int:
        """A run in progress on this node; `dump`: every node writes the selected images it holds once it is ok."""
        with self.transaction():
            cur = self.b.execute(
                "INSERT INTO runs (trigger, started, status, config, method, pool, model_id, node, dump)"
                " VALUES (?,?,?,?,?,?,?,?,?) RETURNING id",
                (trigger, time.time(), "running", config_json, method, pool or None, model_id, self.node, int(dump)),
            )
            return int(cur.fetchone()[0])

    def finish_run(self, run_id: int, *, n_candidates: int, n_selected: int, stop_reason: str, output_dir: str,
                   stats: dict[str, Any], decisions: Iterable[tuple[int, bool, int | None, float | None]],
                   pool: str | None, pool_add: Sequence[int]) -> None:
        """Decisions, pool update and the run's outcome in ONE transaction."""
        with self.transaction():
            self.b.executemany(
                "INSERT INTO decisions (run_id, image_id, selected, rank, distance) VALUES (?,?,?,?,?)"
                " ON CONFLICT (run_id, image_id) DO UPDATE SET selected = excluded.selected, rank = excluded.rank,"
                " distance = excluded.distance",
                [(run_id, int(i), int(sel), None if rank is None else int(rank), None if dist is None else float(dist))
                 for i, sel, rank, dist in decisions],
            )
            if pool:
                self.b.executemany(
                    "INSERT INTO datapool (pool, image_id, added_in_run) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                    [(pool, int(i), run_id) for i in pool_add],
                )
            self.b.execute(
                "UPDATE runs SET finished=?, status='ok', n_candidates=?, n_selected=?, stop_reason=?, output_dir=?,"
                " stats=? WHERE id=?",
                (time.time(), n_candidates, n_selected, stop_reason, output_dir, json.dumps(stats), run_id),
            )

    def fail_run(self, run_id: int, error: str, status: str = "failed") -> None:
        with self.transaction():
            self.b.execute("UPDATE runs SET finished=?, status=?, error=? WHERE id=?", (time.time(), status, error, run_id))

    def interrupted_runs(self) -> list[int]:
        """This node's runs left 'running' by a process that died (another node's may still be running)."""
        return [int(r[0]) for r in self.b.execute("SELECT id FROM runs WHERE status = 'running' AND"
                                                  " (node = ? OR node IS NULL) ORDER BY id", (self.node,))]

    def run(self, run_id: int) -> dict[str, Any] | None:
        rows = self.b.query_dicts("SELECT * FROM runs WHERE id = ?", (run_id,))
        return rows[0] if rows else None

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        return self.b.query_dicts("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,))

    def decisions(self, run_id: int) -> list[dict[str, Any]]:
        return self.b.query_dicts("SELECT * FROM decisions WHERE run_id = ? ORDER BY selected DESC, rank, image_id", (run_id,))

    def try_sampling_lock(self, wait: float = 0.0) -> bool:
        """Take the store-wide sampling lock, waiting up to `wait` seconds for it (PostgreSQL: a session advisory
        lock, free again when its holder releases it or its connection ends, a killed node's too; SQLite: the
        share lock file already keeps a store to one process, so this is always True). Held until released."""
        return self.b.try_sampling_lock(wait)

    def release_sampling_lock(self) -> None:
        self.b.release_sampling_lock()

    def pending_dumps(self, since_run: int = 0) -> list[int]:
        """Finished runs that asked for a dump (dump_dataset) and that this node has not dumped yet."""
        rows = self.b.execute(
            "SELECT r.id FROM runs r WHERE r.status = 'ok' AND r.id > ? AND r.dump = 1"
            " AND NOT EXISTS (SELECT 1 FROM run_dumps d WHERE d.run_id = r.id AND d.node = ?) ORDER BY r.id",
            (since_run, self.node))
        return [int(r[0]) for r in rows]

    def record_dump(self, run_id: int, *, status: str, n_files: int, output_dir: str, error: str | None = None) -> None:
        with self.transaction():
            self.b.execute(
                "INSERT INTO run_dumps (run_id, node, status, finished, n_files, output_dir, error) VALUES (?,?,?,?,?,?,?)"
                " ON CONFLICT (run_id, node) DO UPDATE SET status = excluded.status, finished = excluded.finished,"
                " n_files = excluded.n_files, output_dir = excluded.output_dir, error = excluded.error",
                (run_id, self.node, status, time.time(), n_files, output_dir, error))

    def dumps(self, run_id: int) -> list[dict[str, Any]]:
        return self.b.query_dicts("SELECT * FROM run_dumps WHERE run_id = ? ORDER BY node", (run_id,))

    def pool_members(self, pool: str) -> list[int]:
        return [int(r[0]) for r in self.b.execute("SELECT image_id FROM datapool WHERE pool = ? ORDER BY image_id", (pool,))]

    def pool_version(self, pool: str) -> tuple[int, int, int]:
        """Changes whenever the pool's members do (the near-duplicate check caches the pool's vectors)."""
        row = self.b.execute("SELECT COUNT(*), COALESCE(SUM(image_id), 0), COALESCE(MAX(added_in_run), 0) FROM datapool"
                             " WHERE pool = ?", (pool,)).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def pools(self) -> dict[str, int]:
        return {p: int(n) for p, n in self.b.execute("SELECT pool, COUNT(*) FROM datapool GROUP BY pool ORDER BY pool")}

    def replace_pool(self, pool: str, image_ids: Iterable[int], run_id: int | None = None) -> None:
        with self.transaction():
            self.b.execute("DELETE FROM datapool WHERE pool = ?", (pool,))
            self.b.executemany("INSERT INTO datapool (pool, image_id, added_in_run) VALUES (?,?,?) ON CONFLICT DO NOTHING",
                               [(pool, int(i), run_id) for i in image_ids])

    def add_to_pool(self, pool: str, image_ids: Iterable[int], run_id: int | None = None) -> int:
        with self.transaction():
            return self.b.executemany("INSERT INTO datapool (pool, image_id, added_in_run) VALUES (?,?,?)"
                                      " ON CONFLICT DO NOTHING", [(pool, int(i), run_id) for i in image_ids])

    def _candidate_sql(self, select: str, model_id: int, pool: str | None, process_all: bool,
                       exclude: CandidateFilter | None = None) -> tuple[str, list[Any]]:
        # NOT INDEXED (SQLite): one sequential scan of the vectors beats a walk through an index and a sort
        # (4-5x at 300k rows); callers order the result themselves.
        sql = (f"SELECT {select} FROM embeddings e{self.b.not_indexed} JOIN images i ON i.id = e.image_id"
               " WHERE e.model_id = ? AND i.status = 'ok'")
        params: list[Any] = [model_id]
        if pool:
            sql += " AND e.image_id NOT IN (SELECT image_id FROM datapool WHERE pool = ?)"
            params.append(pool)
            if not process_all:
                sql += (" AND e.image_id NOT IN (SELECT d.image_id FROM decisions d JOIN runs r ON r.id = d.run_id"
                        " WHERE r.pool = ? AND r.status = 'ok')")
                params.append(pool)
        if exclude is not None and exclude.near_duplicates:
            sql += (" AND NOT (i.near_duplicate_of IS NOT NULL AND EXISTS"
                    " (SELECT 1 FROM images o WHERE o.id = i.near_duplicate_of AND o.status = 'ok'))")
        for column, op, threshold in exclude.quality if exclude is not None else ():
            sql += f" AND {quality_condition(column, op)} = 0"
            params.append(threshold)
        return sql, params

    def candidate_ids(self, model_id: int, pool: str | None, process_all: bool,
                      exclude: CandidateFilter | None = None) -> list[int]:
        """`ok` images with a vector of this model, not in the pool and, for pool runs, not decided by an
        earlier successful run of the same pool (unless process_all), and not kept out by `exclude`."""
        sql, params = self._candidate_sql("e.image_id", model_id, pool, process_all, exclude)
        return sorted(int(r[0]) for r in self.b.execute(sql, params))

    def candidate_vectors(self, model_id: int, pool: str | None, process_all: bool,
                          exclude: CandidateFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The candidates (see `candidate_ids`) of every node and their vectors, streamed: (ids, N×d float32)."""
        dim = self._dim(model_id)
        sql, params = self._candidate_sql("e.image_id, e.vector", model_id, pool, process_all, exclude)
        ids, matrix = self._read_vectors(model_id, sql, params, dim)
        order = np.argsort(ids, kind="stable")
        return ids[order], matrix[order]

    def _by_ids(self, sql: str, ids: Iterable[int], before: Sequence[Any] = ()) -> Iterator[Any]:
        """Rows of `sql` (ending in `IN ({marks})`) for these ids, 500 at a time."""
        wanted = [int(i) for i in ids]
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            yield from self.b.execute(sql.format(marks=",".join("?" * len(chunk))), (*before, *chunk))

    def paths(self, image_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        """image id -> (root, relpath)."""
        return {int(r[0]): (_dec(r[1]), _dec(r[2]))
                for r in self._by_ids("SELECT id, root, relpath FROM images WHERE id IN ({marks})", image_ids)}

    def locations(self, image_ids: Iterable[int]) -> dict[int, Location]:
        """image id -> (node, root, relpath)."""
        return {int(r[0]): Location(str(r[1]), _dec(r[2]), _dec(r[3]))
                for r in self._by_ids("SELECT id, node, root, relpath FROM images WHERE id IN ({marks})", image_ids)}

    def top_folders(self, root: str, node: str | None = None) -> list[str]:
        """Sorted top-level sub-folders of a node's root (this one's unless named) that hold (or held) images:
        lightly's label order."""
        folder, has_folder = self.b.first_folder("relpath")
        rows = self.b.execute(f"SELECT DISTINCT {folder} FROM images WHERE node = ? AND root = ? AND {has_folder}",
                              (node or self.node, self.b.path(root)))
        return sorted(_dec(r[0]) for r in rows)

    def ids_by_path(self, root: str, node: str | None = None) -> dict[str, int]:
        return {_dec(r[0]): int(r[1]) for r in self.b.execute("SELECT relpath, id FROM images WHERE node = ? AND root = ?",
                                                              (node or self.node, self.b.path(root)))}

    def selected_held(self, run_id: int) -> list[int]:
        """The images a run selected that this node holds, in rank order."""
        return [int(r[0]) for r in self.b.execute(
            "SELECT d.image_id FROM decisions d JOIN images i ON i.id = d.image_id WHERE d.run_id = ? AND d.selected = 1"
            " AND i.node = ? ORDER BY d.rank", (run_id, self.node))]

    # ---- near duplicates and quality ----------------------------------------------------------
    def embedding_tags(self, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, vector tags) of every `ok` image with a vector of this model: what the index must hold."""
        rows = self.b.execute("SELECT e.image_id, e.vhash FROM embeddings e JOIN images i ON i.id = e.image_id"
                              " WHERE e.model_id = ? AND i.status = 'ok'", (model_id,)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        tags = np.fromiter((vector_tag(r[1]) for r in rows), dtype=np.int64, count=len(rows))
        return ids, tags

    def last_seq(self, model_id: int) -> int:
        """The model's last vector commit sequence number (0: none)."""
        return int(self.b.execute("SELECT COALESCE(MAX(seq), 0) FROM embeddings WHERE model_id = ?",
                                  (model_id,)).fetchone()[0])

    def tags_since(self, model_id: int, seq: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(ids, tags, last seq) of the `ok` images whose vectors of this model were committed after `seq`, by any
        node: how a node's near-duplicate index catches up with the others' commits."""
        rows = self.b.execute("SELECT e.image_id, e.vhash, e.seq FROM embeddings e JOIN images i ON i.id = e.image_id"
                              " WHERE e.model_id = ? AND e.seq > ? AND i.status = 'ok' ORDER BY e.seq",
                              (model_id, seq)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        tags = np.fromiter((vector_tag(r[1]) for r in rows), dtype=np.int64, count=len(rows))
        return ids, tags, (int(rows[-1][2]) if rows else seq)

    def vectors_of(self, model_id: int, image_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, N×d vectors, tags) of these images under this model (those that have one), in `image_ids` order."""
        dim = self._dim(model_id)
        found: dict[int, tuple[bytes, str]] = {
            int(r[0]): (bytes(r[1]), r[2]) for r in self._by_ids(
                "SELECT image_id, vector, vhash FROM embeddings WHERE model_id = ? AND image_id IN ({marks})",
                image_ids, (model_id,))}
        kept = [int(i) for i in image_ids if int(i) in found]
        matrix = np.frombuffer(b"".join(found[i][0] for i in kept), dtype=np.float32).reshape(len(kept), dim)
        tags = np.fromiter((vector_tag(found[i][1]) for i in kept), dtype=np.int64, count=len(kept))
        return np.asarray(kept, dtype=np.int64), matrix.copy(), tags

    def near_links(self, image_ids: Iterable[int]) -> dict[int, tuple[str, int | None]]:
        """image id -> (status, near_duplicate_of) for these images."""
        return {int(r[0]): (str(r[1]), None if r[2] is None else int(r[2]))
                for r in self._by_ids("SELECT id, status, near_duplicate_of FROM images WHERE id IN ({marks})", image_ids)}

    def set_near_duplicates(self, links: Iterable[tuple[int, int, float, int]]) -> int:
        """(image, earliest image of its group, distance, model) for images found after they were stored. In a transaction."""
        return self.b.executemany("UPDATE images SET near_duplicate_of = ?, near_distance = ?, near_model_id = ?"
                                  " WHERE id = ? AND status = 'ok'",
                                  [(int(of), float(dist), int(m), int(i)) for i, of, dist, m in links])

    def near_duplicate_groups(self) -> list[tuple[int, list[tuple[int, float | None]]]]:
        """(original, [(copy, distance), ...]) for every `ok` image with `ok` near copies; by original, then distance."""
        groups: dict[int, list[tuple[int, float | None]]] = {}
        rows = self.b.execute(
            "SELECT i.near_duplicate_of, i.id, i.near_distance FROM images i JOIN images o ON o.id = i.near_duplicate_of"
            " WHERE i.near_duplicate_of IS NOT NULL AND i.status = 'ok' AND o.status = 'ok'"
            " ORDER BY i.near_duplicate_of, i.near_distance NULLS FIRST, i.id")
        for original, copy, distance in rows:
            groups.setdefault(int(original), []).append((int(copy), distance))
        return list(groups.items())

    def count_near_duplicates(self) -> int:
        return int(self.b.execute(
            "SELECT COUNT(*) FROM images i JOIN images o ON o.id = i.near_duplicate_of"
            " WHERE i.status = 'ok' AND o.status = 'ok'").fetchone()[0])

    def quality_counts(self, rules: Mapping[str, tuple[str, str, float]]) -> dict[str, int]:
        """flag -> number of `ok` images it flags; `rules` maps a flag to (column, op, threshold)."""
        if not rules:
            return {}
        parts = [f"SUM({quality_condition(c, op)})" for c, op, _t in rules.values()]
        row = self.b.execute(f"SELECT {', '.join(parts)} FROM images i WHERE i.status = 'ok'",
                             [t for _c, _op, t in rules.values()]).fetchone()
        return {flag: int(n or 0) for flag, n in zip(rules, row, strict=True)}

    def worst_quality(self, rule: tuple[str, str, float], limit: int) -> list[tuple[int, str, str, float]]:
        """The `limit` flagged `ok` images furthest past the rule's threshold: (id, root, relpath, value)."""
        column, op, threshold = rule
        order = "ASC" if op == "<" else "DESC"
        rows = self.b.execute(f"SELECT i.id, i.root, i.relpath, i.{column} FROM images i WHERE i.status = 'ok'"
                              f" AND {quality_condition(column, op)} = 1 ORDER BY i.{column} {order}, i.id LIMIT ?",
                              (threshold, limit))
        return [(int(r[0]), _dec(r[1]), _dec(r[2]), float(r[3])) for r in rows]

    # ---- files every node shares (a model's artifact, trained weights) -------------------------------
    @property
    def shared(self) -> bool:
        """Whether other nodes use this store (PostgreSQL): then files every node needs live in it as blobs."""
        return self.dialect == "postgresql"

    def put_blob(self, name: str, data: bytes) -> bool:
        """Keep `data` under `name` unless a blob of that name exists (the first node's stays); True if written."""
        with self.transaction():
            return self.b.execute("INSERT INTO blobs (name, sha256, size, data, created) VALUES (?,?,?,?,?)"
                                  " ON CONFLICT (name) DO NOTHING",
                                  (name, hashlib.sha256(data).hexdigest(), len(data), data, time.time())).rowcount > 0

    def blob(self, name: str) -> bytes | None:
        """A blob's bytes, checked against the hash recorded with them (None: no such blob)."""
        row = self.b.execute("SELECT data, sha256 FROM blobs WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        data = bytes(row[0])
        if hashlib.sha256(data).hexdigest() != row[1]:
            raise StoreError(f"the store's blob {name!r} does not match its recorded hash")
        return data

    def has_blob(self, name: str) -> bool:
        return self.b.execute("SELECT 1 FROM blobs WHERE name = ?", (name,)).fetchone() is not None

    # ---- copying a whole store (poolwatch store migrate) -----------------------------------------
    def table_rows(self, table: str, chunk: int = STREAM_ROWS) -> Iterator[tuple[list[str], list[Any]]]:
        """Every row of a table, in chunks, with the column names, for a copy into another store."""
        cur = self.b.execute(f"SELECT * FROM {table} LIMIT 0")
        names = [d[0] for d in getattr(cur, "description", None) or []]
        with self.snapshot():
            for rows in self.b.stream(f"SELECT * FROM {table} ORDER BY {names[0]}", (), chunk):
                yield names, rows

    def is_empty(self) -> bool:
        return all(int(self.b.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) == 0
                   for t in ("images", "models", "runs", "datapool"))

    def count_rows(self, table: str) -> int:
        return int(self.b.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    # ---- status ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        model = self.current_model()
        return {
            "images": self.counts_by_status(),
            "nodes": self.nodes(),
            "corrupt_by_reason": self.corrupt_by_reason(),
            "embedded": self.count_embeddings(model.id) if model else 0,
            "reembedding": None if model is None else dict(zip(("done", "total"), self.coverage(model.id), strict=True)),
            "sampling_model_id": (self.sampling_model() or model).id if model else None,
            "datapools": self.pools(),
            "embedding_mode": self.setting("embedding"),
            "last_run": next(({k: r[k] for k in ("id", "trigger", "status", "started", "finished", "n_candidates",
                                "n_selected", "pool", "output_dir", "error", "node")} for r in self.runs(1)), None),
            "model": None if model is None else {
                "id": model.id, "source": model.source, "detail": model.detail, "dim": model.dim,
                "input_size": model.input_size, "arch": model.arch, "weights_hash": model.weights_hash,
            },
        }
