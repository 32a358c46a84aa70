"""Process-level set-up shared by the commands and the daemon: logging, threads, model, decode pool."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from poolwatch.pipeline import artifacts
from poolwatch.pipeline.atomic import replacing
from poolwatch.pipeline.config import Config
from poolwatch.pipeline.decode import DecodeSettings, warm_up
from poolwatch.pipeline.devices import gpu_possible
from poolwatch.pipeline.engine import CALIBRATION_COUNT, Engine, Mode, ModeChoice, interim_precision
from poolwatch.pipeline.engine import choose_mode as engine_choose_mode
from poolwatch.pipeline.errors import ModelError
from poolwatch.pipeline.modelspec import DEFAULT_INIT_SEED, ModelInfo, ModelSpec, file_sha256, find_weights, random_init_seed
from poolwatch.pipeline.openvino_engine import OpenVINOEngine
from poolwatch.pipeline.store import Store, open_store

from .decode_pool import DecodePool

if TYPE_CHECKING:
    from poolwatch.pipeline.calibration import Calibration
    from poolwatch.pipeline.embed import LoadedModel

log = logging.getLogger(__name__)

WEIGHTS_ENV = "POOLWATCH_WEIGHTS"
ARTIFACTS_ENV = "POOLWATCH_ARTIFACTS"  # where exported models are cached, if not <shared_dir>/models/artifacts


def artifacts_root(config: Config) -> Path:
    """The artifact cache: $POOLWATCH_ARTIFACTS (one cache for several stores, e.g. on a local disk when
    shared_dir is a network mount), else <shared_dir>/models/artifacts."""
    env = os.environ.get(ARTIFACTS_ENV)
    return Path(env).expanduser() if env else config.shared_path / "models" / "artifacts"


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


def decode_settings(config: Config, engine: Engine | None = None) -> DecodeSettings:
    """How files are decoded for `engine` (its input size and decode mode; without one: the configured size,
    and the configured decode mode, new stores' scaled decoding when that is null)."""
    return DecodeSettings(
        input_size=config.input_size if engine is None else engine.input_size,
        exact_decode=bool(config.check.exact_decode) if engine is None else engine.exact_decode,
        max_pixels=config.check.max_pixels,
        check_corruptness=config.enable_corruptness_check,
        apply_exif=config.check.apply_exif_orientation,
        measure_quality=config.quality.measure,
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
    """Only where torch is in this process already (a GPU machine, the torch fallback, training)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        # The model gets every core. Decoding costs ~2 ms a file against the model's ~40 ms (fp32, 64 px), so
        # the decode workers only borrow cores for moments.
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


def trained_model_path(config: Config, store: Store | None = None) -> Path | None:
    """The store's current model when training made it for this architecture (it outlives restarts)."""
    if config.checkpoint or config.model.onnx or (store is None and not config.has_store()):
        return None
    spec = ModelSpec.from_lightly(config.lightly)
    with contextlib.ExitStack() as stack:
        if store is None:
            store = stack.enter_context(open_store(config))
        current = store.current_model()
        if current is None or current.source != "trained" or not current.path:
            return None
        path = _shared_weights(config, store, current.id, Path(current.path))
    if path is None:
        return None
    arch = {k: v for k, v in current.arch.items() if k in spec.arch()}
    if arch != spec.arch() or current.input_size != spec.input_size:
        log.warning("the trained model %s was made for %s @%dpx; lightly.model/collate now ask for %s @%dpx, "
                    "so it is not used", current.path, current.arch, current.input_size, spec.arch(), spec.input_size)
        return None
    return path


def _shared_weights(config: Config, store: Store, model_id: int, path: Path) -> Path | None:
    """A trained model's weights file on a shared store: kept in the store by the node that has it, written into
    this node's models dir by one that has not (training ran elsewhere). None: no such file anywhere."""
    name = f"weights/model-{model_id}"
    if path.is_file():
        if store.shared and not store.has_blob(name) and store.put_blob(name, path.read_bytes()):
            log.info("trained weights of model %d kept in the store for the other nodes", model_id)
        return path
    data = store.blob(name) if store.shared else None
    if data is None:
        return None
    local = config.shared_path / "models" / "trained" / f"model-{model_id}{path.suffix}"
    if not local.is_file():
        with replacing(local, "wb") as fh:
            fh.write(data)
        log.info("trained weights of model %d taken from the store (trained on another node): %s", model_id, local)
    return local


def _wants_cuda(config: Config) -> bool:
    """device=auto is cuda only where a GPU driver exists and torch sees a device: torch is imported only there."""
    if config.device == "cpu":
        return False
    if config.device == "cuda":
        return True
    if not gpu_possible():
        return False
    import torch

    return bool(torch.cuda.is_available())


def _runnable(on_gpu: bool, openvino_ok: bool) -> Callable[[str], bool]:
    from poolwatch.pipeline.openvino_engine import runnable

    def check(precision: str) -> bool:
        if on_gpu:
            return precision in ("fp32", "bf16", "fp16")
        if openvino_ok:
            return runnable(precision)
        return precision in ("fp32", "bf16")
    return check


def choose_mode(config: Config, store: Store | None, on_gpu: bool, openvino_ok: bool) -> ModeChoice:
    """The store's embedding mode (engine.choose_mode); load_engine records it once the model has loaded."""
    from poolwatch.pipeline.openvino_engine import cpu_name

    stored = store.setting("embedding") if store is not None else None
    current = store.current_model() if store is not None else None
    choice = engine_choose_mode(config.embedding_precision, config.check.exact_decode, stored,
                                current.arch if current is not None else None, _runnable(on_gpu, openvino_ok), on_gpu,
                                "a GPU" if on_gpu else cpu_name())
    return choice


def _init_seed(config: Config, spec: ModelSpec, store: Store | None) -> int:
    init_seed = config.model.init_seed
    if init_seed is None:
        stored = random_init_seed(store.models(), spec) if store is not None and not config.checkpoint else None
        init_seed = DEFAULT_INIT_SEED if stored is None else stored
    return init_seed


def _openvino_loads() -> bool:
    from poolwatch.pipeline.openvino_engine import cpu_capabilities

    return bool(cpu_capabilities())


def load_engine(config: Config, trained: Path | None = None,
                calibrate: Callable[[DecodeSettings], Calibration | None] | None = None, store: Store | None = None,
                cancel: threading.Event | None = None) -> Engine:
    """The configured model, ready to embed, with its fallbacks logged loudly.

    On the CPU: OpenVINO running the model's cached artifact (built in a child process on first use, so
    torch is imported only there); torch on the CPU only when OpenVINO cannot load or model.runtime=torch.
    On a GPU: torch. The precision and decode mode are the store's (`choose_mode`), recorded once the model
    has loaded; an int8 store without a calibration yet (too few images) runs the best mode that needs none
    until it has one; `calibrate` (a pass that knows its files) may supply one from the images it is about
    to embed. `cancel` stops a build in the child (a daemon that is stopping).
    """
    with contextlib.ExitStack() as stack:
        if store is None:  # the mode is decided once per store and recorded there: a new store is made now
            store = stack.enter_context(open_store(config))
        on_gpu = _wants_cuda(config)
        openvino_ok = config.model.runtime == "auto" and not on_gpu and _openvino_loads()
        if config.model.runtime == "auto" and not on_gpu and not openvino_ok:
            log.warning("OpenVINO cannot load on this machine: the model runs on torch on the CPU (slower, and "
                        "the daemon carries torch); reinstall with `pip install openvino`")
        choice = choose_mode(config, store, on_gpu, openvino_ok)
        precision, calib = choice.precision, None
        if precision == "int8":
            settings = replace(decode_settings(config), exact_decode=choice.exact_decode)
            calib = _calibration(store, settings, calibrate)
            if calib is None:
                precision = interim_precision(_runnable(on_gpu, openvino_ok))
        mode = Mode(precision, choice.exact_decode)
        if config.model.onnx:
            engine = _onnx_engine(config, mode, calib, cancel, store)
        else:
            spec, args = _lightly_args(config, store, trained)
            engine = _lightly_engine(config, spec, args, mode, calib, cancel, store) if openvino_ok else \
                _torch_engine(config, spec, args, mode, on_gpu)
        if choice.changed:
            store.set_setting("embedding", choice.record)
            log.info("embedding mode of this store: %s, %s decode (%s)", choice.precision,
                     "exact" if choice.exact_decode else "scaled", choice.record.get("decided", ""))
        if precision != choice.precision:
            log.info("int8 needs %d ok images to calibrate on; embedding in %s until the store has them",
                     CALIBRATION_COUNT, precision)
    _log_model(engine)
    return engine


def _lightly_engine(config: Config, spec: ModelSpec, args: dict[str, Any], mode: Mode,
                    calib: _CalibrationRef | None, cancel: threading.Event | None, store: Store | None = None) -> Engine:
    models_dir, root = config.shared_path / "models", artifacts_root(config)
    ref = find_weights(spec, models_dir=models_dir, **args)
    paths = {k: str(v) if isinstance(v, Path) else v for k, v in args.items()}

    def request(ir: str) -> dict[str, Any]:
        key = artifacts.request_key(artifacts.lightly_request(spec, ref, ir))
        return {"kind": "lightly", "key": key, "models_dir": str(models_dir), "artifacts": str(root), "ir": ir,
                "spec": asdict(spec), **paths}

    (path, meta), calibration_hash = _artifact(root, request, calib, None, cancel, store)
    return OpenVINOEngine(path, ModelInfo.from_json(meta["info"]), replace(mode, calibration=calibration_hash))


@dataclass
class _CalibrationRef:
    """An int8 calibration: its hash (enough to find a cached artifact) and how to get its images again."""

    hash: str
    load: Callable[[], Calibration]


def _artifact(root: Path, request: Callable[[str], dict[str, Any]], calib: _CalibrationRef | None,
              build_here: Callable[[dict[str, Any]], None] | None, cancel: threading.Event | None,
              store: Store | None = None) -> tuple[tuple[Path, dict[str, Any]], str | None]:
    """The cached artifact `request(ir)` names, built when missing (in the child, or by `build_here` for what
    needs no torch); returns it and the calibration hash it was made with (None: not int8)."""
    def tag(h: str | None) -> str:
        return "f32" if h is None else f"int8.{h[:12]}"

    def cached(key: str) -> tuple[Path, dict[str, Any]] | None:
        found = artifacts.lookup(root, key) or _from_store(store, root, key)
        if found is not None:
            _to_store(store, root, key)
        return found

    wanted = calib.hash if calib is not None else None
    found = cached(request(tag(wanted))["key"])
    if found is not None:
        return found, wanted
    pixels = calib.load() if calib is not None else None
    if pixels is not None and pixels.hash != wanted:  # some of its images are gone: a new calibration
        wanted = pixels.hash
        found = cached(request(tag(wanted))["key"])
        if found is not None:
            return found, wanted
    req = request(tag(wanted))
    if pixels is None and build_here is not None:
        build_here(req)
    else:
        _build(req, pixels, cancel)
    found = cached(req["key"])
    if found is None:
        raise ModelError(f"the model's artifact could not be written under {root}")
    return found, wanted


def _from_store(store: Store | None, root: Path, key: str) -> tuple[Path, dict[str, Any]] | None:
    """An artifact another node of a shared store built (and its int8 calibration with it), cached here."""
    if store is None or not store.shared:
        return None
    data = store.blob(f"artifact/{key}")
    if data is None:
        return None
    found = artifacts.unpack(root, key, data)
    if found is not None:
        log.info("model artifact %s taken from the store (built by another node)", found[0].name)
    return found


def _to_store(store: Store | None, root: Path, key: str) -> None:
    """Keep the artifact in a shared store, so every node embeds with this very one (int8 calibration included)."""
    if store is None or not store.shared or store.has_blob(f"artifact/{key}"):
        return
    data = artifacts.pack(root, key)
    if data is not None and store.put_blob(f"artifact/{key}", data):
        log.info("model artifact kept in the store for the other nodes (%.1f MB)", len(data) / 2**20)


def _lightly_args(config: Config, store: Store | None, trained: Path | None) -> tuple[ModelSpec, dict[str, Any]]:
    """lightly's architecture and where its weights come from (modelspec.find_weights' arguments)."""
    spec = ModelSpec.from_lightly(config.lightly)
    weights = os.environ.get(WEIGHTS_ENV)
    return spec, {
        "checkpoint": config.resolve_shared(config.checkpoint) if config.checkpoint else None,
        "trained": trained if trained is not None else trained_model_path(config, store),
        "weights_file": Path(weights).expanduser() if weights else None,
        "pretrained": bool(config.lightly_get("pre_trained")),
        "seed": _init_seed(config, spec, store),
    }


def load_torch_model(config: Config) -> LoadedModel:
    """The configured lightly model as a torch module, for training (torch in this process)."""
    from poolwatch.pipeline.embed import load_model

    with contextlib.ExitStack() as stack:
        store = None
        if config.has_store():
            store = stack.enter_context(open_store(config))
        spec, args = _lightly_args(config, store, None)
    model = load_model(spec, models_dir=config.shared_path / "models", **args)
    for note in model.notes:
        log.warning("%s", note)
    configure_torch_threads()
    return model


def training_device(config: Config) -> str:
    return "cuda" if _wants_cuda(config) else "cpu"


def _build(request: dict[str, Any], calib: Calibration | None, cancel: threading.Event | None) -> dict[str, Any]:
    from .model_child import build_in_child

    if calib is None:
        return build_in_child(request, cancel)
    with tempfile.TemporaryDirectory(prefix="poolwatch-calib-") as tmp:
        pixels = Path(tmp) / "calibration.npy"
        np.save(pixels, calib.pixels)
        request["calibration"] = {"pixels": str(pixels), "hash": calib.hash, "images": calib.hashes}
        return build_in_child(request, cancel)


def _calibration(store: Store | None, settings: DecodeSettings,
                 calibrate: Callable[[DecodeSettings], Calibration | None] | None) -> _CalibrationRef | None:
    """The store's int8 calibration. Once made it is recorded (the images' content hashes), and every later
    start uses that record: a cached artifact is found by its hash alone, and a missing one is rebuilt from the
    same images, so vectors never change across restarts. A store without one makes it from its first ok
    images by content hash once it holds enough, or from what `calibrate` supplies (a pass's first images).
    None: too few images yet."""
    from poolwatch.pipeline import calibration

    key = f"calibration {calibration.describe(settings)}"  # the images' pixels depend on how they are decoded
    recorded = store.setting(key) if store is not None else None
    if store is not None and recorded and recorded.get("images"):
        images, kept = list(recorded["images"]), store

        def again() -> Calibration:
            calib = calibration.from_hashes(kept, settings, images)
            if len(calib) < len(images):
                log.warning("int8: %d of the %d images it was calibrated on are gone; calibrating again (a new model)",
                            len(images) - len(calib), len(images))
                calib = calibration.from_store(kept, settings, CALIBRATION_COUNT)
                kept.set_setting(key, {"hash": calib.hash, "images": calib.hashes})
            return calib
        return _CalibrationRef(str(recorded["hash"]), again)
    if store is None or store.count_ok() < CALIBRATION_COUNT:
        given = calibrate(settings) if calibrate is not None else None
    else:
        given = calibration.from_store(store, settings, CALIBRATION_COUNT)
    if given is None or len(given) < CALIBRATION_COUNT:
        return None
    if store is not None:
        store.set_setting(key, {"hash": given.hash, "images": given.hashes})
    made = given
    return _CalibrationRef(made.hash, lambda: made)


def _onnx_engine(config: Config, mode: Mode, calib: _CalibrationRef | None, cancel: threading.Event | None,
                 store: Store | None = None) -> Engine:
    """model.onnx=: the user's own ONNX embedder on OpenVINO; its identity is the file's hash plus preprocessing."""
    from poolwatch.pipeline.openvino_engine import read_onnx, with_uint8_input

    path = config.resolve_shared(config.model.onnx)
    if not path.is_file():
        raise ModelError(f"model.onnx: file {str(path)!r} does not exist")
    m = config.model
    mean, std = [float(x) for x in m.mean], [float(x) for x in m.std]
    preprocess: dict[str, Any] = {"input_size": m.input_size, "mean": mean, "std": std, "output": m.output}
    digest = file_sha256(path)
    weights_hash = "onnx:" + hashlib.sha256(json.dumps({"file": digest, **preprocess}, sort_keys=True).encode()).hexdigest()
    models_dir, root = config.shared_path / "models", artifacts_root(config)

    def request(ir: str) -> dict[str, Any]:
        key = artifacts.request_key(artifacts.onnx_request(digest, m.input_size, mean, std, m.output, ir))
        return {"kind": "onnx", "key": key, "models_dir": str(models_dir), "artifacts": str(root), "ir": ir,
                "path": str(path), **preprocess}

    def prepared() -> Any:
        model = read_onnx(path, m.output)
        try:
            return with_uint8_input(model, m.input_size, mean, std)
        except Exception as exc:  # noqa: BLE001 - shape inference refuses the size (a ViT's fixed positional embedding)
            last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
            raise ModelError(f"model.onnx: {str(path)!r} does not take an Nx3x{m.input_size}x{m.input_size} input "
                             f"(model.input_size): {last[:200]}") from None

    def info() -> ModelInfo:
        model = prepared()
        return ModelInfo(f"onnx:{path.name}", "onnx", str(path), weights_hash, {"onnx": path.name, **preprocess},
                         _onnx_dim(model, m.input_size, path), m.input_size, str(path))

    def build_here(req: dict[str, Any]) -> None:
        import openvino as ov

        model = prepared()
        details = info()
        artifact = artifacts.publish(root, artifacts.artifact_name(details, req["ir"]),
                                     lambda d: ov.save_model(model, str(d / "model.xml"), compress_to_fp16=False),
                                     {"info": details.to_json(), "ir": req["ir"], "created": time.time()})
        artifacts.remember(root, req["key"], artifact, details)

    def request_with_info(ir: str) -> dict[str, Any]:
        req = request(ir)
        if ir != "f32" and artifacts.lookup(root, req["key"]) is None:
            req["info"] = info().to_json()  # the child quantizes it
        return req

    (artifact, meta), calibration_hash = _artifact(root, request_with_info, calib, build_here, cancel, store)
    return OpenVINOEngine(artifact, ModelInfo.from_json(meta["info"]), replace(mode, calibration=calibration_hash))


def _onnx_dim(model: Any, input_size: int, path: Path) -> int:
    from poolwatch.pipeline.openvino_engine import _core

    try:
        out = _core().compile_model(model, "CPU").create_infer_request().infer(
            {0: np.zeros((1, input_size, input_size, 3), dtype=np.uint8)})[0]
    except Exception as exc:  # noqa: BLE001 - the model does not run on its declared input
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]  # the first lines are source locations
        raise ModelError(f"model.onnx: {str(path)!r} does not run on a 1x3x{input_size}x{input_size} input "
                         f"(model.input_size): {last[:200]}") from None
    if out.ndim < 2 or out.shape[0] != 1 or int(np.prod(out.shape[1:])) < 1:
        raise ModelError(f"model.onnx: {str(path)!r} gives an output of shape {tuple(out.shape)}; an embedding is N×D")
    return int(np.prod(out.shape[1:]))


def _torch_engine(config: Config, spec: ModelSpec, args: dict[str, Any], mode: Mode, on_gpu: bool) -> Engine:
    from poolwatch.pipeline.embed import Embedder, load_model, resolve_device

    if mode.precision == "int8":
        raise ModelError("embedding_precision: int8 runs on OpenVINO (CPU); this model runs on torch (model.runtime)")
    model = load_model(spec, models_dir=config.shared_path / "models", **args)
    device = resolve_device("cuda" if on_gpu else "cpu")
    configure_torch_threads()
    return Embedder(model, device, mode.precision, mode.exact_decode)


def _log_model(engine: Engine) -> None:
    info = engine.info
    for note in info.notes:
        log.warning("%s", note)
    log.info("model %s (%s: %s) on %s with %s %s, %s decode, input %dpx, %d-d embeddings, weights %s", info.name,
             info.source, info.detail, engine.device, engine.runtime, engine.precision,
             "exact" if engine.exact_decode else "scaled", info.input_size, info.dim, info.weights_hash[:12])


def awaits_calibration(store: Store, engine: Engine) -> bool:
    """Whether the store's mode is int8 and `engine` is the interim mode run until it can be calibrated."""
    recorded = store.setting("embedding") or {}
    return bool(recorded.get("precision") == "int8" and engine.precision != "int8" and engine.runtime == "openvino")


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
