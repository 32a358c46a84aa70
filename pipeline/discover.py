"""Finding image files and the one rule that decides whether a file needs work.

Torch-free: the watcher, the reconciler and `poolwatch ingest` all import this, and only the
modules that embed or train load torch.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Literal

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
        if root.exists() and not root.is_dir():
            raise InputDirError(errno.ENOTDIR, "input directory is not a directory (a file?)", str(root))
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


Decision = Literal["skip", "revive", "work"]


def decide(known: KnownFile | None, size: int, mtime_ns: int) -> Decision:
    """THE rule, for `poolwatch ingest` and the daemon alike (identity = root, relpath, size, mtime_ns;
    `known.has_vector` is about the current model):
    - work: the file is new or its size or mtime changed; it is still `pending` (an embedding that failed
      is retried; the ingest step bounds the attempts); it is `missing` without a vector of the current
      model; or it is `ok` without one (a model change);
    - revive: it was `missing` and is back unchanged with its vector: `ok` again without being read
      (`Store.revive`; a file whose bytes another `ok` image now holds is read after all);
    - skip: nothing changed."""
    if known is None or (known.size, known.mtime_ns) != (size, mtime_ns):
        return "work"
    if known.status == "missing":
        return "revive" if known.has_vector else "work"
    if known.status == "pending" or (known.status == "ok" and not known.has_vector):
        return "work"
    return "skip"


def plan(store: Store, root: Path, found: Iterable[FileRef],
         model_id: int) -> tuple[list[FileRef], list[str], list[FileRef]]:
    """(files needing work, relpaths gone from disk, missing files back unchanged) for one input root."""
    known = store.known_files(str(root), model_id)
    todo: list[FileRef] = []
    revive: list[FileRef] = []
    seen: set[str] = set()
    for ref in found:
        seen.add(ref.relpath)
        decision = decide(known.get(ref.relpath), ref.size, ref.mtime_ns)
        if decision == "work":
            todo.append(ref)
        elif decision == "revive":
            revive.append(ref)
    gone = [rel for rel, k in known.items() if rel not in seen and k.status != "missing"]
    return todo, gone, revive
