"""The store: one SQLite file (WAL) behind a narrow interface. The only module that speaks SQL.

Every write is a short transaction (`with store.transaction():`); a batch of ingested images is one
transaction, so a crash leaves each image either fully recorded or not recorded at all (and the next
scan finds it again). Schema changes go through the numbered MIGRATIONS below.

Each thread opens its own `Store` (SQLite connections are not shared between threads).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sqlite_utils

from .errors import PoolwatchError

STATUSES = ("pending", "ok", "corrupt", "duplicate", "missing")


class StoreError(PoolwatchError, RuntimeError):
    """The store cannot be opened or used (not a poolwatch database, newer schema, ...)."""


# Migration N brings the schema from version N-1 to N. Append only; never edit a released one.
MIGRATIONS: tuple[str, ...] = (
    # 1: the base schema
    """
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        root TEXT NOT NULL,
        relpath TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        hash TEXT,
        status TEXT NOT NULL CHECK (status IN ('pending', 'ok', 'corrupt', 'duplicate', 'missing')),
        reason TEXT,
        detail TEXT,
        duplicate_of INTEGER REFERENCES images(id),
        width INTEGER,
        height INTEGER,
        format TEXT,
        first_seen REAL NOT NULL,
        updated REAL NOT NULL,
        UNIQUE (root, relpath)
    );
    CREATE INDEX images_hash ON images(hash);
    CREATE INDEX images_status ON images(status);
    CREATE TABLE models (
        id INTEGER PRIMARY KEY,
        weights_hash TEXT NOT NULL,
        input_size INTEGER NOT NULL,
        source TEXT NOT NULL,
        detail TEXT,
        arch TEXT NOT NULL,
        dim INTEGER NOT NULL,
        path TEXT,
        created REAL NOT NULL,
        is_current INTEGER NOT NULL DEFAULT 0,
        UNIQUE (weights_hash, input_size)
    );
    CREATE TABLE embeddings (
        image_id INTEGER NOT NULL REFERENCES images(id),
        model_id INTEGER NOT NULL REFERENCES models(id),
        vector BLOB NOT NULL,
        vhash TEXT NOT NULL,
        PRIMARY KEY (image_id, model_id)
    );
    CREATE INDEX embeddings_vhash ON embeddings(model_id, vhash);
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        trigger TEXT NOT NULL,
        started REAL NOT NULL,
        finished REAL,
        status TEXT NOT NULL,
        error TEXT,
        config TEXT NOT NULL,
        method TEXT,
        pool TEXT,
        model_id INTEGER REFERENCES models(id),
        n_candidates INTEGER,
        n_selected INTEGER,
        stop_reason TEXT,
        output_dir TEXT,
        stats TEXT
    );
    CREATE TABLE decisions (
        run_id INTEGER NOT NULL REFERENCES runs(id),
        image_id INTEGER NOT NULL REFERENCES images(id),
        selected INTEGER NOT NULL,
        rank INTEGER,
        distance REAL,
        PRIMARY KEY (run_id, image_id)
    );
    CREATE INDEX decisions_image ON decisions(image_id);
    CREATE TABLE datapool (
        pool TEXT NOT NULL,
        image_id INTEGER NOT NULL REFERENCES images(id),
        added_in_run INTEGER REFERENCES runs(id),
        PRIMARY KEY (pool, image_id)
    );
    """,
    # 2: how many times the model failed on an image (it stays `pending` until the limit, then `corrupt`)
    """
    ALTER TABLE images ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
    """,
    # 3: choices made once per store (the embedding mode `auto` picked, the decode mode), as JSON values
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 4: quality signals measured on the decoded image (pipeline/quality.py), and the near-duplicate link: the
    # earliest-seen image of the group, the distance to the neighbour found, and the model it was found under
    """
    ALTER TABLE images ADD COLUMN sharpness REAL;
    ALTER TABLE images ADD COLUMN brightness REAL;
    ALTER TABLE images ADD COLUMN contrast REAL;
    ALTER TABLE images ADD COLUMN entropy REAL;
    ALTER TABLE images ADD COLUMN colorfulness REAL;
    ALTER TABLE images ADD COLUMN aspect REAL;
    ALTER TABLE images ADD COLUMN near_duplicate_of INTEGER REFERENCES images(id);
    ALTER TABLE images ADD COLUMN near_distance REAL;
    ALTER TABLE images ADD COLUMN near_model_id INTEGER REFERENCES models(id);
    CREATE INDEX images_near ON images(near_duplicate_of) WHERE near_duplicate_of IS NOT NULL;
    """,
)

QUALITY_COLUMNS = ("sharpness", "brightness", "contrast", "entropy", "colorfulness", "aspect")


@dataclass(frozen=True)
class KnownFile:
    """What the rule that decides whether a file needs work (`discover.decide`) knows of its row."""

    id: int
    size: int
    mtime_ns: int
    status: str
    has_vector: bool = False  # of the model asked about (False when none was)


@dataclass(frozen=True)
class ImageRecord:
    """One image's row as the ingest pipeline writes it."""

    root: str
    relpath: str
    size: int
    mtime_ns: int
    hash: str | None
    status: str
    reason: str | None = None
    detail: str | None = None
    duplicate_of: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    attempts: int = 0  # failed embedding attempts of a `pending` image
    quality: Mapping[str, float] | None = None  # QUALITY_COLUMNS -> value (pipeline/quality.Quality.as_dict)
    near_duplicate_of: int | None = None  # an `ok` image that is a near copy of this earlier-seen one
    near_distance: float | None = None
    near_model_id: int | None = None


@dataclass(frozen=True)
class ModelRecord:
    id: int
    weights_hash: str
    input_size: int
    source: str
    detail: str | None
    arch: dict[str, Any]
    dim: int
    path: str | None
    is_current: bool


@dataclass(frozen=True)
class CandidateFilter:
    """What keeps an embedded `ok` image out of a sampling run's candidates besides the pool rule."""

    near_duplicates: bool = False  # near copies of an earlier image that is still `ok`
    # quality flags: (column, "<" or ">", threshold) - pipeline/quality.FLAGS with the configured thresholds
    quality: tuple[tuple[str, str, float], ...] = ()


def quality_condition(column: str, op: str, alias: str = "i") -> str:
    """SQL that is 1 when an image's signal crosses its flag's threshold (one `?`); 0 when unmeasured."""
    if column not in QUALITY_COLUMNS or op not in ("<", ">"):
        raise ValueError(f"not a quality rule: {column} {op}")
    return f"COALESCE({alias}.{column} {op} ?, 0)"


def _enc(path: str) -> str | bytes:
    """A path for the database: TEXT when it is valid UTF-8, else its raw bytes as a BLOB.

    File names on Linux are bytes; Python hands undecodable ones over with surrogate escapes, which
    SQLite's TEXT cannot hold. The BLOB keeps them exact (and unique) instead of dropping the file.
    """
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path)


def _dec(value: str | bytes) -> str:
    return value if isinstance(value, str) else os.fsdecode(value)


def _inserted_id(cur: sqlite3.Cursor) -> int:
    """The rowid of the row that `cur`'s INSERT just made."""
    if cur.lastrowid is None:  # sqlite3 sets it on every successful INSERT
        raise StoreError("the database reported no id for the row just inserted")
    return cur.lastrowid


def _row(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("root", "relpath"):
        if isinstance(row.get(key), bytes):
            row[key] = _dec(row[key])
    return row


def vector_hash(vector: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(vector, dtype=np.float32).tobytes(), digest_size=16).hexdigest()


def vector_tag(vhash: str) -> int:
    """A vector's hash as a signed 64-bit fingerprint (the near-duplicate index keeps one per vector)."""
    return int(vhash[:16], 16) - 2**63


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the store file, None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Store:
    """A poolwatch SQLite store. Open with `Store.open(path)`; close with `close()` or `with`.

    Every commit first checks that the file is still the one opened: SQLite keeps writing into a
    file that was deleted (or replaced) under it, where every write is lost when the process ends."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self.conn = conn
        self.path = path
        self.db = sqlite_utils.Database(conn)
        self.identity = file_identity(path)

    def verify_file(self) -> None:
        """Raise StoreError when the store file was removed or replaced since it was opened."""
        if file_identity(self.path) != self.identity:
            raise StoreError(f"the store {str(self.path)!r} was removed or replaced while in use; nothing more is "
                             "written to it (start poolwatch again to use a new store)")

    # ---- lifecycle ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, busy_timeout: float = 30.0) -> Store:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: no implicit transactions; `transaction()` issues BEGIN IMMEDIATE.
            conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            store = cls(conn, path)
            store._migrate()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the store {str(path)!r}: {exc}") from None
        return store

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        version = self.schema_version
        if version > len(MIGRATIONS):
            raise StoreError(f"the store {str(self.path)!r} has schema {version}, newer than this poolwatch ({len(MIGRATIONS)})")
        for number in range(version + 1, len(MIGRATIONS) + 1):
            with self.transaction():
                if self.schema_version >= number:  # another process migrated it while we waited for the lock
                    continue
                for statement in MIGRATIONS[number - 1].split(";"):
                    if statement.strip():
                        self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {number}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction; nested use joins the outer one."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            self.verify_file()
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    # ---- images ---------------------------------------------------------------------------
    _KNOWN = ("SELECT relpath, id, size, mtime_ns, status,"
              " EXISTS (SELECT 1 FROM embeddings e WHERE e.image_id = i.id AND e.model_id = ?) FROM images i")

    def known_files(self, root: str, model_id: int | None = None) -> dict[str, KnownFile]:
        """Every row of a root, with whether `model_id` has a vector for it: one query for a whole scan."""
        rows = self.conn.execute(f"{self._KNOWN} WHERE root = ?", (model_id, _enc(root)))
        return {_dec(r[0]): KnownFile(r[1], r[2], r[3], r[4], bool(r[5])) for r in rows}

    def known_file(self, root: str, relpath: str, model_id: int) -> KnownFile | None:
        row = self.conn.execute(f"{self._KNOWN} WHERE root = ? AND relpath = ?",
                                (model_id, _enc(root), _enc(relpath))).fetchone()
        return KnownFile(row[1], row[2], row[3], row[4], bool(row[5])) if row else None

    def upsert_image(self, rec: ImageRecord) -> int:
        """Insert or update the row of (root, relpath); returns its id. Use inside a transaction."""
        now = time.time()
        root, relpath = _enc(rec.root), _enc(rec.relpath)
        row = self.conn.execute("SELECT id, hash FROM images WHERE root = ? AND relpath = ?", (root, relpath)).fetchone()
        quality = rec.quality or {}
        values = (rec.size, rec.mtime_ns, rec.hash, rec.status, rec.reason, rec.detail, rec.duplicate_of,
                  rec.width, rec.height, rec.format, rec.attempts, *(quality.get(c) for c in QUALITY_COLUMNS),
                  rec.near_duplicate_of, rec.near_distance, rec.near_model_id, now)
        columns = ("size", "mtime_ns", "hash", "status", "reason", "detail", "duplicate_of", "width", "height", "format",
                   "attempts", *QUALITY_COLUMNS, "near_duplicate_of", "near_distance", "near_model_id", "updated")
        if row is None:
            marks = ",".join("?" * (len(columns) + 3))
            cur = self.conn.execute(f"INSERT INTO images ({', '.join(columns)}, root, relpath, first_seen) VALUES ({marks})",
                                    (*values, root, relpath, now))
            return _inserted_id(cur)
        image_id, old_hash = int(row[0]), row[1]
        self.conn.execute(f"UPDATE images SET {', '.join(f'{c}=?' for c in columns)} WHERE id=?", (*values, image_id))
        if old_hash != rec.hash or rec.status != "ok":
            # Changed content gets new vectors; its old decisions stay as history. Near copies of what it was
            # are no longer copies of it.
            self.conn.execute("DELETE FROM embeddings WHERE image_id = ?", (image_id,))
            self.conn.execute("UPDATE images SET near_duplicate_of = NULL, near_distance = NULL, near_model_id = NULL"
                              " WHERE near_duplicate_of = ?", (image_id,))
        return image_id

    def first_ok_with_hash(self, content_hash: str, exclude_id: int | None = None) -> int | None:
        row = self.conn.execute(
            "SELECT id FROM images WHERE hash = ? AND status = 'ok' AND id IS NOT ? ORDER BY id LIMIT 1",
            (content_hash, exclude_id),
        ).fetchone()
        return int(row[0]) if row else None

    def revive(self, root: str, relpaths: Iterable[str], model_id: int) -> list[str]:
        """`missing` images that are back with their identity unchanged become `ok` again without being read,
        when they still have a vector of `model_id` and no other `ok` image holds their bytes (else the
        caller reads them: the duplicate rule decides). Returns the relpaths revived. Use in a transaction."""
        revived = []
        now = time.time()
        for rel in relpaths:
            cur = self.conn.execute(
                "UPDATE images SET status = 'ok', reason = NULL, detail = NULL, updated = ? WHERE root = ? AND relpath = ?"
                " AND status = 'missing'"
                " AND EXISTS (SELECT 1 FROM embeddings e WHERE e.image_id = images.id AND e.model_id = ?)"
                " AND NOT EXISTS (SELECT 1 FROM images o WHERE o.hash = images.hash AND o.status = 'ok' AND o.id != images.id)",
                (now, _enc(root), _enc(rel), model_id),
            )
            if cur.rowcount:
                revived.append(rel)
        return revived

    def mark_missing(self, root: str, relpaths: Iterable[str]) -> int:
        now = time.time()
        cur = self.conn.executemany(
            "UPDATE images SET status='missing', reason=NULL, detail=NULL, updated=?"
            " WHERE root=? AND relpath=? AND status != 'missing'",
            ((now, _enc(root), _enc(rel)) for rel in relpaths),
        )
        return cur.rowcount

    def image(self, image_id: int) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM images WHERE id = ?", [image_id]))
        return _row(rows[0]) if rows else None

    def image_by_path(self, root: str, relpath: str) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM images WHERE root = ? AND relpath = ?", [_enc(root), _enc(relpath)]))
        return _row(rows[0]) if rows else None

    def images(self, status: str | None = None) -> list[dict[str, Any]]:
        if status is None:
            return [_row(r) for r in self.db.query("SELECT * FROM images ORDER BY id")]
        return [_row(r) for r in self.db.query("SELECT * FROM images WHERE status = ? ORDER BY id", [status])]

    def counts_by_status(self) -> dict[str, int]:
        counts = {s: 0 for s in STATUSES}
        for status, n in self.conn.execute("SELECT status, COUNT(*) FROM images GROUP BY status"):
            counts[status] = n
        return counts

    def corrupt_by_reason(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT reason, COUNT(*) FROM images WHERE status='corrupt' GROUP BY reason ORDER BY reason")
        return {r: n for r, n in rows}

    # ---- settings (choices made once per store) ----------------------------------------------
    def setting(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def set_setting(self, key: str, value: Any) -> None:
        with self.transaction():
            self.conn.execute("INSERT INTO settings (key, value) VALUES (?, ?)"
                              " ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, json.dumps(value, sort_keys=True)))

    def ok_images_by_hash(self, limit: int) -> list[tuple[str, str, str]]:
        """(root, relpath, hash) of the first `limit` ok images in content-hash order: a choice of images that
        does not depend on the order they arrived in (int8 calibration)."""
        rows = self.conn.execute(
            "SELECT root, relpath, hash FROM images WHERE status = 'ok' AND hash IS NOT NULL AND root NOT LIKE 'embeddings:%'"
            " ORDER BY hash, id LIMIT ?", (limit,),
        )
        return [(str(r[0]), _dec(r[1]), str(r[2])) for r in rows]

    def count_ok(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM images WHERE status = 'ok' AND root NOT LIKE 'embeddings:%'")
                   .fetchone()[0])

    # ---- models ---------------------------------------------------------------------------
    def register_model(self, *, weights_hash: str, input_size: int, source: str, detail: str | None,
                       arch: dict[str, Any], dim: int, path: str | None) -> int:
        """Get-or-create the model row for these weights at this input size; returns its id."""
        row = self.conn.execute(
            "SELECT id FROM models WHERE weights_hash = ? AND input_size = ?", (weights_hash, input_size)
        ).fetchone()
        if row:
            return int(row[0])
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO models (weights_hash, input_size, source, detail, arch, dim, path, created)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (weights_hash, input_size, source, detail, json.dumps(arch, sort_keys=True), dim, path, time.time()),
            )
            return _inserted_id(cur)

    def set_current_model(self, model_id: int) -> None:
        with self.transaction():
            self.conn.execute("UPDATE models SET is_current = (id = ?)", (model_id,))

    def model(self, model_id: int) -> ModelRecord | None:
        row = self.conn.execute(
            "SELECT id, weights_hash, input_size, source, detail, arch, dim, path, is_current FROM models WHERE id=?",
            (model_id,),
        ).fetchone()
        if row is None:
            return None
        return ModelRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), row[6], row[7], bool(row[8]))

    def current_model(self) -> ModelRecord | None:
        row = self.conn.execute("SELECT id FROM models WHERE is_current = 1").fetchone()
        return self.model(int(row[0])) if row else None

    def models(self) -> list[ModelRecord]:
        return [m for m in (self.model(int(r[0])) for r in self.conn.execute("SELECT id FROM models ORDER BY id")) if m]

    def coverage(self, model_id: int) -> tuple[int, int]:
        """(ok images with a vector of this model, ok images) - re-embedding progress."""
        row = self.conn.execute(
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
            cur = self.conn.execute(
                "DELETE FROM embeddings WHERE model_id != ? AND model_id IN (SELECT id FROM models WHERE source != 'imported')",
                (current.id,),
            )
            return cur.rowcount

    # ---- embeddings -----------------------------------------------------------------------
    def put_embedding(self, image_id: int, model_id: int, vector: np.ndarray) -> None:
        vec = np.ascontiguousarray(vector, dtype=np.float32)
        self.conn.execute(
            "INSERT OR REPLACE INTO embeddings (image_id, model_id, vector, vhash) VALUES (?,?,?,?)",
            (image_id, model_id, vec.tobytes(), vector_hash(vec)),
        )

    def first_ok_with_vector(self, model_id: int, vhash: str, exclude_id: int | None = None) -> int | None:
        row = self.conn.execute(
            "SELECT e.image_id FROM embeddings e JOIN images i ON i.id = e.image_id"
            " WHERE e.model_id = ? AND e.vhash = ? AND i.status = 'ok' AND i.id IS NOT ? ORDER BY i.id LIMIT 1",
            (model_id, vhash, exclude_id),
        ).fetchone()
        return int(row[0]) if row else None

    def has_vector(self, image_id: int, model_id: int) -> bool:
        return self.conn.execute("SELECT 1 FROM embeddings WHERE image_id = ? AND model_id = ?",
                                 (image_id, model_id)).fetchone() is not None

    def count_embeddings(self, model_id: int) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM embeddings WHERE model_id = ?", (model_id,)).fetchone()[0])

    def vectors(
        self, model_id: int, image_ids: Sequence[int] | None = None, ok_only: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, N×d float32 matrix) of the images embedded by this model, ordered by image id;
        only `ok` images unless ok_only=False; restricted to `image_ids` when given."""
        model = self.model(model_id)
        if model is None:
            raise StoreError(f"no model with id {model_id}")
        sql = "SELECT e.image_id, e.vector FROM embeddings e"
        if ok_only:
            sql += " JOIN images i ON i.id = e.image_id AND i.status = 'ok'"
        rows = self.conn.execute(sql + " WHERE e.model_id = ? ORDER BY e.image_id", (model_id,)).fetchall()
        if image_ids is not None:
            wanted = set(int(i) for i in image_ids)
            rows = [r for r in rows if r[0] in wanted]
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        matrix = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), model.dim)
        return ids, matrix.copy()

    # ---- runs, decisions, pools -------------------------------------------------------------
    def begin_run(self, *, trigger: str, config_json: str, method: str, pool: str | None, model_id: int | None) -> int:
        with self.transaction():
            cur = self.conn.execute(
                "INSERT INTO runs (trigger, started, status, config, method, pool, model_id) VALUES (?,?,?,?,?,?,?)",
                (trigger, time.time(), "running", config_json, method, pool or None, model_id),
            )
            return _inserted_id(cur)

    def finish_run(self, run_id: int, *, n_candidates: int, n_selected: int, stop_reason: str, output_dir: str,
                   stats: dict[str, Any], decisions: Iterable[tuple[int, bool, int | None, float | None]],
                   pool: str | None, pool_add: Sequence[int]) -> None:
        """Decisions, pool update and the run's outcome in ONE transaction."""
        with self.transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO decisions (run_id, image_id, selected, rank, distance) VALUES (?,?,?,?,?)",
                ((run_id, int(i), int(sel), rank, dist) for i, sel, rank, dist in decisions),
            )
            if pool:
                self.conn.executemany(
                    "INSERT OR IGNORE INTO datapool (pool, image_id, added_in_run) VALUES (?,?,?)",
                    ((pool, int(i), run_id) for i in pool_add),
                )
            self.conn.execute(
                "UPDATE runs SET finished=?, status='ok', n_candidates=?, n_selected=?, stop_reason=?, output_dir=?,"
                " stats=? WHERE id=?",
                (time.time(), n_candidates, n_selected, stop_reason, output_dir, json.dumps(stats), run_id),
            )

    def fail_run(self, run_id: int, error: str, status: str = "failed") -> None:
        with self.transaction():
            self.conn.execute("UPDATE runs SET finished=?, status=?, error=? WHERE id=?", (time.time(), status, error, run_id))

    def interrupted_runs(self) -> list[int]:
        """Runs left 'running' by a process that died; the caller decides (only one process owns a store)."""
        return [int(r[0]) for r in self.conn.execute("SELECT id FROM runs WHERE status = 'running' ORDER BY id")]

    def run(self, run_id: int) -> dict[str, Any] | None:
        rows = list(self.db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
        return rows[0] if rows else None

    def runs(self, limit: int = 20) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM runs ORDER BY id DESC LIMIT ?", [limit]))

    def decisions(self, run_id: int) -> list[dict[str, Any]]:
        return list(self.db.query("SELECT * FROM decisions WHERE run_id = ? ORDER BY selected DESC, rank, image_id", [run_id]))

    def pool_members(self, pool: str) -> list[int]:
        return [int(r[0]) for r in self.conn.execute("SELECT image_id FROM datapool WHERE pool = ? ORDER BY image_id", (pool,))]

    def pool_version(self, pool: str) -> tuple[int, int, int]:
        """Changes whenever the pool's members do (the near-duplicate check caches the pool's vectors)."""
        row = self.conn.execute("SELECT COUNT(*), COALESCE(SUM(image_id), 0), COALESCE(MAX(added_in_run), 0) FROM datapool"
                                " WHERE pool = ?", (pool,)).fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def pools(self) -> dict[str, int]:
        return {p: n for p, n in self.conn.execute("SELECT pool, COUNT(*) FROM datapool GROUP BY pool ORDER BY pool")}

    def replace_pool(self, pool: str, image_ids: Iterable[int], run_id: int | None = None) -> None:
        with self.transaction():
            self.conn.execute("DELETE FROM datapool WHERE pool = ?", (pool,))
            self.conn.executemany("INSERT OR IGNORE INTO datapool (pool, image_id, added_in_run) VALUES (?,?,?)",
                                  ((pool, int(i), run_id) for i in image_ids))

    def add_to_pool(self, pool: str, image_ids: Iterable[int], run_id: int | None = None) -> int:
        with self.transaction():
            cur = self.conn.executemany("INSERT OR IGNORE INTO datapool (pool, image_id, added_in_run) VALUES (?,?,?)",
                                        ((pool, int(i), run_id) for i in image_ids))
            return cur.rowcount

    def _candidate_sql(self, select: str, model_id: int, pool: str | None, process_all: bool,
                       exclude: CandidateFilter | None = None) -> tuple[str, list[Any]]:
        # NOT INDEXED: one sequential scan of the vectors beats a walk through an index and a sort
        # (4-5x at 300k rows); callers order the result themselves.
        sql = (f"SELECT {select} FROM embeddings e NOT INDEXED JOIN images i ON i.id = e.image_id"
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
            sql += f" AND NOT {quality_condition(column, op)}"
            params.append(threshold)
        return sql, params

    def candidate_ids(self, model_id: int, pool: str | None, process_all: bool,
                      exclude: CandidateFilter | None = None) -> list[int]:
        """`ok` images with a vector of this model, not in the pool and, for pool runs, not decided by an
        earlier successful run of the same pool (unless process_all), and not kept out by `exclude`."""
        sql, params = self._candidate_sql("e.image_id", model_id, pool, process_all, exclude)
        return sorted(int(r[0]) for r in self.conn.execute(sql, params))

    def candidate_vectors(self, model_id: int, pool: str | None, process_all: bool,
                          exclude: CandidateFilter | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The candidates (see `candidate_ids`) and their vectors in one query: (ids, N×d float32)."""
        model = self.model(model_id)
        if model is None:
            raise StoreError(f"no model with id {model_id}")
        sql, params = self._candidate_sql("e.image_id, e.vector", model_id, pool, process_all, exclude)
        rows = self.conn.execute(sql, params).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        matrix = np.frombuffer(b"".join([r[1] for r in rows]), dtype=np.float32).reshape(len(rows), model.dim)
        order = np.argsort(ids, kind="stable")
        return ids[order], matrix[order]

    def paths(self, image_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
        """image id -> (root, relpath)."""
        out: dict[int, tuple[str, str]] = {}
        ids = [int(i) for i in image_ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.conn.execute(f"SELECT id, root, relpath FROM images WHERE id IN ({marks})", chunk):
                out[int(r[0])] = (_dec(r[1]), _dec(r[2]))
        return out

    def top_folders(self, root: str) -> list[str]:
        """Sorted top-level sub-folders of a root that hold (or held) images: lightly's label order."""
        rows = self.conn.execute(
            "SELECT DISTINCT substr(relpath, 1, instr(relpath, '/') - 1) FROM images WHERE root = ? AND instr(relpath, '/') > 0",
            (_enc(root),),
        )
        return sorted(_dec(r[0]) for r in rows)

    def ids_by_path(self, root: str) -> dict[str, int]:
        return {_dec(r[0]): int(r[1]) for r in self.conn.execute("SELECT relpath, id FROM images WHERE root = ?", (_enc(root),))}

    # ---- near duplicates and quality ----------------------------------------------------------
    def embedding_tags(self, model_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, vector tags) of every `ok` image with a vector of this model: what the index must hold."""
        rows = self.conn.execute("SELECT e.image_id, e.vhash FROM embeddings e JOIN images i ON i.id = e.image_id"
                                 " WHERE e.model_id = ? AND i.status = 'ok'", (model_id,)).fetchall()
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        tags = np.fromiter((vector_tag(r[1]) for r in rows), dtype=np.int64, count=len(rows))
        return ids, tags

    def vectors_of(self, model_id: int, image_ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, N×d vectors, tags) of these images under this model (those that have one), in `image_ids` order."""
        model = self.model(model_id)
        if model is None:
            raise StoreError(f"no model with id {model_id}")
        found: dict[int, tuple[bytes, str]] = {}
        ids = [int(i) for i in image_ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            rows = self.conn.execute(f"SELECT image_id, vector, vhash FROM embeddings WHERE model_id = ? AND image_id IN"
                                     f" ({','.join('?' * len(chunk))})", (model_id, *chunk))
            found.update((int(r[0]), (r[1], r[2])) for r in rows)
        kept = [i for i in ids if i in found]
        matrix = np.frombuffer(b"".join(found[i][0] for i in kept), dtype=np.float32).reshape(len(kept), model.dim)
        tags = np.fromiter((vector_tag(found[i][1]) for i in kept), dtype=np.int64, count=len(kept))
        return np.asarray(kept, dtype=np.int64), matrix.copy(), tags

    def near_links(self, image_ids: Iterable[int]) -> dict[int, tuple[str, int | None]]:
        """image id -> (status, near_duplicate_of) for these images."""
        out: dict[int, tuple[str, int | None]] = {}
        ids = [int(i) for i in image_ids]
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.conn.execute(f"SELECT id, status, near_duplicate_of FROM images WHERE id IN ({marks})", chunk)
            out.update((int(r[0]), (str(r[1]), r[2])) for r in rows)
        return out

    def set_near_duplicates(self, links: Iterable[tuple[int, int, float, int]]) -> int:
        """(image, earliest image of its group, distance, model) for images found after they were stored. In a transaction."""
        cur = self.conn.executemany("UPDATE images SET near_duplicate_of = ?, near_distance = ?, near_model_id = ?"
                                    " WHERE id = ? AND status = 'ok'", ((of, dist, m, i) for i, of, dist, m in links))
        return cur.rowcount

    def near_duplicate_groups(self) -> list[tuple[int, list[tuple[int, float | None]]]]:
        """(original, [(copy, distance), ...]) for every `ok` image with `ok` near copies; by original, then distance."""
        groups: dict[int, list[tuple[int, float | None]]] = {}
        rows = self.conn.execute(
            "SELECT i.near_duplicate_of, i.id, i.near_distance FROM images i JOIN images o ON o.id = i.near_duplicate_of"
            " WHERE i.near_duplicate_of IS NOT NULL AND i.status = 'ok' AND o.status = 'ok'"
            " ORDER BY i.near_duplicate_of, i.near_distance, i.id")
        for original, copy, distance in rows:
            groups.setdefault(int(original), []).append((int(copy), distance))
        return list(groups.items())

    def count_near_duplicates(self) -> int:
        return int(self.conn.execute(
            "SELECT COUNT(*) FROM images i JOIN images o ON o.id = i.near_duplicate_of"
            " WHERE i.status = 'ok' AND o.status = 'ok'").fetchone()[0])

    def quality_counts(self, rules: Mapping[str, tuple[str, str, float]]) -> dict[str, int]:
        """flag -> number of `ok` images it flags; `rules` maps a flag to (column, op, threshold)."""
        if not rules:
            return {}
        parts = [f"SUM({quality_condition(c, op)})" for c, op, _t in rules.values()]
        row = self.conn.execute(f"SELECT {', '.join(parts)} FROM images i WHERE i.status = 'ok'",
                                [t for _c, _op, t in rules.values()]).fetchone()
        return {flag: int(n or 0) for flag, n in zip(rules, row, strict=True)}

    def worst_quality(self, rule: tuple[str, str, float], limit: int) -> list[tuple[int, str, str, float]]:
        """The `limit` flagged `ok` images furthest past the rule's threshold: (id, root, relpath, value)."""
        column, op, threshold = rule
        order = "ASC" if op == "<" else "DESC"
        rows = self.conn.execute(f"SELECT i.id, i.root, i.relpath, i.{column} FROM images i WHERE i.status = 'ok'"
                                 f" AND {quality_condition(column, op)} ORDER BY i.{column} {order}, i.id LIMIT ?",
                                 (threshold, limit))
        return [(int(r[0]), _dec(r[1]), _dec(r[2]), float(r[3])) for r in rows]

    # ---- status ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        model = self.current_model()
        return {
            "images": self.counts_by_status(),
            "corrupt_by_reason": self.corrupt_by_reason(),
            "embedded": self.count_embeddings(model.id) if model else 0,
            "reembedding": None if model is None else dict(zip(("done", "total"), self.coverage(model.id), strict=True)),
            "sampling_model_id": (self.sampling_model() or model).id if model else None,
            "datapools": self.pools(),
            "embedding_mode": self.setting("embedding"),
            "last_run": next(({k: r[k] for k in ("id", "trigger", "status", "started", "finished", "n_candidates",
                                "n_selected", "pool", "output_dir", "error")} for r in self.runs(1)), None),
            "model": None if model is None else {
                "id": model.id, "source": model.source, "detail": model.detail, "dim": model.dim,
                "input_size": model.input_size, "arch": model.arch, "weights_hash": model.weights_hash,
            },
        }
