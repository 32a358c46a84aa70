"""Outputs in lightly's formats: embeddings CSVs, filename lists, and the dataset dump.

Embeddings CSV: `filenames,embedding_0..embedding_{d-1},labels` written with the csv module (names
with commas, quotes or non-ASCII round-trip), readable by `lightly.utils.io.load_embeddings`.
Filenames are relative to their input dir, prefixed with the input dir's name only when several
input dirs are configured. Labels are the index of the file's top-level sub-folder among the sorted
sub-folders of its input dir, as lightly's ImageFolder-based datasets number them (0 at top level).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .atomic import replacing
from .errors import UsageError


class ExportError(UsageError):
    """An embeddings file that cannot be read as lightly's format, or an impossible export."""


@dataclass(frozen=True)
class Naming:
    """How (root, relpath) pairs become the filenames written to outputs, and back."""

    prefixes: dict[str, str]  # root -> "" (single input dir) or "<name>/"

    @classmethod
    def for_roots(cls, roots: Sequence[str]) -> Naming:
        roots = [str(r) for r in roots]
        if len(roots) <= 1:
            return cls({r: "" for r in roots})
        names: dict[str, str] = {}
        used: set[str] = set()
        for i, root in enumerate(roots):
            name = Path(root).name or f"input{i}"
            if name in used:
                name = f"{name}-{i}"
            used.add(name)
            names[root] = name + "/"
        return cls(names)

    def name(self, root: str, relpath: str) -> str:
        return printable(self.prefixes.get(root, "") + relpath)

    def parse(self, filename: str) -> tuple[str, str] | None:
        """The (root, relpath) a filename written by `name` came from; None when no root matches."""
        filename = from_printable(filename)
        for root, prefix in self.prefixes.items():
            if prefix and filename.startswith(prefix):
                return root, filename[len(prefix):]
        plain = [r for r, p in self.prefixes.items() if not p]
        return (plain[0], filename) if plain else None


@dataclass(frozen=True)
class StoreNaming:
    """Output filenames of a store's images, by (node, root, relpath). A store that one node fills keeps
    `Naming`'s names; where more than one node holds images, every name is `<node>/` + the name that node's own
    `Naming` gives (its input dirs: this node's from its configuration, another's as recorded in the store)."""

    own: str
    nodes: dict[str, Naming]

    @property
    def multi(self) -> bool:
        return len(self.nodes) > 1

    def name(self, node: str, root: str, relpath: str) -> str:
        naming = self.nodes.get(node) or self.nodes.get(self.own) or Naming({})
        name = naming.name(root, relpath)
        return f"{printable(node)}/{name}" if self.multi else name

    def parse(self, filename: str) -> tuple[str, str, str] | None:
        """The (node, root, relpath) a filename written by `name` came from; None when none matches."""
        node = self.own
        if self.multi:
            first, sep, rest = filename.partition("/")
            if sep and from_printable(first) in self.nodes:
                node, filename = from_printable(first), rest
            # else a name written before a second node joined (a pool CSV): this node's own
        parsed = self.nodes[node].parse(filename) if node in self.nodes else None
        return (node, *parsed) if parsed is not None else None


def printable(name: str) -> str:
    """A file name as text, reversibly (`from_printable`): undecodable bytes (surrogate-escaped by Python)
    become `\\xNN` and a backslash is doubled, so a file literally named `a\\xff.jpg` stays distinct."""
    text = name.replace("\\", "\\\\")
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")


_ESCAPE = re.compile(r"\\(\\|x[89a-fA-F][0-9a-fA-F])")


def from_printable(text: str) -> str:
    """The file name `printable` wrote (an undecodable byte back to its surrogate escape)."""
    return _ESCAPE.sub(lambda m: "\\" if m.group(1) == "\\" else chr(0xDC00 + int(m.group(1)[1:], 16)), text)


def labels_for(relpaths: Sequence[str], folders: Sequence[str] | None = None) -> list[int]:
    """lightly-style labels: index of the top-level sub-folder among `folders` (default: those of
    `relpaths`), sorted; 0 for files at the top."""
    names = sorted({r.split("/", 1)[0] for r in relpaths if "/" in r} if folders is None else folders)
    index = {f: i for i, f in enumerate(names)}
    return [index[r.split("/", 1)[0]] if "/" in r else 0 for r in relpaths]


def write_embeddings_csv(path: Path, filenames: Sequence[str], vectors: np.ndarray, labels: Sequence[int]) -> None:
    if not (len(filenames) == len(vectors) == len(labels)):
        raise ExportError(f"{path.name}: {len(filenames)} filenames, {len(vectors)} vectors, {len(labels)} labels")
    dim = vectors.shape[1] if vectors.ndim == 2 else 0
    path.parent.mkdir(parents=True, exist_ok=True)
    # errors="backslashreplace": an undecodable byte in a file name is written as \xNN (text files are UTF-8).
    with open(path, "w", newline="", encoding="utf-8", errors="backslashreplace") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filenames", *(f"embedding_{i}" for i in range(dim)), "labels"])
        for name, vec, label in zip(filenames, vectors, labels, strict=True):
            # 9 significant digits round-trip float32 exactly.
            writer.writerow([name, *(format(float(x), ".9g") for x in vec), int(label)])


@dataclass
class EmbeddingsFile:
    filenames: list[str]
    vectors: np.ndarray  # float32
    labels: list[int]
    masked: np.ndarray  # bool
    selected: np.ndarray  # bool


def read_embeddings_csv(path: Path) -> EmbeddingsFile:
    """A lightly embeddings CSV, with its optional `masked` and `selected` columns."""
    from lightly.utils.io import check_embeddings

    try:
        check_embeddings(str(path))
    except (RuntimeError, StopIteration, UnicodeDecodeError) as exc:
        raise ExportError(f"embeddings: {str(path)!r} is not a lightly embeddings CSV ({exc or 'empty file'})") from None
    except OSError as exc:
        raise ExportError(f"embeddings: cannot read {str(path)!r}: {exc.strerror}") from None
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        emb_cols = [i for i, h in enumerate(header) if re.fullmatch(r"embedding_\d+", h)]
        label_col = header.index("labels")
        masked_col = header.index("masked") if "masked" in header else None
        selected_col = header.index("selected") if "selected" in header else None
        filenames, rows, labels, masked, selected = [], [], [], [], []
        for line, row in enumerate(reader, start=2):
            try:
                filenames.append(row[0])
                rows.append([float(row[i]) for i in emb_cols])
                labels.append(int(row[label_col]))
                masked.append(bool(int(row[masked_col]))) if masked_col is not None else masked.append(False)
                selected.append(bool(int(row[selected_col]))) if selected_col is not None else selected.append(False)
            except (ValueError, IndexError) as exc:
                raise ExportError(f"embeddings: {str(path)!r} line {line}: {exc}") from None
    if len(set(filenames)) != len(filenames):
        raise ExportError(f"embeddings: {str(path)!r} names a file twice")
    vectors = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(emb_cols))
    return EmbeddingsFile(filenames, vectors, labels, np.asarray(masked, bool), np.asarray(selected, bool))


def write_lines(path: Path, lines: Iterable[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as fh:
        for line in lines:
            fh.write(line.replace("\n", "\\n") + "\n")


def output_size(size: int | Sequence[int], width: int, height: int) -> tuple[int, int]:
    """-1: keep; x: shortest edge x keeping aspect; [x, y]: exactly x by y."""
    if isinstance(size, int):
        if size == -1:
            return width, height
        scale = size / min(width, height)
        return max(1, round(width * scale)), max(1, round(height * scale))
    return int(size[0]), int(size[1])


def dump_name(relname: str, fmt: str) -> str:
    ext = "jpg" if fmt in ("jpg", "jpeg") else fmt
    base, old = os.path.splitext(relname)
    return f"{base}.{ext}" if old.lower().lstrip(".") != ext else relname


def dump_image(src: Path, dest: Path, *, size: int | Sequence[int], fmt: str, apply_exif: bool = True) -> None:
    """Re-encode one image to `fmt` at `size`, EXIF orientation applied, written atomically."""
    with Image.open(src) as im:
        im.seek(0)
        image = ImageOps.exif_transpose(im) if apply_exif else im.copy()
        image.load()
    w, h = output_size(size, *image.size)
    if (w, h) != image.size:
        image = image.resize((w, h), Image.Resampling.BICUBIC)
    save_format = Image.registered_extensions()["." + fmt]
    if (save_format == "JPEG" and image.mode not in ("RGB", "L")) or image.mode not in ("RGB", "RGBA", "L", "LA", "P"):
        image = image.convert("RGB")
    with replacing(dest) as fh:
        image.save(fh, save_format)
