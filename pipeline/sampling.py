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
from dataclasses import dataclass, field
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
    dump_image,
    dump_name,
    labels_for,
    read_embeddings_csv,
    write_embeddings_csv,
    write_lines,
)
from .store import CandidateFilter, ImageRecord, Store

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
    committed = {Path(r["output_dir"]).name: r["id"] for r in store.runs(limit=50) if r["status"] == "ok" and r["output_dir"]}
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
        folder = Path(r["output_dir"]) if r["status"] == "ok" and r["output_dir"] else None
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
    run_id = store.begin_run(trigger=trigger, config_json=config.to_json(), method=config.method, pool=pool, model_id=model_id)
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

        if config.dump_dataset:
            t = time.perf_counter()
            _dump(store, config, tmp / "sampled", [int(i) for i in picked])
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
    pool_after = len(pool_ids)
    if pool:
        pool_after = write_pool_files(store, config, pool, model_id, history_name=name)
        if config.dump_dataset:
            _dump(store, config, shared / pool / "dataset", store.pool_members(pool), skip_existing=True)
    return RunResult(run_id, runs_dir / name, len(cand_ids_arr), len(picked), selection.stop_reason, len(pool_ids),
                     pool_after, time.perf_counter() - started, stages)


def output_names(store: Store, config: Config, ids: np.ndarray | list[int]) -> tuple[list[str], list[int]]:
    """Output filenames and lightly labels of these images, in order."""
    naming = Naming.for_roots([str(p) for p in config.input_paths])
    paths = store.paths(ids)
    names, labels = [], []
    by_root: dict[str, list[str]] = {}
    for i in ids:
        root, rel = paths[int(i)]
        by_root.setdefault(root, []).append(rel)
    label_of = {}
    for root, rels in by_root.items():
        for rel, label in zip(rels, labels_for(rels, store.top_folders(root)), strict=True):
            label_of[(root, rel)] = label
    for i in ids:
        root, rel = paths[int(i)]
        names.append(naming.name(root, rel) if not root.startswith(IMPORTED_ROOT_PREFIX) else rel)
        labels.append(label_of[(root, rel)])
    return names, labels


def _write_outputs(store: Store, config: Config, out: Path, cand_ids: np.ndarray, cand: np.ndarray,
                   picked: np.ndarray, picked_idx: np.ndarray, fixed_ids: np.ndarray, fixed: np.ndarray,
                   removed: list[int]) -> None:
    (out / "config").mkdir(parents=True, exist_ok=True)
    (out / "config" / "config.yaml").write_text(config.to_yaml(), encoding="utf-8")
    names, labels = output_names(store, config, cand_ids)
    write_embeddings_csv(out / "data" / "embeddings.csv", names, cand, labels)
    sel_names = [names[i] for i in picked_idx]
    sel_labels = [labels[i] for i in picked_idx]
    write_embeddings_csv(out / "data" / "selected_embeddings.csv", sel_names, cand[picked_idx], sel_labels)
    if len(fixed_ids):
        fixed_names, fixed_labels = output_names(store, config, fixed_ids)
        write_embeddings_csv(out / "data" / "selected_embeddings_including_datapool.csv", fixed_names + sel_names,
                             np.concatenate([fixed, cand[picked_idx]]), fixed_labels + sel_labels)
    write_lines(out / "filenames" / "sampled_filenames.txt", sel_names)
    removed_names, _ = output_names(store, config, removed)
    write_lines(out / "filenames" / "removed_filenames.txt", removed_names)
    roots = {str(p) for p in config.input_paths}
    corrupt = [r for r in store.images("corrupt") if r["root"] in roots]
    duplicates = [r for r in store.images("duplicate") if r["root"] in roots]
    naming = Naming.for_roots([str(p) for p in config.input_paths])
    write_lines(out / "filenames" / "corrupt_filenames.txt", (naming.name(r["root"], r["relpath"]) for r in corrupt))
    reasons = {naming.name(r["root"], r["relpath"]): {"reason": r["reason"], "detail": r["detail"]} for r in corrupt}
    (out / "filenames" / "corrupt_filenames.json").write_text(json.dumps(reasons, indent=1, ensure_ascii=False),
                                                             encoding="utf-8", errors="backslashreplace")
    originals = store.paths(r["duplicate_of"] for r in duplicates if r["duplicate_of"])
    write_lines(out / "filenames" / "duplicate_filenames.txt", (naming.name(r["root"], r["relpath"]) for r in duplicates))
    dup_map = {naming.name(r["root"], r["relpath"]): naming.name(*originals[r["duplicate_of"]])
               for r in duplicates if r["duplicate_of"] in originals}
    (out / "filenames" / "duplicate_filenames.json").write_text(json.dumps(dup_map, indent=1, ensure_ascii=False),
                                                               encoding="utf-8", errors="backslashreplace")
    near = near_duplicate_groups(store, naming, roots)
    write_lines(out / "filenames" / "near_duplicate_filenames.txt", (d["path"] for g in near for d in g["duplicates"]))
    near_map = {d["path"]: {"original": g["original"], "distance": d["distance"]} for g in near for d in g["duplicates"]}
    (out / "filenames" / "near_duplicate_filenames.json").write_text(json.dumps(near_map, indent=1, ensure_ascii=False),
                                                                    encoding="utf-8", errors="backslashreplace")


def near_duplicate_groups(store: Store, naming: Naming, roots: set[str] | None = None) -> list[dict[str, Any]]:
    """The store's near-duplicate groups as `poolwatch near-duplicates --json` lists them: [{"original": name,
    "duplicates": [{"path": name, "distance": d}, ...]}, ...], names as in the run's outputs; only images
    under `roots` when given."""
    groups = store.near_duplicate_groups()
    paths = store.paths({i for original, copies in groups for i in (original, *(c for c, _d in copies))})
    out = []
    for original, copies in groups:
        if roots is not None and paths[original][0] not in roots:
            continue
        dups = [{"path": naming.name(*paths[c]), "distance": d} for c, d in copies if roots is None or paths[c][0] in roots]
        if dups:
            out.append({"original": naming.name(*paths[original]), "duplicates": dups})
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
    naming = Naming.for_roots([str(p) for p in config.input_paths])
    by_root: dict[str, dict[str, int]] = {}
    ids, unknown = [], []
    for name in data.filenames:
        parsed = naming.parse(name)
        if parsed is None:
            unknown.append(name)
            continue
        root, rel = parsed
        lookup = by_root.setdefault(root, store.ids_by_path(root))
        if rel in lookup:
            ids.append(lookup[rel])
        else:
            unknown.append(name)
    return ids, unknown


def _dump(store: Store, config: Config, dest: Path, image_ids: list[int], skip_existing: bool = False) -> int:
    naming = Naming.for_roots([str(p) for p in config.input_paths])
    paths = store.paths(image_ids)
    written = 0
    for image_id in image_ids:
        root, rel = paths[image_id]
        if root.startswith(IMPORTED_ROOT_PREFIX):
            continue
        target = dest / dump_name(naming.name(root, rel), config.output_image_format)
        if skip_existing and target.exists():
            continue
        dump_image(Path(root) / rel, target, size=config.output_image_size, fmt=config.output_image_format,
                   apply_exif=config.check.apply_exif_orientation)
        written += 1
    return written


def summarize_run(row: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "trigger", "status", "error", "method", "pool", "model_id", "n_candidates", "n_selected",
            "stop_reason", "output_dir")
    out = {k: row.get(k) for k in keep}
    out["started"] = row.get("started")
    out["seconds"] = (row["finished"] - row["started"]) if row.get("finished") else None
    return out
