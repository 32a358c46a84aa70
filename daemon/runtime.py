"""Process-level set-up shared by the commands and the daemon: logging, threads, model, decode pool."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from poolwatch.pipeline.config import Config
from poolwatch.pipeline.decode import DecodeSettings, warm_up
from poolwatch.pipeline.store import Store

from .decode_pool import DecodePool

if TYPE_CHECKING:
    from poolwatch.pipeline.embed import Embedder  # torch: imported only where a model is loaded

log = logging.getLogger(__name__)

WEIGHTS_ENV = "POOLWATCH_WEIGHTS"


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    for noisy in ("PIL", "apscheduler.executors", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


MAX_WORKERS_PER_CORE = 4  # decode workers beyond this many per core only cost memory and start-up time


def num_workers(config: Config) -> int:
    """Decode worker processes: loader.num_workers (-1 = one per core), at most 4 per core."""
    cores = os.cpu_count() or 1
    n = int(config.lightly_get("loader.num_workers"))
    if n < 0:
        return cores
    cap = MAX_WORKERS_PER_CORE * cores
    if n > cap:
        log.warning("lightly.loader.num_workers=%d is more than %d per core; using %d decode workers on %d cores",
                    n, MAX_WORKERS_PER_CORE, cap, cores)
        return cap
    return n


def decode_settings(config: Config, input_size: int | None = None) -> DecodeSettings:
    """How files are decoded for a model of `input_size` (default: the configured one)."""
    return DecodeSettings(
        input_size=config.input_size if input_size is None else input_size,
        max_pixels=config.check.max_pixels,
        check_corruptness=config.enable_corruptness_check,
        apply_exif=config.check.apply_exif_orientation,
    )


def decode_timeout(config: Config) -> float | None:
    seconds = float(config.check.decode_timeout)
    return seconds if seconds > 0 else None


def decode_executor(config: Config, timeout: Callable[[], float | None] | None = None) -> DecodePool | None:
    """A process pool for decoding, each file under check.decode_timeout (or `timeout()`, read at every
    file: the daemon passes its current settings'); forkserver so that workers never inherit the parent's
    threads or torch. None (decode in this process) with loader.num_workers=0."""
    workers = num_workers(config)
    if workers <= 0:
        if decode_timeout(config) is not None:
            log.warning("lightly.loader.num_workers=0 decodes in this process: check.decode_timeout cannot be "
                        "enforced, a file that hangs its decoder stops ingest")
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["poolwatch.pipeline.decode"])
    executor = DecodePool(workers, timeout or (lambda: decode_timeout(config)), context)
    try:
        # Start the workers now, not on the first file: a trickle's first image must not wait for them.
        for future in [executor.submit(warm_up) for _ in range(workers)]:
            future.result()
    except BaseException:
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    return executor


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim). A long-lived process whose threads
    each allocate large short-lived buffers (a sampling run's matrices, a report's plots) otherwise keeps
    them in per-thread arenas, and its RSS only ever grows. A no-op where there is no glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def configure_torch_threads() -> None:
    import torch

    # The model gets every core. Decoding costs ~2 ms a file against the model's ~40 ms (fp32, 64 px), so
    # the decode workers only borrow cores for moments; holding half of them back for decoding made
    # `poolwatch ingest` slower than lightly-embed on 2 cores (17 vs 23 img/s side by side).
    torch.set_num_threads(os.cpu_count() or 1)


# lightly CLI keys that poolwatch accepts but that change nothing here (it has no Lightning trainer,
# no cropping, no hydra): setting one logs a line saying so.
NO_EFFECT = ("crop_padding", "trainer.gpus", "trainer.enable_model_summary", "checkpoint_callback",
             "summary_callback", "environment_variable_names")


def log_ineffective_lightly_keys(config: Config) -> None:
    from poolwatch.pipeline.config import lightly_cli_defaults

    defaults = lightly_cli_defaults()
    for dotted in NO_EFFECT:
        ours: Any = config.lightly
        theirs: Any = defaults
        for part in dotted.split("."):
            ours, theirs = ours.get(part), theirs.get(part)
        if ours != theirs:
            log.info("lightly.%s is accepted for compatibility but has no effect in poolwatch", dotted)


def trained_model_path(config: Config) -> Path | None:
    """The store's current model when training made it for this architecture (it outlives restarts)."""
    from poolwatch.pipeline.embed import ModelSpec
    from poolwatch.pipeline.store import Store

    if config.checkpoint or not config.store_path.exists():
        return None
    spec = ModelSpec.from_lightly(config.lightly)
    with Store.open(config.store_path, float(config.store.busy_timeout)) as store:
        current = store.current_model()
    if current is None or current.source != "trained" or not current.path or not Path(current.path).is_file():
        return None
    arch = {k: v for k, v in current.arch.items() if k != "precision"}
    if arch != spec.arch() or current.input_size != spec.input_size:
        log.warning("the trained model %s was made for %s @%dpx; lightly.model/collate now ask for %s @%dpx, "
                    "so it is not used", current.path, current.arch, current.input_size, spec.arch(), spec.input_size)
        return None
    return Path(current.path)


def load_embedder(config: Config, trained: Path | None = None) -> Embedder:
    """The configured model, loaded and ready, with its fallbacks logged loudly.

    Random-init weights are seeded by `model.init_seed`, never by the sampling `seed`: null means the
    store's own random model for this architecture (a store made when `seed` also seeded the weights
    keeps its model and vectors), else seed 1.
    """
    from poolwatch.pipeline.embed import DEFAULT_INIT_SEED, Embedder, ModelSpec, load_model, random_init_seed, resolve_device
    from poolwatch.pipeline.store import Store

    spec = ModelSpec.from_lightly(config.lightly)
    weights = os.environ.get(WEIGHTS_ENV)
    init_seed = config.model.init_seed
    if init_seed is None:
        stored = None
        if not config.checkpoint and config.store_path.exists():
            with Store.open(config.store_path, float(config.store.busy_timeout)) as store:
                stored = random_init_seed(store.models(), spec)
        init_seed = DEFAULT_INIT_SEED if stored is None else stored
    model = load_model(
        spec,
        models_dir=config.shared_path / "models",
        checkpoint=config.resolve_shared(config.checkpoint) if config.checkpoint else None,
        trained=trained if trained is not None else trained_model_path(config),
        weights_file=Path(weights).expanduser() if weights else None,
        pretrained=bool(config.lightly_get("pre_trained")),
        seed=init_seed,
    )
    for note in model.notes:
        log.warning("%s", note)
    device = resolve_device(config.device)
    log.info("model %s (%s: %s) on %s, input %dpx, %d-d embeddings, weights %s",
             spec.slug, model.source, model.detail, device, spec.input_size, spec.num_ftrs, model.weights_hash[:12])
    return Embedder(model, device, config.embedding_precision)


def recover_runs(store: Store, shared: Path) -> None:
    """After a process that died: finish or clean up its run (logged), and build the reports it left
    unwritten. The daemon's sampler and `poolwatch sample` both call this before their first run."""
    from poolwatch.pipeline.sampling import recover, runs_without_report

    for line in recover(store, shared):
        log.warning("recovery: %s", line)
    for run_id in runs_without_report(store):
        log.warning("recovery: run %d has no complete report; building it", run_id)
        write_report(store, run_id)


def write_report(store: Store, run_id: int) -> bool:
    """Build a run's report; a failure is logged and never fails the run itself (False)."""
    from poolwatch.pipeline.report import build_report

    try:
        data = build_report(store, run_id)
    except Exception:  # the run is committed; its report is a by-product
        log.exception("the report of run %d failed (the run itself is fine; retry with `poolwatch report %d`)",
                      run_id, run_id)
        return False
    log.info("report of run %d: %s/report.pdf (%d pages)", run_id, data["run"]["output_dir"], data.get("pdf_pages", 0))
    return True
