"""The two engines behind the store: a connection, its dialect and its transactions.

`Store` (core.py) writes its SQL once, in the subset both engines speak, with `?` placeholders; a backend
runs it. What differs lives here: placeholders and parameter types, how a path is kept, how a write
transaction serialises against other writers, the schema version, the sampling lock, and streaming reads.

Writers are serialised on both: SQLite's BEGIN IMMEDIATE takes the database's write lock; on PostgreSQL
every write transaction first takes one transaction-scoped advisory lock, so the rules that read before
they write (the first image with these bytes stays, an image's next vector sequence number) see every
other node's commits, as they do on one SQLite file.
"""

from __future__ import annotations

import os
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .records import StoreError
from .schema import POSTGRESQL, SQLITE

WRITE_LOCK = 0x706F6F6C  # 'pool': PostgreSQL advisory lock key of write transactions
SAMPLING_LOCK = 0x72756E73  # 'runs': held by the node whose sampling run is in progress


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchmany(self, size: int) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the store file, None when it is gone."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


class Backend(ABC):
    """What a store engine must provide; the shared parts are written once here."""

    dialect: str
    migrations: tuple[str, ...]
    not_indexed = ""  # a hint that a full scan beats the index (SQLite only)
    describe: str  # for messages: the file, or the URL with its password masked

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        ...

    @abstractmethod
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        ...

    @abstractmethod
    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        ...

    @abstractmethod
    def path(self, value: str) -> str | bytes:
        ...

    @abstractmethod
    def first_folder(self, column: str) -> tuple[str, str]:
        """(SQL of a relpath's first folder, SQL that is true when it has one)."""
        ...

    @property
    @abstractmethod
    def in_transaction(self) -> bool:
        ...

    @abstractmethod
    def begin_write(self) -> None:
        ...

    def begin_snapshot(self) -> None:
        """A read-only transaction that sees one state of the store for all its statements."""
        self.execute("BEGIN")

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        self.execute("ROLLBACK")

    def verify(self) -> None:  # noqa: B027 - nothing to check by default (PostgreSQL)
        """Raise StoreError when the store cannot take this commit (SQLite: the file was replaced)."""

    @abstractmethod
    def schema_version(self) -> int:
        ...

    @abstractmethod
    def set_schema_version(self, number: int) -> None:
        ...

    @abstractmethod
    def integrity_check(self) -> str:
        ...

    def stream(self, sql: str, params: Sequence[Any], chunk: int) -> Iterator[list[Any]]:
        """Rows of a (big) query in chunks, without holding all of them at once."""
        cur = self.execute(sql, params)
        while rows := cur.fetchmany(chunk):
            yield rows

    def try_sampling_lock(self, wait: float = 0.0) -> bool:
        return True

    def release_sampling_lock(self) -> None:
        return None

    @abstractmethod
    def close(self) -> None:
        ...


class SqliteBackend(Backend):
    dialect = "sqlite"
    migrations = SQLITE
    not_indexed = " NOT INDEXED"

    def __init__(self, path: Path, busy_timeout: float) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path
        self.describe = str(path)
        # isolation_level=None: no implicit transactions; begin_write issues BEGIN IMMEDIATE.
        self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        self.identity = file_identity(path)

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        return self.conn.executemany(sql, rows).rowcount

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self.conn.execute(sql, params)
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur]

    def path(self, value: str) -> str | bytes:
        """TEXT when valid UTF-8, else the raw bytes as a BLOB.

        File names on Linux are bytes; Python hands undecodable ones over with surrogate escapes, which
        SQLite's TEXT cannot hold. The BLOB keeps them exact (and unique) instead of dropping the file.
        """
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError:
            return os.fsencode(value)

    def first_folder(self, column: str) -> tuple[str, str]:
        return f"substr({column}, 1, instr({column}, '/') - 1)", f"instr({column}, '/') > 0"

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def begin_write(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def verify(self) -> None:
        # SQLite keeps writing into a file that was deleted (or replaced) under it, where every write is
        # lost when the process ends.
        if file_identity(self.file) != self.identity:
            raise StoreError(f"the store {self.describe!r} was removed or replaced while in use; nothing more is "
                             "written to it (start poolwatch again to use a new store)")

    def schema_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def set_schema_version(self, number: int) -> None:
        self.conn.execute(f"PRAGMA user_version = {int(number)}")

    def integrity_check(self) -> str:
        return str(self.conn.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class PostgresBackend(Backend):
    dialect = "postgresql"
    migrations = POSTGRESQL

    def __init__(self, url: str, describe: str, connect_timeout: float) -> None:
        psycopg = _psycopg()
        self.describe = describe
        try:
            self.conn: Any = psycopg.connect(url, autocommit=True, connect_timeout=max(1, int(connect_timeout)))
        except psycopg.Error as exc:
            # psycopg's message names host and port, never the password; still, keep only its first line.
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise StoreError(f"cannot connect to the store {describe}: {first}") from None
        _register_numpy(self.conn)
        self._sql: dict[str, str] = {}
        self._sampling_locked = False
        self.execute("CREATE TABLE IF NOT EXISTS poolwatch_schema (version INTEGER NOT NULL)")

    def _translate(self, sql: str) -> str:
        out = self._sql.get(sql)
        if out is None:
            out = self._sql[sql] = sql.replace("%", "%%").replace("?", "%s")
        return out

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        cur: Cursor = self.conn.execute(self._translate(sql), params)
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        with self.conn.cursor() as cur:
            cur.executemany(self._translate(sql), rows)
            return int(cur.rowcount)

    def query_dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        from psycopg.rows import dict_row

        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(self._translate(sql), params)
            return list(cur.fetchall())

    def path(self, value: str) -> str | bytes:
        return os.fsencode(value)

    def first_folder(self, column: str) -> tuple[str, str]:
        slash = f"position('\\x2f'::bytea in {column})"
        return f"substring({column} from 1 for {slash} - 1)", f"{slash} > 0"

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return bool(self.conn.info.transaction_status != TransactionStatus.IDLE)

    def begin_write(self) -> None:
        self.execute("BEGIN")
        self.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))

    def begin_snapshot(self) -> None:
        self.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def schema_version(self) -> int:
        row = self.execute("SELECT MAX(version) FROM poolwatch_schema").fetchone()
        return int(row[0] or 0)

    def set_schema_version(self, number: int) -> None:
        self.execute("DELETE FROM poolwatch_schema")
        self.execute("INSERT INTO poolwatch_schema (version) VALUES (?)", (int(number),))

    def integrity_check(self) -> str:
        """PostgreSQL checks its pages itself; here: every constraint holds (a failed one names itself)."""
        row = self.execute("SELECT COUNT(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace"
                           " WHERE n.nspname = current_schema() AND NOT c.convalidated").fetchone()
        return "ok" if int(row[0]) == 0 else f"{row[0]} constraints not validated"

    def stream(self, sql: str, params: Sequence[Any], chunk: int) -> Iterator[list[Any]]:
        # A server-side cursor: the server sends `chunk` rows at a time (needs the caller's transaction).
        with self.conn.cursor(name=f"poolwatch_stream_{id(self):x}") as cur:
            cur.itersize = chunk
            cur.execute(self._translate(sql), params)
            while rows := cur.fetchmany(chunk):
                yield rows

    def try_sampling_lock(self, wait: float = 0.0) -> bool:
        """Take the session's sampling lock; with `wait`, the server queues the request for up to that long (an
        event, not a poll: the holder's unlock, commit or lost connection wakes it)."""
        if self._sampling_locked:
            return True
        if wait <= 0:
            self._sampling_locked = bool(self.execute("SELECT pg_try_advisory_lock(?)", (SAMPLING_LOCK,)).fetchone()[0])
            return self._sampling_locked
        psycopg = _psycopg()
        try:
            self.execute(f"SET lock_timeout = {max(1, int(wait * 1000))}")
            self.execute("SELECT pg_advisory_lock(?)", (SAMPLING_LOCK,))
            self._sampling_locked = True
        except psycopg.errors.LockNotAvailable:
            self._sampling_locked = False
        finally:
            self.execute("RESET lock_timeout")
        return self._sampling_locked

    def release_sampling_lock(self) -> None:
        if self._sampling_locked:
            self.execute("SELECT pg_advisory_unlock(?)", (SAMPLING_LOCK,))
            self._sampling_locked = False

    def close(self) -> None:
        self.conn.close()


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError("store.url names PostgreSQL, but psycopg is not installed: pip install 'poolwatch[postgres]'"
                         ) from None
    return psycopg


def _register_numpy(conn: Any) -> None:
    """numpy scalars as parameters, like Python's int and float (SQLite's driver takes them as they are)."""
    from psycopg.types.numeric import FloatDumper, Int8Dumper

    kinds: tuple[type, ...] = (np.int64, np.int32, np.intp)
    for kind in kinds:
        conn.adapters.register_dumper(kind, Int8Dumper)
    kinds = (np.float64, np.float32)
    for kind in kinds:
        conn.adapters.register_dumper(kind, FloatDumper)
