"""One sampling run: candidates → coreset (or random) against the datapool → outputs, atomically.

Candidates are the `ok` images with a vector of the model in use that are not in the pool and,
for a named pool, were not decided by an earlier successful run of that pool
(`datapool.process_all` reconsiders every non-pool image). A run without a pool name is
standalone: every `ok` image is a candidate and no pool is read or written.

Atomicity: the run's outputs are written to `runs/.tmp-<name>/`; then decisions, the pool update
and the run's outcome commit in ONE transaction; then the folder is renamed into place. A run that
dies before the commit leaves nothing (its temp folder is removed by the next run); one that dies
between commit and rename is completed by the next run's recovery.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import astuple, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import replacing_path
from .config import Config
from .coreset import SamplingError, kcenter, random_sample, resolve_n_samples
from .export import (
    ExportError,
    Naming,
    StoreNaming,
    dump_image,
    dump_name,
    labels_for,
    read_embeddings_csv,
    write_embeddings_csv,
    write_lines,
)
from .store import CandidateFilter, ImageRecord, Location, Store

TMP_PREFIX = ".tmp-"
IMPORTED_ROOT_PREFIX = "embeddings:"


@dataclass
class RunResult:
    run_id: int
    output_dir: Path
    n_candidates: int
    n_selected: int
    stop_reason: str
    pool_before: int
    pool_after: int
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)


def validate_sampling(config: Config) -> None:
    """Raise SamplingError (a usage error) for stopping conditions that make no sense."""
    if config.method == "random":
        if config.min_distance is not None:
            raise SamplingError("stopping_condition.min_distance: coreset-only condition; with method=random set "
                                "stopping_condition.n_samples instead (or use method=coreset)")
        if config.n_samples is None:
            raise SamplingError("stopping_condition.n_samples: required with method=random (a count, or a fraction in (0, 1])")
    elif config.n_samples is None and config.min_distance is None:
        raise SamplingError("stopping_condition: set n_samples (count or fraction) and/or min_distance; "
                            "with neither, every candidate would be selected")


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1.0).astype(np.float32)


def candidate_filter(config: Config) -> CandidateFilter:
    """What the configuration keeps out of the candidates: near copies (near_duplicate.exclude_from_candidates,
    unless the check is off) and the flags in quality.exclude (unless that flag is off)."""
    rules = config.quality.rules()
    return CandidateFilter(
        near_duplicates=config.near_duplicate.exclude_from_candidates and config.near_duplicate.threshold != -1,
        quality=tuple(rules[flag] for flag in config.quality.exclude if flag in rules),
    )


def run_folder_name(runs_dir: Path, now: datetime) -> str:
    base = now.strftime("%Y-%m-%d_%H-%M-%S")
    name, n = base, 0
    while (runs_dir / name).exists() or (runs_dir / f"{TMP_PREFIX}{name}").exists():
        n += 1
        name = f"{base}-{n}"
    return name


def recover(store: Store, shared: Path) -> list[str]:
    """Finish or clean up after a run that died: returns what was done, for the caller to log."""
    done: list[str] = []
    runs_dir = shared / "runs"
    committed = {Path(r["output_dir"]).name: r["id"] for r in store.runs(limit=50)
                 if r["status"] == "ok" and r["output_dir"] and r.get("node") in (store.node, None)}
    if runs_dir.is_dir():
        for tmp in runs_dir.glob(f"{TMP_PREFIX}*"):
            name = tmp.name[len(TMP_PREFIX):]
            if name in committed and not (runs_dir / name).exists():
                os.replace(tmp, runs_dir / name)
                _link_latest(runs_dir, name)
                done.append(f"completed the output folder of run {committed[name]} ({name})")
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                done.append(f"removed the partial output folder {tmp.name}")
        for stray in runs_dir.glob(".latest-*"):
            stray.unlink(missing_ok=True)
        for name in committed:
            # A process killed while writing a report leaves its temp file (.report.pdf-1a2b3c4d).
            for stray in (runs_dir / name).glob(".report*"):
                stray.unlink(missing_ok=True)
                done.append(f"removed the partial report file {name}/{stray.name}")
    for run_id in store.interrupted_runs():
        store.fail_run(run_id, "interrupted: the process stopped during the run", status="interrupted")
        done.append(f"marked run {run_id} as interrupted")
    return done


def runs_without_report(store: Store, recent: int = 50) -> list[int]:
    """Successful runs (of the last `recent`) whose folder exists but lacks report.pdf or report.json: the
    process stopped between the run's commit and the end of its report."""
    missing = []
    for r in store.runs(limit=recent):
        own = r.get("node") in (store.node, None)  # another node's run folder is on that node
        folder = Path(r["output_dir"]) if own and r["status"] == "ok" and r["output_dir"] else None
        if folder is not None and folder.is_dir() and not all((folder / f).is_file() for f in ("report.pdf", "report.json")):
            missing.append(int(r["id"]))
    return sorted(missing)


def _link_latest(runs_dir: Path, name: str) -> None:
    tmp = runs_dir / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(name, tmp)
    os.replace(tmp, runs_dir / "latest")


def import_embeddings(store: Store, path: Path) -> tuple[int, list[int]]:
    """Load a lightly CSV into the store as its own model; returns (model id, pre-selected image ids).

    Rows marked `masked` are left out; rows marked `selected` are pre-selected (fixed centres).
    """
    data = read_embeddings_csv(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    model_id = store.register_model(weights_hash=f"csv:{digest}", input_size=0, source="imported", detail=str(path),
                                    arch={"name": "imported"}, dim=int(data.vectors.shape[1]), path=str(path))
    root = f"{IMPORTED_ROOT_PREFIX}{path}"
    preselected: list[int] = []
    keep = set()
    with store.transaction():
        for name, vec, masked, selected in zip(data.filenames, data.vectors, data.masked, data.selected, strict=True):
            if masked:
                continue
            keep.add(name)
            image_id = store.upsert_image(ImageRecord(root=root, relpath=name, size=0, mtime_ns=0, hash=None, status="ok"))
            store.put_embedding(image_id, model_id, vec)
            if selected:
                preselected.append(image_id)
        store.mark_missing(root, [rel for rel in store.known_files(root) if rel not in keep])
    return model_id, preselected


def sample_run(store: Store, config: Config, *, trigger: str, now: datetime | None = None,
               model_id: int | None = None, preselected: list[int] | None = None,
               extra_stats: dict[str, Any] | None = None) -> RunResult:
    """Perform one sampling run (see the module docstring). Raises SamplingError for usage errors."""
    validate_sampling(config)
    started = time.perf_counter()
    stages: dict[str, float] = {}
    shared = config.shared_path
    runs_dir = shared / "runs"
    if model_id is None:
        model = store.sampling_model()
        if model is None:
            raise SamplingError("no model and no embeddings yet: run `poolwatch ingest` first, or give embeddings=FILE")
        model_id = model.id
    pool = config.datapool.name or None
    run_id = store.begin_run(trigger=trigger, config_json=config.to_json(), method=config.method, pool=pool, model_id=model_id,
                             dump=config.dump_dataset)
    tmp: Path | None = None
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        name = run_folder_name(runs_dir, now or datetime.now())
        tmp = runs_dir / f"{TMP_PREFIX}{name}"
        t = time.perf_counter()
        pool_ids = store.pool_members(pool) if pool else []
        fixed_ids = sorted(set(pool_ids) | set(preselected or []))
        cand_ids_arr, cand = store.candidate_vectors(model_id, pool, config.datapool.process_all, candidate_filter(config))
        if preselected:
            keep = ~np.isin(cand_ids_arr, np.asarray(fixed_ids, dtype=np.int64))
            cand_ids_arr, cand = cand_ids_arr[keep], cand[keep]
        fixed_ids_arr, fixed = store.vectors(model_id, fixed_ids, ok_only=False)
        if config.normalize_embeddings:
            cand, fixed = normalize(cand), normalize(fixed)
        stages["load"] = time.perf_counter() - t

        t = time.perf_counter()
        n = resolve_n_samples(config.stopping_condition.n_samples, len(cand))
        if config.method == "random":
            selection = random_sample(len(cand), n_samples=n or 0, seed=config.seed)
        else:
            selection = kcenter(cand, fixed if len(fixed) else None, n_samples=n, min_distance=config.min_distance,
                                seed=config.seed, device=config.device)
        stages["select"] = time.perf_counter() - t

        t = time.perf_counter()
        picked = cand_ids_arr[selection.indices]
        picked_set = set(int(i) for i in picked)
        removed = [int(i) for i in cand_ids_arr if int(i) not in picked_set]
        _write_outputs(store, config, tmp, cand_ids_arr, cand, picked, selection.indices, fixed_ids_arr, fixed, removed)
        stages["outputs"] = time.perf_counter() - t

        dumped = 0
        if config.dump_dataset:
            t = time.perf_counter()
            dest = tmp / "sampled" if config.dump_path is None else dump_folder(config, name)
            dumped = _dump(store, config, dest, [int(i) for i in picked])
            stages["dump"] = time.perf_counter() - t

        decisions = [
            (int(image_id), True, rank, None if not np.isfinite(dist) else float(dist))
            for rank, (image_id, dist) in enumerate(zip(picked, selection.distances, strict=True))
        ] + [(image_id, False, None, None) for image_id in removed]
        stats = {**(extra_stats or {}), "stages": stages, "pool_before": len(pool_ids), "preselected": len(preselected or []),
                 "normalized": config.normalize_embeddings, "dim": int(cand.shape[1]) if cand.ndim == 2 else 0}
        store.finish_run(run_id, n_candidates=len(cand_ids_arr), n_selected=len(picked), stop_reason=selection.stop_reason,
                         output_dir=str(runs_dir / name), stats=stats, decisions=decisions, pool=pool,
                         pool_add=[int(i) for i in picked])
    except BaseException as exc:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        store.fail_run(run_id, f"{type(exc).__name__}: {exc}")
        raise
    os.replace(tmp, runs_dir / name)
    _link_latest(runs_dir, name)
    if config.dump_dataset:  # this node's part; the other nodes write theirs when they see the run (dump_pending)
        store.record_dump(run_id, status="ok", n_files=dumped, output_dir=str(dump_folder(config, name)))
    pool_after = len(pool_ids)
    if pool:
        pool_after = write_pool_files(store, config, pool, model_id, history_name=name)
        if config.dump_dataset:
            _dump(store, config, shared / pool / "dataset", store.pool_members(pool), skip_existing=True)
    return RunResult(run_id, runs_dir / name, len(cand_ids_arr), len(picked), selection.stop_reason, len(pool_ids),
                     pool_after, time.perf_counter() - started, stages)


def store_naming(store: Store, config: Config) -> StoreNaming:
    """How the store's images are named in outputs (export.StoreNaming): this node's input dirs from its
    configuration, every other node's as the store records them."""
    nodes = {node: Naming.for_roots([r for r in roots if not r.startswith(IMPORTED_ROOT_PREFIX)])
             for node, roots in store.node_roots().items()}
    nodes[store.node] = Naming.for_roots([str(p) for p in config.input_paths])
    return StoreNaming(store.node, nodes)


def output_names(store: Store, config: Config, ids: np.ndarray | list[int],
                 naming: StoreNaming | None = None) -> tuple[list[str], list[int]]:
    """Output filenames and lightly labels of these images, in order."""
    naming = naming or store_naming(store, config)
    where = store.locations(ids)
    names, labels = [], []
    by_root: dict[tuple[str, str], list[str]] = {}
    for i in ids:
        loc = where[int(i)]
        by_root.setdefault((loc.node, loc.root), []).append(loc.relpath)
    label_of = {}
    for (node, root), rels in by_root.items():
        for rel, label in zip(rels, labels_for(rels, store.top_folders(root, node)), strict=True):
            label_of[(node, root, rel)] = label
    for i in ids:
        loc = where[int(i)]
        imported = loc.root.startswith(IMPORTED_ROOT_PREFIX)
        names.append(loc.relpath if imported else naming.name(loc.node, loc.root, loc.relpath))
        labels.append(label_of[(loc.node, loc.root, loc.relpath)])
    return names, labels


def _listed(config: Config, store: Store, row: dict[str, Any]) -> bool:
    """Whether a corrupt or duplicate image belongs in a run's lists: this node's under its input dirs, and
    every other node's (their input dirs are their own configuration's)."""
    return row["node"] != store.node or row["root"] in {str(p) for p in config.input_paths}


def _write_outputs(store: Store, config: Config, out: Path, cand_ids: np.ndarray, cand: np.ndarray,
                   picked: np.ndarray, picked_idx: np.ndarray, fixed_ids: np.ndarray, fixed: np.ndarray,
                   removed: list[int]) -> None:
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "config" / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    naming = store_naming(store, config)
    names, labels = output_names(store, config, cand_ids, naming)
    write_embeddings_csv(out / "data" / "embeddings.csv", names, cand, labels)
    sel_names = [names[i] for i in picked_idx]
    sel_labels = [labels[i] for i in picked_idx]
    write_embeddings_csv(out / "data" / "selected_embeddings.csv", sel_names, cand[picked_idx], sel_labels)
    if len(fixed_ids):
        fixed_names, fixed_labels = output_names(store, config, fixed_ids, naming)
        write_embeddings_csv(out / "data" / "selected_embeddings_including_datapool.csv", fixed_names + sel_names,
                             np.concatenate([fixed, cand[picked_idx]]), fixed_labels + sel_labels)
    write_lines(out / "filenames" / "sampled_filenames.txt", sel_names)
    where = store.locations(int(i) for i in picked)
    by_node: dict[str, list[str]] = {}
    for image_id, name in zip(picked, sel_names, strict=True):
        by_node.setdefault(where[int(image_id)].node, []).append(name)
    (out / "filenames" / "sampled_by_node.json").write_text(json.dumps(by_node, indent=1, ensure_ascii=False),
                                                           encoding="utf-8", errors="backslashreplace")
    removed_names, _ = output_names(store, config, removed, naming)
    write_lines(out / "filenames" / "removed_filenames.txt", removed_names)
    corrupt = [r for r in store.images("corrupt") if _listed(config, store, r)]
    duplicates = [r for r in store.images("duplicate") if _listed(config, store, r)]

    def named(row: dict[str, Any]) -> str:
        return naming.name(row["node"], row["root"], row["relpath"])

    write_lines(out / "filenames" / "corrupt_filenames.txt", (named(r) for r in corrupt))
    reasons = {named(r): {"reason": r["reason"], "detail": r["detail"]} for r in corrupt}
    (out / "filenames" / "corrupt_filenames.json").write_text(json.dumps(reasons, indent=1, ensure_ascii=False),
                                                             encoding="utf-8", errors="backslashreplace")
    originals = store.locations(r["duplicate_of"] for r in duplicates if r["duplicate_of"])
    write_lines(out / "filenames" / "duplicate_filenames.txt", (named(r) for r in duplicates))
    dup_map = {named(r): naming.name(*astuple(originals[r["duplicate_of"]]))
               for r in duplicates if r["duplicate_of"] in originals}
    (out / "filenames" / "duplicate_filenames.json").write_text(json.dumps(dup_map, indent=1, ensure_ascii=False),
                                                               encoding="utf-8", errors="backslashreplace")
    roots = {str(p) for p in config.input_paths}
    near = near_duplicate_groups(store, naming, lambda loc: loc.node != store.node or loc.root in roots)
    write_lines(out / "filenames" / "near_duplicate_filenames.txt", (d["path"] for g in near for d in g["duplicates"]))
    near_map = {d["path"]: {"original": g["original"], "distance": d["distance"]} for g in near for d in g["duplicates"]}
    (out / "filenames" / "near_duplicate_filenames.json").write_text(json.dumps(near_map, indent=1, ensure_ascii=False),
                                                                    encoding="utf-8", errors="backslashreplace")


def near_duplicate_groups(store: Store, naming: StoreNaming,
                          listed: Callable[[Location], bool] | None = None) -> list[dict[str, Any]]:
    """The store's near-duplicate groups as `poolwatch near-duplicates --json` lists them: [{"original": name,
    "duplicates": [{"path": name, "distance": d}, ...]}, ...], names as in the run's outputs; only images
    `listed` accepts when given."""
    groups = store.near_duplicate_groups()
    where = store.locations({i for original, copies in groups for i in (original, *(c for c, _d in copies))})
    out = []
    for original, copies in groups:
        if listed is not None and not listed(where[original]):
            continue
        dups = [{"path": naming.name(*astuple(where[c])), "distance": d} for c, d in copies
                if listed is None or listed(where[c])]
        if dups:
            out.append({"original": naming.name(*astuple(where[original])), "duplicates": dups})
    return out


def write_pool_files(store: Store, config: Config, pool: str, model_id: int, history_name: str | None) -> int:
    """`<shared>/<pool>/datapool_latest.csv` and, with keep_history, `history/datapool_<run>.csv`."""
    pool_dir = config.shared_path / pool
    with replacing_path(pool_dir / "datapool_latest.csv") as tmp:
        size = write_pool_csv(store, config, pool, model_id, tmp)
        if config.datapool.keep_history and history_name:
            with replacing_path(pool_dir / "history" / f"datapool_{history_name}.csv") as history:
                shutil.copyfile(tmp, history)
    return size


def write_pool_csv(store: Store, config: Config, pool: str, model_id: int, path: Path) -> int:
    """A pool's members as a lightly embeddings CSV (normalised like the run's outputs); returns the count."""
    ids, vectors = store.vectors(model_id, store.pool_members(pool), ok_only=False)
    if config.normalize_embeddings:
        vectors = normalize(vectors)
    names, labels = output_names(store, config, ids)
    write_embeddings_csv(path, names, vectors, labels)
    return len(ids)


def pool_ids_from_csv(store: Store, config: Config, path: Path, dim: int) -> tuple[list[int], list[str]]:
    """Image ids named by a pool CSV (lightly format), and the names the store does not know. A CSV whose
    vectors are not `dim`-dimensional or not finite is not a pool of this store (ExportError)."""
    data = read_embeddings_csv(path)
    if data.vectors.size and data.vectors.shape[1] != dim:
        raise ExportError(f"datapool: {str(path)!r} has {data.vectors.shape[1]}-d vectors; the store's model has {dim}")
    if not np.isfinite(data.vectors).all():
        row = int(np.flatnonzero(~np.isfinite(data.vectors).all(axis=1))[0])
        raise ExportError(f"datapool: {str(path)!r} row {row + 1} ({data.filenames[row]!r}) has a NaN or infinite value")
    naming = store_naming(store, config)
    by_root: dict[tuple[str, str], dict[str, int]] = {}
    ids, unknown = [], []
    for name in data.filenames:
        parsed = naming.parse(name)
        if parsed is None:
            unknown.append(name)
            continue
        node, root, rel = parsed
        lookup = by_root.setdefault((node, root), store.ids_by_path(root, node))
        if rel in lookup:
            ids.append(lookup[rel])
        else:
            unknown.append(name)
    return ids, unknown


def _dump(store: Store, config: Config, dest: Path, image_ids: list[int], skip_existing: bool = False) -> int:
    """Write the images of `image_ids` that this node holds (the others are their own nodes' to write)."""
    naming = store_naming(store, config)
    where = store.locations(image_ids)
    written = 0
    for image_id in image_ids:
        loc = where[image_id]
        root, rel = loc.root, loc.relpath
        if root.startswith(IMPORTED_ROOT_PREFIX) or loc.node != store.node:
            continue
        target = dest / dump_name(naming.name(loc.node, root, rel), config.output_image_format)
        if skip_existing and target.exists():
            continue
        dump_image(Path(root) / rel, target, size=config.output_image_size, fmt=config.output_image_format,
                   apply_exif=config.check.apply_exif_orientation)
        written += 1
    return written


def dump_folder(config: Config, run_name: str) -> Path:
    """Where this node writes the selected images it holds of a run: <dump_dir>/<run>/sampled, else the run's
    folder under this node's shared_dir."""
    base = config.dump_path if config.dump_path is not None else config.shared_path / "runs"
    return base / run_name / "sampled"


def dump_pending(store: Store, config: Config) -> list[tuple[int, int, Path]]:
    """Write the selected images this node holds of every finished run (any node's) that asked for a dump and
    that this node has not dumped yet: (run id, images written, folder) of each. Each node writes what it
    holds, so every selected image is written once, by a node that can read it."""
    done = []
    for run_id in store.pending_dumps():
        row = store.run(run_id) or {}
        name = Path(str(row.get("output_dir") or f"run-{run_id}")).name
        dest = dump_folder(config, name)
        try:
            written = _dump(store, config, dest, store.selected_held(run_id), skip_existing=True)
            if row.get("pool"):
                _dump(store, config, config.shared_path / str(row["pool"]) / "dataset", store.pool_members(str(row["pool"])),
                      skip_existing=True)
        except OSError as exc:
            store.record_dump(run_id, status="failed", n_files=0, output_dir=str(dest), error=str(exc))
            raise
        store.record_dump(run_id, status="ok", n_files=written, output_dir=str(dest))
        done.append((run_id, written, dest))
    return done


def summarize_run(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "trigger", "status", "error", "method", "pool", "model_id", "n_candidates", "n_selected",
            "stop_reason", "output_dir")
    out = {k: row.get(k) for k in keep}
    out["started"] = row.get("started")
    out["seconds"] = (row["finished"] - row["started"]) if row.get("finished") else None
    return out
