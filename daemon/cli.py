"""`poolwatch` command line: ingest, status, sanity-check (and the commands later issues add).

Every command takes `--config FILE` and trailing `key=value` overrides. A bad configuration exits
with code 2 and one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poolwatch import __version__
from poolwatch.pipeline.config import Config, load_config
from poolwatch.pipeline.errors import EXIT_FAILED, PoolwatchError, StateError, UsageError
from poolwatch.pipeline.store import Store, open_store

from . import runtime
from .lock import ShareLock, running_daemon

if TYPE_CHECKING:
    from poolwatch.pipeline.calibration import Calibration
    from poolwatch.pipeline.decode import DecodeSettings
    from poolwatch.pipeline.ingest import BatchResult, PassSummary

    from .ray_ingest import RaySource

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    base = argparse.ArgumentParser(add_help=False)
    base.add_argument("--config", metavar="FILE", help="YAML file over the defaults (see config.yaml)")
    base.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    common = argparse.ArgumentParser(add_help=False, parents=[base])
    common.add_argument("overrides", nargs="*", metavar="key=value", help="overrides, e.g. stopping_condition.n_samples=0.1")

    parser = argparse.ArgumentParser(prog="poolwatch", description="Always-on image-dataset curator.")
    parser.add_argument("--version", action="version", version=f"poolwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("ingest", parents=[common], help="one pass over the input dirs: check, de-duplicate, embed, store")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--ray", action="store_true",
                   help="embed the backlog on a Ray cluster (ray.*: address, num_actors, ...; pip install 'poolwatch[ray]')")
    p = sub.add_parser("status", parents=[common], help="counts, model and pools of the store")
    p.add_argument("--json", action="store_true", help="print as JSON")
    p = sub.add_parser("near-duplicates", parents=[common], help="list the near-duplicate groups of the store")
    p.add_argument("--json", action="store_true", help="print as JSON: [{original, duplicates: [{path, distance}]}]")
    sub.add_parser("sanity-check", parents=[common], help="check install, torch, model, store and dirs")
    p = sub.add_parser("sample", parents=[common], help="ingest the input dirs, then one sampling run")
    p.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    p = sub.add_parser("report", parents=[base], help="(re)build the report of a run: its id, folder name or `latest`")
    p.add_argument("run", metavar="RUN")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    sub.add_parser("run", parents=[common], help="the always-on daemon: watch, ingest, sample on schedule/signal, metrics")
    sub.add_parser("trigger", parents=[common], help="ask the running daemon for a sampling run (SIGUSR1)")
    sub.add_parser("train", parents=[common], help="SimCLR training on the store's images; the result becomes the model")
    p = sub.add_parser("config", parents=[common], help="print the resolved configuration (token masked)")
    p.add_argument("--reference", action="store_true", help="print every option as a markdown table instead")
    p = sub.add_parser("store", parents=[base], help="move the store: `store migrate --to postgresql://...`")
    p.add_argument("action", choices=["migrate"], help="migrate: copy this SQLite store into an empty PostgreSQL one")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--to", metavar="URL", default="",
                   help="the target store's postgresql:// URL (default: $POOLWATCH_STORE_URL)")
    p = sub.add_parser("datapool", parents=[base], help="list, export, import or restore a datapool")
    p.add_argument("words", nargs="+", metavar="ACTION [NAME FILE] [key=value ...]",
                   help="list | export NAME FILE | import NAME FILE (adds) | restore NAME FILE (replaces)")
    p.add_argument("--allow-empty", action="store_true", help="let `restore` empty a pool (a CSV without rows)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "datapool":
        # `restore NAME FILE --allow-empty key=value`: argparse ends the words at the flag and leaves the rest.
        args.words += [w for w in extra if w != "--allow-empty"]
        args.allow_empty = args.allow_empty or "--allow-empty" in extra
        extra = [w for w in extra if w.startswith("-") and w != "--allow-empty"]
    if args.command == "store":  # `migrate --to URL key=value`: the overrides after the flag are left over
        args.overrides += [w for w in extra if "=" in w and not w.startswith("-")]
        extra = [w for w in extra if "=" not in w or w.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "run":
        # Before the heavy imports: a signal during start-up is recorded, not fatal (nor ignored as PID 1).
        from .signals import SignalRecorder

        args.signals = SignalRecorder().install()
    if args.command == "datapool":
        # argparse cannot tell `NAME FILE` from `key=value`; the `=` does.
        words = [w for w in args.words if "=" not in w]
        args.overrides = [w for w in args.words if "=" in w]
        args.action, args.pool_args = (words[0] if words else ""), words[1:]
    runtime.setup_logging(args.log_level)
    try:
        return _dispatch(args)
    except PoolwatchError as exc:
        # Every error a user can meet: one line, the exit code it carries (DESIGN §8).
        print(f"poolwatch: error: {exc}", file=sys.stderr)
        log.debug("details", exc_info=True)
        return exc.exit_code
    except OSError as exc:
        # disk full, permissions, a vanished dir: one clear line; what was committed stays consistent
        print(f"poolwatch: error: {exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}", file=sys.stderr)
        log.debug("details", exc_info=True)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace) -> int:
    config = load_config(args.overrides, args.config)
    if args.command not in ("config", "status", "trigger"):
        runtime.log_ineffective_lightly_keys(config)
    if config.sanity_check or args.command == "sanity-check":
        return sanity_check(config)
    if args.command in ("ingest", "sample", "train", "store") or (args.command == "datapool"
                                                                  and args.action in ("import", "restore")):
        with ShareLock(config.shared_path, role=args.command):
            return COMMANDS[args.command](config, args)
    return COMMANDS[args.command](config, args)


def cmd_ingest(config: Config, args: argparse.Namespace) -> int:
    summary = ingest_once(config, on_ray=args.ray)
    rate = summary.processed / summary.seconds if summary.seconds > 0 else 0.0
    data = {
        "discovered": summary.discovered, "processed": summary.processed, "ok": summary.ok,
        "corrupt": summary.corrupt, "duplicate": summary.duplicate, "near_duplicate": summary.near_duplicate,
        "missing": summary.missing,
        "forward_passes": summary.forward_passes, "seconds": round(summary.seconds, 3),
        "images_per_second": round(rate, 2), "compute_efficiency": round(summary.compute_efficiency, 4),
        "outages": summary.outages,
    }
    if args.json:
        print(json.dumps(data))
    else:
        print(f"ingested {summary.processed} of {summary.discovered} files in {summary.seconds:.1f}s "
              f"({rate:.1f} img/s): {summary.ok} ok ({summary.near_duplicate} near duplicates), {summary.corrupt} corrupt, "
              f"{summary.duplicate} duplicate, "
              f"{summary.missing} newly missing; {summary.forward_passes} forward passes, "
              f"compute efficiency {summary.compute_efficiency:.2f}")
    return EXIT_FAILED if summary.outages and summary.discovered == 0 else EXIT_OK


def _first_images(config: Config, store: Store) -> Callable[[DecodeSettings], Calibration | None]:
    """An int8 store with too few images to calibrate on: when this pass will embed at least the calibration
    count, it calibrates on its first images before embedding any, so nothing is embedded twice."""
    from poolwatch.pipeline import calibration
    from poolwatch.pipeline.engine import CALIBRATION_COUNT
    from poolwatch.pipeline.ingest import planned_work

    def first_images(settings: DecodeSettings) -> Calibration | None:
        current = store.current_model()
        todo = planned_work(store, config.input_paths, config.watch.ignore_patterns, current.id if current else None)
        if len(todo) < CALIBRATION_COUNT:
            log.debug("%d files to embed, fewer than the %d that int8 calibrates on", len(todo), CALIBRATION_COUNT)
            return None
        log.info("calibrating int8 on the first %d good images of this pass before embedding any", CALIBRATION_COUNT)
        return calibration.from_plan(todo, settings, CALIBRATION_COUNT)
    return first_images


def ingest_once(config: Config, on_ray: bool = False) -> PassSummary:
    """One ingest pass with a progress bar on a terminal; outages are logged. `on_ray`: the files are decoded and
    embedded by Ray actors (daemon/ray_ingest.py), everything else happens here as without it."""
    from tqdm import tqdm

    from poolwatch.pipeline.ingest import activate_model, ingest_pass

    from .near_check import log_calibrated, open_near

    if on_ray:
        from .ray_ingest import RaySource, require_ray

        require_ray(config)  # a missing extra is one line before anything loads
    store = open_store(config)
    embedder = runtime.load_engine(config, calibrate=_first_images(config, store), store=store)
    executor = None if on_ray else runtime.decode_executor(config)
    bar = tqdm(total=0, unit="img", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    near = None
    source: RaySource | None = None
    try:
        model_id = activate_model(store, embedder)
        settings = runtime.decode_settings(config, embedder)
        if on_ray:
            source = RaySource(config, embedder, settings)
        near = open_near(store, model_id, config)
        calibrated_before = near.calibration if near is not None else None
        log.info("ingest pass over %s into %s", ", ".join(map(str, config.input_paths)), config.store_label)

        def on_plan(n: int) -> None:
            bar.reset(total=n)
            log.info("%d files to process", n)

        def on_batch(result: BatchResult) -> None:
            bar.update(result.files)
            bar.set_postfix(efficiency=f"{result.compute_efficiency:.2f}")

        summary = ingest_pass(
            store, embedder, model_id, config.input_paths, settings, config.batch_size,
            executor=executor, remove_duplicates=config.remove_exact_duplicates,
            ignore_patterns=config.watch.ignore_patterns, on_plan=on_plan, on_batch=on_batch, near=near, source=source,
        )
        if near is not None and near.calibration is not None and calibrated_before is None:
            log_calibrated(model_id, near.calibration, near.backfilled)
        dropped = store.drop_old_vectors()
        if dropped:
            log.info("every image has a vector of model %d now; %d vectors of older models removed", model_id, dropped)
    finally:
        bar.close()
        if source is not None:
            source.close()
        if executor is not None:
            executor.shutdown()
        if near is not None:
            near.close()
        store.close()
    for outage in summary.outages:
        log.error("input directory outage: %s (its images keep their state)", outage)
    return summary


def cmd_status(config: Config, args: argparse.Namespace) -> int:
    if not config.has_store():
        raise UsageError(f"no store at {config.store_label}; run `poolwatch ingest` first (or set shared_dir=)")
    with open_store(config) as store:
        data = store.summary()
        data["store"] = config.store_label
        data.update(verdict_summary(store, config))
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    images = data["images"]
    print(f"store   {data['store']}")
    print("images  " + ", ".join(f"{k} {v}" for k, v in images.items()))
    if len(data["nodes"]) > 1:
        print("nodes   " + ", ".join(f"{node} {n}" for node, n in data["nodes"].items()))
    if data["corrupt_by_reason"]:
        print("corrupt " + ", ".join(f"{k} {v}" for k, v in data["corrupt_by_reason"].items()))
    model = data["model"]
    if model:
        print(f"model   {model['arch']['name']} d{model['dim']} @{model['input_size']}px, source {model['source']} "
              f"({model['detail']}), {data['embedded']} embedded")
        progress = data.get("reembedding") or {}
        if progress and progress["done"] < progress["total"]:
            print(f"        re-embedding: {progress['done']} of {progress['total']} images have vectors of this model; "
                  f"sampling uses model {data['sampling_model_id']} until then")
        mode = data.get("embedding_mode") or {}
        arch = model["arch"]
        print(f"        {arch.get('precision', 'fp32')}, {arch.get('decode', 'exact')} decode"
              + (f"; the store's mode: {mode['precision']} ({mode.get('decided', '')})" if mode else ""))
        if model["source"] == "random":
            print("        WARNING: random weights; set checkpoint= or enable_training=true for meaningful embeddings")
    else:
        print("model   none yet")
    near = data["near_duplicates"]
    if near["threshold"] is not None:
        how = f"calibrated on {near['calibration']['images']} images: {near['calibration']['rule']}" \
            if near["calibration"] else "set by near_duplicate.threshold"
        print(f"near    {near['images']} near duplicates in {near['groups']} groups; threshold {near['threshold']:.4g} ({how})")
    else:
        print(f"near    {near['state']}")
    if any(data["quality"].values()):
        print("quality " + ", ".join(f"{flag} {n}" for flag, n in data["quality"].items() if n))
        for flag, worst in data["quality_worst"].items():
            column = config.quality.rules()[flag][0]
            print(f"        worst {flag}: " + ", ".join(f"{w['path']} ({column} {w['value']:.3g})" for w in worst))
    for pool, size in data.get("datapools", {}).items():
        print(f"pool    {pool}: {size} members")
    run = data.get("last_run")
    if run:
        on = f" on node {run['node']}" if run.get("node") and len(data["nodes"]) > 1 else ""
        print(f"run     last: {run['id']} ({run['trigger']}, {run['status']}{on}), selected {run['n_selected']} of "
              f"{run['n_candidates']}, {run['output_dir'] or run['error']}")
    return EXIT_OK


WORST_EXAMPLES = 3  # per quality flag, in `poolwatch status`


def verdict_summary(store: Store, config: Config) -> dict[str, Any]:
    """The near-duplicate and quality part of `poolwatch status`."""
    from poolwatch.pipeline.near_duplicates import effective_threshold, recorded_calibration
    from poolwatch.pipeline.near_threshold import MIN_IMAGES
    from poolwatch.pipeline.sampling import store_naming

    model = store.current_model()
    calibration = recorded_calibration(store, model.id, config.normalize_embeddings) if model is not None else None
    threshold = effective_threshold(config, calibration)
    groups = store.near_duplicate_groups()
    if config.near_duplicate.threshold == -1:
        state = "off (near_duplicate.threshold=-1)"
    elif threshold is None:
        state = f"threshold auto: calibrated once the store holds {MIN_IMAGES} images of the current model"
    else:
        state = "on"
    naming = store_naming(store, config)
    rules = config.quality.rules()
    worst: dict[str, list[dict[str, Any]]] = {}
    for flag, rule in rules.items():
        found = store.worst_quality(rule, WORST_EXAMPLES)
        if found:
            where = store.locations(i for i, *_rest in found)
            worst[flag] = [{"path": naming.name(where[i].node, root, rel), "value": value} for i, root, rel, value in found]
    return {
        "near_duplicates": {
            "state": state, "threshold": threshold,
            "calibration": calibration.as_dict() if calibration is not None and config.near_duplicate.threshold == "auto"
            else None,
            "images": sum(len(copies) for _o, copies in groups), "groups": len(groups),
        },
        "quality": store.quality_counts(rules),
        "quality_worst": worst,
    }


def cmd_near_duplicates(config: Config, args: argparse.Namespace) -> int:
    from poolwatch.pipeline.sampling import near_duplicate_groups, store_naming

    if not config.has_store():
        raise UsageError(f"no store at {config.store_label}; run `poolwatch ingest` first (or set shared_dir=)")
    with open_store(config) as store:
        groups = near_duplicate_groups(store, store_naming(store, config))
    if args.json:
        print(json.dumps(groups, indent=1, ensure_ascii=False))
        return EXIT_OK
    if not groups:
        print("no near duplicates")
    for group in groups:
        print(group["original"])
        for dup in group["duplicates"]:
            print(f"  {dup['distance']:.4f}  {dup['path']}")
    return EXIT_OK


def sanity_check(config: Config) -> int:
    """Each check prints one line; exit 0 when all pass, 1 otherwise."""
    checks: list[tuple[str, Callable[[], str]]] = []

    def check(name: str) -> Callable[[Callable[[], str]], Callable[[], str]]:
        def register(fn: Callable[[], str]) -> Callable[[], str]:
            checks.append((name, fn))
            return fn
        return register

    @check("torch")
    def _torch() -> str:
        import torch

        x = torch.ones(4, 4)
        assert float((x @ x).sum()) == 64.0
        return f"torch {torch.__version__}, cuda {'available' if torch.cuda.is_available() else 'not available'}"

    @check("model")
    def _model() -> str:
        import numpy as np

        embedder = runtime.load_engine(config)
        out = embedder.embed(np.zeros((2, embedder.input_size, embedder.input_size, 3), dtype=np.uint8))
        assert out.shape == (2, embedder.dim) and np.isfinite(out).all()
        return (f"{embedder.info.name} from {embedder.info.source} on {embedder.runtime} {embedder.precision}, "
                f"{embedder.dim}-d output")

    @check("shared_dir")
    def _shared() -> str:
        path = config.shared_path
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".sanity-{time.time_ns()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        return f"{path} writable"

    @check("store")
    def _store() -> str:
        with open_store(config) as store:
            result = store.integrity_check()
            assert result == "ok", result
            return f"{store.path} schema {store.schema_version}, integrity ok"

    @check("input_dir")
    def _inputs() -> str:
        from poolwatch.pipeline.discover import discover

        counts = []
        for root in config.input_paths:
            counts.append(f"{root} ({sum(1 for _ in discover(root, config.watch.ignore_patterns))} images)")
        return "readable: " + ", ".join(counts)

    failed = 0
    for name, fn in checks:
        try:
            print(f"ok      {name}: {fn()}")
        except Exception as exc:  # every failure is reported, none stops the others
            failed += 1
            print(f"FAILED  {name}: {type(exc).__name__}: {exc}")
    print("sanity check " + ("passed" if not failed else f"failed ({failed} of {len(checks)})"))
    return EXIT_OK if not failed else EXIT_FAILED


def cmd_sample(config: Config, args: argparse.Namespace) -> int:
    from poolwatch.pipeline.sampling import import_embeddings, sample_run, summarize_run, validate_sampling

    validate_sampling(config)
    model_id = preselected = None
    extra: dict[str, Any] = {}
    if config.embeddings:
        if config.enable_training:
            raise UsageError("enable_training: cannot train when embeddings= is given (there are no images)")
        with open_store(config) as store:
            model_id, preselected = import_embeddings(store, config.resolve_shared(config.embeddings))
    else:
        summary = ingest_once(config)
        if summary.outages and summary.discovered == 0:
            return EXIT_FAILED
        if config.enable_training:
            train_and_switch(config)
            summary = ingest_once(config)  # re-embeds the store with the trained model
        extra = {"compute_efficiency": round(summary.compute_efficiency, 4) if summary.processed else None,
                 "ingest": {"processed": summary.processed, "forward_passes": summary.forward_passes,
                            "seconds": round(summary.seconds, 3)}}
    with open_store(config) as store:
        runtime.recover_runs(store, config.shared_path)
        if not store.try_sampling_lock():  # a shared store: one run at a time across the nodes
            log.info("sampling run waits for another node's run to finish")
            while not store.try_sampling_lock(wait=1.0):
                pass
        log.info("sampling run (%s, pool %s) started", config.method, config.datapool.name or "none")
        try:
            result = sample_run(store, config, trigger="cli", model_id=model_id, preselected=preselected,
                                extra_stats=extra)
        finally:
            store.release_sampling_lock()
        row = summarize_run(store.run(result.run_id) or {})
        runtime.write_report(store, result.run_id)
    log.info("sampling run %d finished: %d of %d candidates selected (%s), pool %d -> %d, outputs in %s",
             result.run_id, result.n_selected, result.n_candidates, result.stop_reason, result.pool_before,
             result.pool_after, result.output_dir)
    if args.json:
        ingest = {"ingest": extra["ingest"]} if "ingest" in extra else {}
        print(json.dumps({**row, **ingest, "pool_before": result.pool_before, "pool_after": result.pool_after}))
    else:
        print(f"run {result.run_id}: selected {result.n_selected} of {result.n_candidates} candidates "
              f"({result.stop_reason}); pool {result.pool_before} -> {result.pool_after}; {result.output_dir}")
    return EXIT_OK


def cmd_report(config: Config, args: argparse.Namespace) -> int:
    from poolwatch.pipeline.report import ReportError, build_report

    with open_store(config) as store:
        run_id = resolve_run(store, config, args.run)
        try:
            data = build_report(store, run_id)
        except ReportError as exc:
            raise UsageError(f"report: {exc}") from None
    print(f"{data['run']['output_dir']}/report.pdf ({data['pdf_pages']} pages)")
    return EXIT_OK


def resolve_run(store: Store, config: Config, ref: str) -> int:
    """A run given as its id, its folder name, a folder path, or `latest`."""
    from pathlib import Path

    if ref.isdigit():
        return int(ref)
    name = Path(ref).name
    if name == "latest":
        target = config.shared_path / "runs" / "latest"
        name = Path(os.readlink(target)).name if target.is_symlink() else ""
    for row in store.runs(limit=1_000_000):
        if row["output_dir"] and Path(row["output_dir"]).name == name:
            return int(row["id"])
    raise UsageError(f"report: no run {ref!r} (give a run id, a folder name under {config.shared_path / 'runs'}, or latest)")


def cmd_datapool(config: Config, args: argparse.Namespace) -> int:
    from pathlib import Path

    from poolwatch.pipeline.sampling import pool_ids_from_csv, write_pool_files

    action, rest = args.action, args.pool_args
    if action not in ("list", "export", "import", "restore"):
        raise UsageError(f"datapool: unknown action {action!r}; allowed: list, export, import, restore")
    if action == "list":
        with open_store(config) as store:
            for name, size in store.pools().items():
                print(f"{name}\t{size}")
        return EXIT_OK
    if len(rest) != 2:
        raise UsageError(f"datapool {action}: expects NAME FILE, got {' '.join(rest) or 'nothing'}")
    name, file = rest[0], Path(rest[1])
    pool_config = config.model_copy(update={"datapool": config.datapool.model_copy(update={"name": name})})
    with open_store(config) as store:
        model = store.current_model()
        if model is None:
            raise UsageError("the store has no model yet: run `poolwatch ingest` first")
        if action == "export":
            if name not in store.pools():
                raise UsageError(f"datapool export: no pool named {name!r} (see `poolwatch datapool list`)")
            from poolwatch.pipeline.sampling import write_pool_csv

            size = write_pool_csv(store, config, name, model.id, file)
            print(f"exported {size} members of {name} to {file}")
            return EXIT_OK
        ids, unknown = pool_ids_from_csv(store, config, file, model.dim)
        if unknown:
            raise UsageError(f"datapool {action}: {len(unknown)} files in {file} are not in the store "
                             f"(first: {unknown[0]!r}); ingest them first")
        if action == "restore" and not ids and not args.allow_empty:
            raise UsageError(f"datapool restore: {file} names no file, which would empty {name!r}; "
                             "add --allow-empty if that is what you want")
        if action == "restore":
            store.replace_pool(name, ids)
        else:
            store.add_to_pool(name, ids)
        size = write_pool_files(store, pool_config, name, model.id, history_name=None)
    log.info("datapool %s %s from %s: %d members now", name, "restored" if action == "restore" else "imported", file, size)
    print(f"datapool {name}: {size} members")
    return EXIT_OK


def train_and_switch(config: Config) -> dict[str, Any]:
    """Train on the store's `ok` images, make the result the current model, return a summary."""
    import shutil

    from tqdm import tqdm

    from poolwatch.pipeline.train import train_simclr

    with open_store(config) as store:
        roots = {str(p) for p in config.input_paths}
        paths = [Path(r["root"]) / r["relpath"] for r in store.images("ok") if r["root"] in roots]
    if config.embeddings:
        raise UsageError("enable_training: cannot train when embeddings= is given (there are no images)")
    current = runtime.load_torch_model(config)
    epochs = int(config.lightly_get("trainer.max_epochs"))
    log.info("training SimCLR on %d images for %d epochs from the %s model", len(paths), epochs, current.source)
    bar = tqdm(total=None, unit="step", disable=not sys.stderr.isatty(), dynamic_ncols=True, desc="training")

    def progress(epoch: int, step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}")

    pool = config.datapool.name
    try:
        result = train_simclr(paths, config.lightly, out_dir=config.shared_path, init=current.module,
                              seed=int(config.lightly_get("seed")), device=runtime.training_device(config),
                              num_workers=runtime.num_workers(config), progress=progress,
                              extra_checkpoint=config.shared_path / pool / "checkpoint_latest.ckpt" if pool else None)
    finally:
        bar.close()
    # A copy named by its weights keeps this model's file even when a later training reuses the name.
    trained = runtime.load_engine(config, trained=result.checkpoint)
    keep = config.shared_path / "models" / f"trained-{trained.info.weights_hash[:16]}.ckpt"
    keep.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.checkpoint, keep)
    trained.info.path = str(keep)
    from poolwatch.pipeline.ingest import activate_model

    with open_store(config) as store:
        model_id = activate_model(store, trained)
    log.info("training done in %.1fs (losses per epoch: %s); model %d is now current (%s)", result.seconds,
             ", ".join(f"{x:.4f}" for x in result.losses), model_id, result.checkpoint)
    return {"checkpoint": str(result.checkpoint), "model_id": model_id, "epochs": result.epochs,
            "losses": result.losses, "seconds": round(result.seconds, 2), "images": len(paths),
            "skipped": [str(p) for p in result.skipped]}


def cmd_train(config: Config, args: argparse.Namespace) -> int:
    if config.embeddings:
        raise UsageError("enable_training: cannot train when embeddings= is given (there are no images)")
    ingest_once(config)
    summary = train_and_switch(config)
    again = ingest_once(config)  # re-embed every ok image with the new model
    with open_store(config) as store:
        dropped = store.drop_old_vectors()
    log.info("re-embedded %d images with the trained model; %d vectors of older models removed", again.processed, dropped)
    print(json.dumps({**summary, "reembedded": again.processed}))
    return EXIT_OK


def cmd_config(config: Config, args: argparse.Namespace) -> int:
    from poolwatch.pipeline.config import reference_table

    print(reference_table() if args.reference else config.to_yaml(), end="\n")
    return EXIT_OK


def cmd_run(config: Config, args: argparse.Namespace) -> int:
    from .service import Service

    return Service(config, list(args.overrides), args.config, signals=args.signals).run()


def cmd_trigger(config: Config, args: argparse.Namespace) -> int:
    """SIGUSR1 to the live `poolwatch run` daemon of this shared_dir, and to no other process."""
    import signal

    pid = running_daemon(config.shared_path)  # StateError (exit 1) when there is none
    try:
        os.kill(pid, signal.SIGUSR1)
    except ProcessLookupError:
        raise StateError(f"no running daemon: pid {pid} ended just now") from None
    print(f"sampling run requested from pid {pid}")
    return EXIT_OK


def cmd_store(config: Config, args: argparse.Namespace) -> int:
    """`store migrate --to URL`: copy the SQLite store of this shared_dir into an empty PostgreSQL database."""
    from poolwatch.pipeline.config import mask_url
    from poolwatch.pipeline.store.migrate import copy_store

    url = args.to or os.environ.get("POOLWATCH_STORE_URL", "")
    if not url.startswith(("postgresql://", "postgres://")):
        raise UsageError(f"--to: invalid value {mask_url(url)!r}; allowed: a postgresql://user:password@host:port/db URL")
    if config.store.url.get_secret_value():
        raise UsageError("store migrate copies the SQLite store at store.path; leave store.url unset for it (give the "
                         "target as --to)")
    if not config.store_path.exists():
        raise UsageError(f"no store at {config.store_path}; nothing to migrate")
    started = time.perf_counter()
    with Store.open(config.store_path, float(config.store.busy_timeout), node=config.node.name or None) as source, \
            Store.connect(url, source.node, float(config.store.busy_timeout), describe=mask_url(url)) as target:
        log.info("migrating the store %s (node %s) into %s", source.path, source.node, target.path)
        counts = copy_store(source, target)
    log.info("store migrated in %.1fs: %s", time.perf_counter() - started, ", ".join(f"{t} {n}" for t, n in counts.items()))
    print(json.dumps({"from": str(config.store_path), "to": mask_url(url), "node": source.node, "rows": counts}))
    return EXIT_OK


COMMANDS: dict[str, Callable[[Config, argparse.Namespace], int]] = {
    "store": cmd_store,
    "ingest": cmd_ingest,
    "status": cmd_status,
    "near-duplicates": cmd_near_duplicates,
    "sample": cmd_sample,
    "datapool": cmd_datapool,
    "config": cmd_config,
    "run": cmd_run,
    "report": cmd_report,
    "train": cmd_train,
    "trigger": cmd_trigger,
}

if __name__ == "__main__":
    sys.exit(main())
