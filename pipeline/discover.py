"""Finding image files and the one rule that decides whether a file needs work.

Torch-free: the watcher, the reconciler and `poolwatch ingest` all import this, and only the
modules that embed or train load torch.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .check import IMAGE_EXTENSIONS
from .decode import FileRef
from .errors import PoolwatchError
from .store import KnownFile, Store


class InputDirError(PoolwatchError, OSError):
    """An input directory as a whole is missing or unreadable (an outage, never a mass deletion)."""


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_ignored(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def discover(root: Path, ignore_patterns: Sequence[str] = ()) -> Iterator[FileRef]:
    """Every image file under `root`, recursively, in a stable order.

    Symlinked files are followed; symlinked directories are not (no loops, no escaping the root).
    Unreadable sub-directories are skipped (their files keep their state). Raises InputDirError
    when `root` itself is missing or unreadable.
    """
    root = Path(root)
    try:
        if not root.is_dir():
            raise InputDirError(errno.ENOENT, "input directory is missing", str(root))
        os.listdir(root)
    except PermissionError:
        raise InputDirError(errno.EACCES, "input directory is unreadable", str(root)) from None
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(root / rel_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        subdirs = []
        for entry in entries:
            if is_ignored(entry.name, ignore_patterns):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    subdirs.append(rel)
                    continue
                if not is_image_name(entry.name):
                    continue
                st = entry.stat(follow_symlinks=True)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield FileRef(str(root), rel, st.st_size, st.st_mtime_ns)
        stack.extend(reversed(subdirs))


def needs_work(known: KnownFile | None, size: int, mtime_ns: int, has_vector: bool) -> bool:
    """THE rule, for `poolwatch ingest` and the daemon alike: a file needs work when it is new, its size
    or mtime changed, it was `missing`, it is still `pending` (an embedding that failed is retried; the
    ingest step bounds the attempts), or it is `ok` without a vector of the current model."""
    if known is None or (known.size, known.mtime_ns) != (size, mtime_ns):
        return True
    if known.status in ("missing", "pending"):
        return True
    return known.status == "ok" and not has_vector


def known_file(row: Mapping[str, Any] | None) -> KnownFile | None:
    """A store row (`Store.image_by_path`) as the rule's input."""
    if row is None:
        return None
    return KnownFile(int(row["id"]), int(row["size"]), int(row["mtime_ns"]), str(row["status"]))


def plan(store: Store, root: Path, found: Iterable[FileRef], model_id: int | None = None) -> tuple[list[FileRef], list[str]]:
    """(files needing work, relpaths gone from disk) for one input root."""
    known = store.known_files(str(root))
    without_vector = store.ok_without_vector(str(root), model_id) if model_id is not None else set()
    todo: list[FileRef] = []
    seen: set[str] = set()
    for ref in found:
        seen.add(ref.relpath)
        if needs_work(known.get(ref.relpath), ref.size, ref.mtime_ns, ref.relpath not in without_vector):
            todo.append(ref)
    gone = [rel for rel, k in known.items() if rel not in seen and k.status != "missing"]
    return todo, gone
