"""Which source an image came from: its input root, or the root's first-level folder (`source.depth=1`,
one folder per camera). Sources name per-source metrics; the daemon caps how many it labels."""

from __future__ import annotations

import os


def source_of(root: str, relpath: str, depth: int = 0) -> str:
    """`root` (depth 0), or `root/<first folder>` (depth 1; a file directly in the root is the root's own source)."""
    if depth >= 1:
        head, sep, _rest = relpath.partition("/")
        if sep:
            return os.path.join(root, head)
    return root
