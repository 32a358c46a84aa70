"""Ingest: read → hash → verdict → embed → store, one transaction per batch.

A file's identity is (root, relpath, size, mtime_ns); whether it needs work is decided by
`discover.decide` alone. Reading and decoding happen in `decode.read_and_decode` (a torch-free
module, so process-pool workers stay small), overlapped with the model: `start_decoding` submits a
batch, `InFlight.collect` waits for it, so batch k+1 decodes while batch k is embedded — the one
implementation of that overlap, used by `ingest_pass` and the daemon's worker. The model forward
pass and the store write happen in the caller's thread.

`ingest_pass` takes its batches from a source: by default `local_batches` (the decode pool here, the
pass's engine embeds); `made_elsewhere` turns per-file results made by other processes or machines
(`Made`: a verdict and a vector, no pixels) into the same batches, so a pass over a Ray cluster
(daemon/ray_ingest.py) plans, commits, looks near duplicates up and calibrates exactly as a local one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .decode import Decoded, DecodeSettings, FileRef, collect, read_and_decode
from .discover import InputDirError, discover, plan
from .store import ImageRecord, Store, vector_hash

if TYPE_CHECKING:
    from .engine import Engine
    from .near_duplicates import NearDuplicates
    from .quality import Quality

MAX_EMBED_ATTEMPTS = 3  # the model failing on one image this often makes it `corrupt` (reason embed_error)


@dataclass(frozen=True)
class Outcome:
    """One image's verdict in a batch, for per-source counts: ok, near_duplicate, duplicate or corrupt."""

    root: str
    relpath: str
    verdict: str
    quality: Quality | None = None
    novelty: float | None = None  # distance to the datapool (or to the nearest stored image): see near_duplicates


@dataclass
class BatchResult:
    files: int = 0
    ok: int = 0  # near duplicates included: they are `ok` images with a link
    corrupt: int = 0
    duplicate: int = 0
    near_duplicate: int = 0
    vanished: int = 0
    outcomes: list[Outcome] = field(default_factory=list)
    corrupt_reasons: dict[str, int] = field(default_factory=dict)
    embed_failures: dict[int, str] = field(default_factory=dict)  # batch position -> error, images left pending
    decode_seconds: float = 0.0  # waiting for decoded input in the caller's thread
    compute_seconds: float = 0.0  # model forward
    store_seconds: float = 0.0
    near_seconds: float = 0.0  # near-duplicate lookup
    total_seconds: float = 0.0

    @property
    def compute_efficiency(self) -> float:
        """Share of the batch's wall time spent in the model, as lightly's progress bar reports it."""
        return self.compute_seconds / self.total_seconds if self.total_seconds > 0 else 0.0


@dataclass
class InFlight:
    """One batch being decoded (futures of the decode pool, or already decoded without one)."""

    refs: list[FileRef]
    decoding: list[Future[Decoded] | Decoded]

    def collect(self) -> list[Decoded]:
        return [collect(d, r) if isinstance(d, Future) else d for d, r in zip(self.decoding, self.refs, strict=True)]


def start_decoding(refs: Sequence[FileRef], settings: DecodeSettings, executor: Executor | None) -> InFlight:
    decoding: list[Future[Decoded] | Decoded]
    if executor is None:
        decoding = [read_and_decode(r, settings) for r in refs]
    else:
        decoding = [executor.submit(read_and_decode, r, settings) for r in refs]
    return InFlight(list(refs), decoding)


def decode_batches(refs: Sequence[FileRef], settings: DecodeSettings, batch_size: int,
                   executor: Executor | None = None) -> Iterator[list[Decoded]]:
    """Decoded batches in order; the next batch decodes while the caller works on this one."""
    in_flight: InFlight | None = None
    for i in range(0, len(refs), batch_size):
        following = start_decoding(refs[i:i + batch_size], settings, executor)
        if in_flight is not None:
            yield in_flight.collect()
        in_flight = following
    if in_flight is not None:
        yield in_flight.collect()


# Vectors made elsewhere: given batch positions, (vectors by position, error text by position), as embed_resilient.
Embedded = Callable[[list[int]], tuple[dict[int, np.ndarray], dict[int, str]]]


def commit_batch(store: Store, embedder: Engine | None, model_id: int, decoded: Sequence[Decoded],
                 remove_duplicates: bool = True, clock: Callable[[], float] = time.perf_counter,
                 near: NearDuplicates | None = None, embedded: Embedded | None = None) -> BatchResult:
    """Embed the batch's good images (skipping content duplicates), look their near duplicates up (`near`), and
    record all of it in ONE transaction; then hand the new vectors to `near`'s index.

    `embedded` replaces the embedder where the vectors were made elsewhere (Ray actors, which send no pixels):
    given the batch positions to embed, it returns what `embed_resilient` would (vectors, errors) for them."""
    result = BatchResult(files=len(decoded))
    batch_hashes: dict[str, int] = {}  # hash -> position of its first ok image in this batch
    dup_of_pos: dict[int, int | str] = {}  # position -> image id (store) or "pos:<i>" (batch)
    rows: dict[int, dict[str, Any] | None] = {}  # position -> the file's row before this batch
    to_embed: list[int] = []
    for pos, d in enumerate(decoded):
        if d.verdict is None or not d.verdict.ok:
            continue
        rows[pos] = row = store.image_by_path(d.ref.root, d.ref.relpath)
        if remove_duplicates and d.hash is not None:
            original = store.first_ok_with_hash(d.hash, exclude_id=int(row["id"]) if row else None)
            if original is not None:
                dup_of_pos[pos] = original
                continue
            if d.hash in batch_hashes:
                dup_of_pos[pos] = f"pos:{batch_hashes[d.hash]}"
                continue
            batch_hashes[d.hash] = pos
        to_embed.append(pos)

    t0 = clock()
    if embedded is not None:
        vector_of, failed = embedded(to_embed)
    elif embedder is not None:
        vector_of, failed = embed_resilient(embedder, {p: px for p in to_embed if (px := decoded[p].pixels) is not None})
    else:
        raise ValueError("commit_batch needs an embedder or the vectors made elsewhere")
    result.compute_seconds = clock() - t0
    result.embed_failures = failed

    # Images seen before with the same bytes (re-embedded for a new model) keep their links; the others are looked up.
    def same_content(pos: int) -> bool:
        row = rows.get(pos)
        return row is not None and row["status"] == "ok" and row["hash"] == decoded[pos].hash

    lookup = near.lookup(store, {p: v for p, v in vector_of.items() if not same_content(p)},
                         {p: int(r["id"]) for p, r in rows.items() if r is not None}) if near is not None else None
    result.near_seconds = lookup.seconds if lookup is not None else 0.0

    t1 = clock()
    committed: list[tuple[int, np.ndarray]] = []
    with store.transaction():
        ids: dict[int, int] = {}
        ok_id: dict[int, int] = {}  # position -> the ok image that stands for it (itself, or its exact original)
        batch_vhash: dict[str, int] = {}

        def duplicate(pos: int, base: ImageRecord, outcome: Outcome, original: int, reason: str) -> None:
            what = "bytes" if reason == "same_content" else "embedding"
            ids[pos] = store.upsert_image(replace(base, status="duplicate", reason=reason,
                                                  detail=f"identical {what} to image {original}", duplicate_of=original))
            ok_id[pos] = original
            result.duplicate += 1
            result.outcomes.append(replace(outcome, verdict="duplicate"))
        for pos, d in enumerate(decoded):
            v = d.verdict
            if v is None:
                result.vanished += store.mark_missing(d.ref.root, [d.ref.relpath])
                continue
            base = ImageRecord(root=d.ref.root, relpath=d.ref.relpath, size=d.ref.size, mtime_ns=d.ref.mtime_ns,
                               hash=d.hash, status="ok", width=v.width, height=v.height, format=v.format,
                               quality=d.quality.as_dict() if d.quality is not None else None)
            outcome = Outcome(d.ref.root, d.ref.relpath, "corrupt", d.quality)
            if not v.ok:
                ids[pos] = store.upsert_image(replace(base, status="corrupt", reason=v.reason, detail=v.detail))
                result.corrupt += 1
                result.corrupt_reasons[v.reason or "unknown"] = result.corrupt_reasons.get(v.reason or "unknown", 0) + 1
                result.outcomes.append(outcome)
                continue
            if pos in dup_of_pos:
                target = dup_of_pos[pos]
                original = ids[int(target[4:])] if isinstance(target, str) else target
                duplicate(pos, base, outcome, original, "same_content")
                continue
            if pos not in vector_of:
                row = rows.get(pos)
                if row is not None and row["status"] == "ok" and row["hash"] == d.hash:
                    # Re-embedding for a new model failed: the image keeps its state and its older
                    # vectors (which sampling may still use); the next scan tries again.
                    ids[pos] = int(row["id"])
                    continue
                # The model failed on this image: it stays pending (the next scan retries it). Only a
                # failure of this image alone counts (others in the same call were embedded): a model that
                # fails on everything (a lost GPU, out of memory) must not use up every image's attempts.
                # After MAX_EMBED_ATTEMPTS it is corrupt, so nothing is retried for ever.
                attempts = _failed_attempts(row, d.ref) + (1 if vector_of else 0)
                status = "pending" if attempts < MAX_EMBED_ATTEMPTS else "corrupt"
                ids[pos] = store.upsert_image(replace(base, status=status, reason="embed_error", attempts=attempts,
                                                      detail=f"attempt {attempts}: {failed[pos]}"[:500]))
                if status == "corrupt":
                    result.corrupt += 1
                    result.corrupt_reasons["embed_error"] = result.corrupt_reasons.get("embed_error", 0) + 1
                    result.outcomes.append(outcome)
                continue
            if remove_duplicates and d.hash is not None:
                # Another node of a shared store may have committed the same bytes since the check above.
                raced = store.first_ok_with_hash(d.hash, exclude_id=_row_id(rows.get(pos)))
                if raced is not None:
                    duplicate(pos, base, outcome, raced, "same_content")
                    continue
            vec = vector_of[pos]
            if remove_duplicates:
                vh = vector_hash(vec)
                original_v = batch_vhash.get(vh)
                if original_v is None:
                    original_v = store.first_ok_with_vector(model_id, vh, exclude_id=_row_id(rows.get(pos)))
                if original_v is not None:
                    duplicate(pos, base, outcome, original_v, "same_embedding")
                    continue
            record, verdict = base, "ok"
            if same_content(pos):
                row = rows[pos]
                assert row is not None
                record = replace(base, near_duplicate_of=row["near_duplicate_of"], near_distance=row["near_distance"],
                                 near_model_id=row["near_model_id"])
            elif lookup is not None and pos in lookup.links:
                link = lookup.links[pos]
                of = ok_id.get(int(link.target[4:])) if isinstance(link.target, str) else link.target
                if of is not None:
                    record = replace(base, near_duplicate_of=of, near_distance=link.distance, near_model_id=model_id)
                    verdict = "near_duplicate"
            image_id = store.upsert_image(record)
            ids[pos] = ok_id[pos] = image_id
            store.put_embedding(image_id, model_id, vec)
            committed.append((image_id, vec))
            if remove_duplicates:
                batch_vhash[vector_hash(vec)] = image_id
            result.ok += 1
            result.near_duplicate += verdict == "near_duplicate"
            novelty = lookup.novelty.get(pos) if lookup is not None else None
            result.outcomes.append(replace(outcome, verdict=verdict, novelty=novelty))
    result.store_seconds = clock() - t1
    if near is not None:
        near.committed([i for i, _v in committed], [v for _i, v in committed])
    return result


def embed_resilient(embedder: Engine, pixels: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Embed a batch; if the model fails (out of memory, a bad input), retry in halves down to single
    images. Returns (vectors by key, error text by key for the images that failed alone)."""
    vectors: dict[int, np.ndarray] = {}
    failed: dict[int, str] = {}
    pending = [list(pixels)]
    while pending:
        keys = pending.pop()
        if not keys:
            continue
        try:
            out = embedder.embed(np.stack([pixels[k] for k in keys]))
        except Exception as exc:  # any model failure: narrow it down
            if len(keys) == 1:
                failed[keys[0]] = f"{type(exc).__name__}: {exc}"
            else:
                half = len(keys) // 2
                pending += [keys[half:], keys[:half]]
            continue
        vectors.update(zip(keys, out, strict=True))
    return vectors, failed


def _failed_attempts(row: dict[str, Any] | None, ref: FileRef) -> int:
    """Earlier failed embeddings of this very file (same size and mtime); a changed file starts again."""
    if row is None or row["status"] != "pending" or (row["size"], row["mtime_ns"]) != (ref.size, ref.mtime_ns):
        return 0
    return int(row["attempts"] or 0)


def _row_id(row: dict[str, Any] | None) -> int | None:
    return int(row["id"]) if row else None


@dataclass
class SourcedBatch:
    """One batch of a pass, in plan order, as its source hands it over: decoded files (with pixels for the pass's
    engine to embed, or without them and with `embedded`, the vectors made elsewhere)."""

    decoded: list[Decoded]
    embedded: Embedded | None = None
    forward_passes: int = 0  # model calls made elsewhere for this batch
    compute_seconds: float | None = None  # model time spent elsewhere on it (None: the pass's engine, timed here)


# Where a pass's batches come from: (files to process in plan order, batch size) -> batches of that size, in order.
BatchSource = Callable[[Sequence[FileRef], int], Iterator[SourcedBatch]]


def local_batches(settings: DecodeSettings, executor: Executor | None = None) -> BatchSource:
    """Decoded here (in `executor`'s processes), overlapped with the pass's engine: `decode_batches`."""
    def source(todo: Sequence[FileRef], batch_size: int) -> Iterator[SourcedBatch]:
        for decoded in decode_batches(todo, settings, batch_size, executor):
            yield SourcedBatch(decoded)
    return source


@dataclass
class Made:
    """One file as a worker elsewhere turned it into a verdict and, for a good image, a vector: what
    `read_and_decode` and `embed_resilient` give, without the pixels (they never travel)."""

    decoded: Decoded  # pixels None
    vector: np.ndarray | None = None
    error: str | None = None  # the model failed on this image alone
    model_seconds: float = 0.0  # its share of the worker's model time
    forward_passes: int = 0  # the worker's model calls, counted on the first file of what it embedded together


def made_elsewhere(made: Iterable[Made], batch_size: int, workers: int = 1) -> Iterator[SourcedBatch]:
    """Per-file results in plan order -> the batches a local pass makes of the same files (same boundaries, so
    commits, near-duplicate lookups and the calibration happen at the same points). `compute_seconds` is the
    workers' model time over `workers`: the pass's compute efficiency is then the share of the workers' time
    spent in the model."""
    batch: list[Made] = []
    for m in made:
        batch.append(m)
        if len(batch) == batch_size:
            yield _sourced(batch, workers)
            batch = []
    if batch:
        yield _sourced(batch, workers)


def _sourced(batch: list[Made], workers: int) -> SourcedBatch:
    def embedded(positions: list[int]) -> tuple[dict[int, np.ndarray], dict[int, str]]:
        vectors = {p: v for p in positions if (v := batch[p].vector) is not None}
        failed = {p: e for p in positions if (e := batch[p].error) is not None}
        return vectors, failed
    return SourcedBatch([m.decoded for m in batch], embedded, sum(m.forward_passes for m in batch),
                        sum(m.model_seconds for m in batch) / max(1, workers))


@dataclass
class PassSummary:
    """What one ingest pass over the input dirs did."""

    discovered: int = 0
    processed: int = 0
    ok: int = 0
    corrupt: int = 0
    duplicate: int = 0
    near_duplicate: int = 0  # of the ok ones
    missing: int = 0
    revived: int = 0  # missing images back unchanged: ok again without a read
    outages: list[str] = field(default_factory=list)
    forward_passes: int = 0
    seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def compute_efficiency(self) -> float:
        return self.compute_seconds / self.seconds if self.seconds > 0 else 0.0


def planned_work(store: Store, roots: Sequence[Path], ignore_patterns: Sequence[str] = (),
                 model_id: int | None = None) -> list[FileRef]:
    """The files a pass over `roots` would read (the same rule as `ingest_pass`), without changing anything."""
    todo: list[FileRef] = []
    for root in roots:
        try:
            found = list(discover(root, ignore_patterns))
        except InputDirError:
            continue
        work, _gone, back = plan(store, root, found, -1 if model_id is None else model_id)
        todo.extend(work)
        todo.extend(back)
    return todo


def activate_model(store: Store, embedder: Engine) -> int:
    """Register the engine's model (weights and mode: see engine.Mode) in the store, make it current, return its id."""
    m = embedder.info
    arch = {**m.arch, **embedder.mode.arch()}
    model_id = store.register_model(weights_hash=embedder.identity, input_size=m.input_size, source=m.source,
                                    detail=m.detail, arch=arch, dim=m.dim, path=m.path)
    current = store.current_model()
    if current is None or current.id != model_id:
        store.set_current_model(model_id)
    return model_id


def ingest_pass(store: Store, embedder: Engine, model_id: int, roots: Sequence[Path], settings: DecodeSettings,
                batch_size: int, *, executor: Executor | None = None, remove_duplicates: bool = True,
                ignore_patterns: Sequence[str] = (), on_plan: Callable[[int], None] | None = None,
                on_batch: Callable[[BatchResult], None] | None = None,
                clock: Callable[[], float] = time.perf_counter, near: NearDuplicates | None = None,
                source: BatchSource | None = None) -> PassSummary:
    """One pass over the input roots: discover, plan, process in batches, mark vanished files missing.

    A root that is missing or unreadable as a whole is an outage (listed in the summary); its
    images keep their state. The batches come from `source` (default: `local_batches(settings, executor)`);
    `embedder` registers the model, calibrates the near-duplicate threshold, and embeds what the source
    hands over with pixels.
    """
    start = clock()
    summary = PassSummary()
    forward_before = embedder.forward_passes
    todo: list[FileRef] = []
    for root in roots:
        try:
            found = list(discover(root, ignore_patterns))
        except InputDirError as exc:
            summary.outages.append(f"{root}: {exc.strerror}")
            continue
        summary.discovered += len(found)
        work, gone, back = plan(store, root, found, model_id)
        todo.extend(work)
        if gone or back:
            with store.transaction():
                summary.missing += store.mark_missing(str(root), gone)
                revived = set(store.revive(str(root), [r.relpath for r in back], model_id))
            summary.revived += len(revived)
            todo.extend(r for r in back if r.relpath not in revived)  # their bytes are ok elsewhere now
    if on_plan is not None:
        on_plan(len(todo))
    batches = (source or local_batches(settings, executor))(todo, batch_size)
    forward_elsewhere = 0
    last = clock()
    for batch in batches:
        waited = clock() - last
        result = commit_batch(store, embedder, model_id, batch.decoded, remove_duplicates, clock, near,
                              embedded=batch.embedded)
        if near is not None:  # this batch may be the one that makes the store large enough to calibrate on
            near.ensure_calibrated(store, embedder, settings)
        if batch.compute_seconds is not None:
            result.compute_seconds = batch.compute_seconds
        forward_elsewhere += batch.forward_passes
        result.decode_seconds = waited
        now = clock()
        result.total_seconds = now - last
        last = now
        summary.processed += result.files
        summary.ok += result.ok
        summary.corrupt += result.corrupt
        summary.duplicate += result.duplicate
        summary.near_duplicate += result.near_duplicate
        summary.missing += result.vanished
        summary.compute_seconds += result.compute_seconds
        if on_batch is not None:
            on_batch(result)
    summary.forward_passes = embedder.forward_passes - forward_before + forward_elsewhere
    summary.seconds = clock() - start
    return summary
