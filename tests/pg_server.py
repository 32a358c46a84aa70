"""A real PostgreSQL server for the tests: Debian's package, `initdb` in a temp dir, `pg_ctl start` on a Unix
socket only. PostgreSQL refuses to run as root, so as root it runs as the package's `postgres` user.

One server serves the whole test session (tests/conftest.py `postgres_server`); each test gets a database of
its own (`Server.database()`), dropped afterwards.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path


class ServerMissing(RuntimeError):
    """No PostgreSQL server binaries here (scripts/system-deps.sh installs them)."""


def bin_dir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]), reverse=True)
    if found:
        return Path(found[0]).parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise ServerMissing("PostgreSQL server binaries (initdb, pg_ctl) not found; run scripts/system-deps.sh "
                        "(Debian: apt-get install postgresql)")


class Server:
    def __init__(self) -> None:
        self.bin = bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="pwpg"))  # short: a socket path is at most 107 bytes
        self.data = self.dir / "data"
        self.port = 5432 + os.getpid() % 20000
        self.user = "postgres"
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count(1)
        if self._as_postgres:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin / args[0]), *args[1:]]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    def start(self) -> None:
        """initdb (the first time), then start the server and wait until it accepts connections."""
        if not self.data.exists():
            out = self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8", "--no-sync")
            if out.returncode:
                raise RuntimeError(f"initdb failed: {out.stderr.strip()}")
        options = (f"-k {self.dir} -p {self.port} -c listen_addresses='' -c fsync=off -c synchronous_commit=off"
                   " -c full_page_writes=off -c max_connections=300")
        out = self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "server.log"), "-w",
                        "-t", "60", "start", timeout=90)
        if out.returncode:
            log = (self.dir / "server.log").read_text(errors="replace") if (self.dir / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl start failed: {out.stderr.strip()} {log[-2000:]}")

    def halt(self) -> None:
        """Stop the server at once (its clients' connections break), keeping its data for a `start`."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        auth = self.user if password is None else f"{self.user}:{password}"
        return f"postgresql://{auth}@/{database}?host={self.dir}&port={self.port}"

    def sql(self, statement: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]

    def database(self) -> str:
        """A new, empty database; its name."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name}")
        return name

    def drop(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
