"""Atomic file writes, the one implementation: a temp file beside the target, renamed onto it when the
write succeeded, removed when it failed (a full disk must not leave a large temp file that makes the
retry fail too). The target is either the old file or the complete new one, never a part."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def replacing_path(dest: Path) -> Iterator[Path]:
    """A temp path beside `dest` for writers that want a path; renamed onto `dest` after the block."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = dest.with_name(f".{dest.name}-{secrets.token_hex(4)}")
        try:
            # Like mkstemp, but with the mode the umask gives any new file (mkstemp's is 0600): a
            # report or a dumped image must stay readable as before.
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def replacing(dest: Path, mode: str = "wb", *, durable: bool = False, **open_args: Any) -> Iterator[IO[Any]]:
    """An open temp file beside `dest`; `durable` fsyncs it before the rename."""
    with replacing_path(dest) as tmp, open(tmp, mode, **open_args) as fh:
        yield fh
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
