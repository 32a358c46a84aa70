"""`poolwatch ingest --ray`: a backlog turned into verdicts and vectors by Ray actors, committed here.

The driver (this process) discovers and plans exactly as a local pass does (`pipeline.ingest.ingest_pass`) and
stays the store's one writer; only the per-file work moves out. Each actor holds one engine and a decode pool,
both sized by its reserved CPUs; it takes shards of files (`ray.shard_size`) and sends back, per file, what
`read_and_decode` and `embed_resilient` give without the pixels (`pipeline.ingest.Made`). CPU actors run the
driver's own model: the OpenVINO artifact the driver loaded (`runtime.load_engine`, as `poolwatch ingest`) travels
once through Ray's object store, so a node needs neither the store nor the weights, and nothing is exported twice.
GPU actors (`ray.num_gpus_per_actor`), and a driver whose engine is torch, load their engine as `poolwatch ingest`
does (`runtime.load_engine` on the node: its shared_dir or store.url, the weights at the same paths). Either way
the driver checks that every actor's model identity is the one it registered in the store. The driver feeds the
actors directly, a few shards ahead of each, puts the results back into plan order and cuts them into the
batches a local pass makes (`made_elsewhere`), so commits, exact and near duplicates, the threshold's
calibration, outages, missing and revived files are the local pass's own code at the same points. A driver
killed at any point loses nothing committed: a rerun plans only what is left.

Feeding the actors from the driver was measured against Ray Data (`map_batches` on an actor pool, order
preserved) on the same actors: see bench/ray_ingest.py and docs/BENCHMARKS.md, *Backlog ingest on Ray*.

Every node needs poolwatch installed (the same version) and the input dirs at the same paths (the actors read
the files themselves). Ray is imported only here, only with --ray.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import secrets
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

from poolwatch.pipeline.config import Config
from poolwatch.pipeline.decode import DecodeSettings, FileRef
from poolwatch.pipeline.engine import Engine, Mode
from poolwatch.pipeline.errors import StateError, UsageError
from poolwatch.pipeline.ingest import Made, SourcedBatch, embed_resilient, made_elsewhere, start_decoding
from poolwatch.pipeline.modelspec import ModelInfo
from poolwatch.pipeline.openvino_engine import OpenVINOEngine, runnable

from . import runtime

log = logging.getLogger(__name__)

PIP_COMMAND = "pip install 'poolwatch[ray]'"
ACTOR_START_TIMEOUT = 300.0  # seconds for the actors to start (a node loading its own engine may export it first)
SHARDS_AHEAD = 3  # shards queued on each actor: one embedding, one decoding, one waiting while the driver commits
ACTOR_CONCURRENCY = 2  # calls an actor runs at once: a shard decodes while the one before it is embedded
AUTH_MODE_ENV, AUTH_TOKEN_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"
ENV_PASSED = (runtime.ARTIFACTS_ENV, runtime.WEIGHTS_ENV)  # the driver's, for actors that load their own engine


def missing_ray_message(exc: ImportError) -> str:
    return f"ingest --ray needs Ray ({exc}); install it with: {PIP_COMMAND}"


def require_ray(config: Config | None = None) -> ModuleType:
    """The ray module; a UsageError (one line naming the pip command, exit 2) where it is not installed. With the
    `config` of a pass that starts its own cluster (ray.address=''), Ray is set up for it first (`own_token`)."""
    if config is not None and not config.ray.address:
        own_token()
    try:
        import ray
    except ImportError as exc:
        raise UsageError(missing_ray_message(exc)) from None
    return ray


def own_token() -> None:
    """Token authentication with a token of this process's own for the cluster it starts: a new local cluster would
    otherwise write one to ~/.ray/auth_token, which every later `ray start` of this user then requires (and which
    drivers without it then fail to join). Ray reads these when it is imported: not where it is in the process
    already, nor where the user chose (RAY_AUTH_MODE or RAY_AUTH_TOKEN set)."""
    if "ray" not in sys.modules and AUTH_MODE_ENV not in os.environ and AUTH_TOKEN_ENV not in os.environ:
        os.environ[AUTH_MODE_ENV], os.environ[AUTH_TOKEN_ENV] = "token", secrets.token_hex(32)


def actor_threads(num_cpus: float) -> int:
    """The engine threads of an actor that reserves `num_cpus` CPUs (at least one)."""
    return max(1, math.floor(num_cpus))


@dataclass(frozen=True)
class Shipped:
    """The driver's OpenVINO engine as an actor rebuilds it: its artifact's files, its model and its mode."""

    name: str
    files: dict[str, bytes]
    info: ModelInfo
    mode: Mode

    @classmethod
    def of(cls, engine: Engine) -> Shipped | None:
        """None where the engine is not an OpenVINO artifact (torch on the CPU): actors load their own then."""
        if not isinstance(engine, OpenVINOEngine):
            return None
        files = {p.name: p.read_bytes() for p in sorted(engine.artifact.iterdir()) if p.is_file()}
        return cls(engine.artifact.name, files, engine.info, engine.mode)

    def engine(self, threads: int) -> OpenVINOEngine:
        """Compiled for this node's CPU on `threads` threads; the files are written to a temp dir only for that."""
        with tempfile.TemporaryDirectory(prefix="poolwatch-ray-") as tmp:
            folder = Path(tmp) / self.name
            folder.mkdir()
            for name, data in self.files.items():
                (folder / name).write_bytes(data)
            return OpenVINOEngine(folder, self.info, self.mode, threads=threads)


def engine_threads(engine: Engine) -> int | None:
    """How many threads `engine` runs the model on (OpenVINO's compiled setting, or torch's), None if unknown."""
    compiled = getattr(engine, "_compiled", None)
    if compiled is not None:
        try:
            return int(compiled.get_property("INFERENCE_NUM_THREADS"))
        except Exception:  # noqa: BLE001 - an OpenVINO that does not report it
            return None
    torch = sys.modules.get("torch")
    return int(torch.get_num_threads()) if torch is not None else None


@dataclass(frozen=True)
class ActorInfo:
    identity: str
    node: str
    pid: int
    runtime: str
    device: str
    precision: str
    native: bool  # the node runs this precision natively (a bf16 hint on a CPU without bf16 would compute in fp32)
    threads: int | None
    decode_workers: int


class ShardWorker:
    """What one Ray actor holds: an engine and a decode pool, both sized by the actor's reserved CPUs (`threads`),
    as are the BLAS and OpenMP pools (threadpoolctl). The engine is the driver's (`shipped`), or loaded here as
    `poolwatch ingest` loads one (`config`: its device is the actor's). `process` turns a shard of files into
    `Made`s (verdicts, quality signals, vectors; no pixels); two calls run at once, so one shard decodes in the pool
    while the one before it is embedded."""

    def __init__(self, config: Config, settings: DecodeSettings, threads: int, log_level: int, env: dict[str, str],
                 shipped: Shipped | None) -> None:
        from threadpoolctl import threadpool_limits

        os.environ.update(env)  # here rather than as a runtime_env: Ray then reuses its started workers (~0.6 s)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # for the processes it starts
        threadpool_limits(limits=threads)
        runtime.setup_logging(logging.getLevelName(log_level))
        logging.getLogger("poolwatch").setLevel(log_level)
        if shipped is not None:
            self.engine: Engine = shipped.engine(threads)
        else:
            loading = logging.getLogger(runtime.__name__)
            loading.setLevel(logging.ERROR)  # the driver has said what there is to say about this model, once
            try:
                self.engine = runtime.load_engine(config)
            finally:
                loading.setLevel(logging.NOTSET)
            torch = sys.modules.get("torch")
            if torch is not None:  # load_engine gives torch every core of the node
                torch.set_num_threads(threads)
        self.settings = settings
        self.executor = runtime.decode_executor(config)
        self._model = threading.Lock()  # one inference request: one embed at a time

    def describe(self) -> ActorInfo:
        e = self.engine
        native = runnable(e.precision) if e.runtime == "openvino" else True
        return ActorInfo(e.identity, platform.node() or socket.gethostname(), os.getpid(), e.runtime, e.device,
                         e.precision, native, engine_threads(e),
                         self.executor.workers if self.executor is not None else 0)

    def process(self, refs: Sequence[FileRef]) -> list[Made]:
        decoded = start_decoding(refs, self.settings, self.executor).collect()
        pixels = {i: d.pixels for i, d in enumerate(decoded)
                  if d.pixels is not None and d.verdict is not None and d.verdict.ok}
        with self._model:
            before, start = self.engine.forward_passes, time.perf_counter()
            vectors, failed = embed_resilient(self.engine, pixels)
            seconds, passes = time.perf_counter() - start, self.engine.forward_passes - before
        share = seconds / len(pixels) if pixels else 0.0
        made = [Made(replace(d, pixels=None), vectors.get(i), failed.get(i), share if i in pixels else 0.0)
                for i, d in enumerate(decoded)]
        if made:
            made[0].forward_passes = passes
        return made

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


def actor_config(config: Config, threads: int) -> Config:
    """The driver's configuration as an actor uses it: its device by its reservation (GPUs: cuda, else the CPU),
    its decode workers its reserved CPUs (none where the driver's config decodes in-process)."""
    gpus = config.ray.num_gpus_per_actor
    if gpus > 0 and config.device == "cpu":
        raise UsageError(f"ray.num_gpus_per_actor={gpus} reserves GPUs, but device=cpu; set device=auto or cuda")
    loader = dict(config.lightly.get("loader") or {})
    if int(config.lightly_get("loader.num_workers")) != 0:
        loader["num_workers"] = threads
    return config.model_copy(update={"device": "cuda" if gpus > 0 else "cpu",
                                     "lightly": {**config.lightly, "loader": loader}})


def plan_actors(config: Config, resources: dict[str, float]) -> int:
    """ray.num_actors, or (0) as many as the cluster's CPUs and GPUs hold at the per-actor reservation."""
    r = config.ray
    if r.num_actors:
        return r.num_actors
    fit = int(resources.get("CPU", 0) // r.num_cpus_per_actor)
    if r.num_gpus_per_actor > 0:
        fit = min(fit, int(resources.get("GPU", 0) // r.num_gpus_per_actor))
    return max(1, fit)


class RaySource:
    """A batch source for `ingest_pass` (pipeline.ingest.BatchSource) backed by Ray actors. The cluster is
    joined (or started) and the actors loaded on the first call that has files to process, so a pass with nothing
    left starts nothing; `close` stops the actors and leaves the cluster (a local one stops)."""

    def __init__(self, config: Config, engine: Engine, settings: DecodeSettings) -> None:
        self.config = config
        self.engine = engine
        self.identity = engine.identity
        self.settings = settings
        self.ray = require_ray(config)
        self.actors: list[Any] = []
        self.infos: list[ActorInfo] = []
        self._model: Any = None
        self._connected = False

    def __call__(self, todo: Sequence[FileRef], batch_size: int) -> Iterator[SourcedBatch]:
        if not todo:
            return
        if not self._connected:
            self._connect()
        if not self.actors:
            self._start_actors()
        start, committing = time.perf_counter(), 0.0
        for batch in made_elsewhere(self._made(todo), batch_size, len(self.actors)):
            handed = time.perf_counter()
            yield batch
            committing += time.perf_counter() - handed
        seconds = time.perf_counter() - start
        rate = len(todo) / seconds if seconds > 0 else 0.0
        # The driver's own share (commits, near-duplicate lookups, the calibration) bounds how far this scales: one
        # writer, at most len(todo) / committing files/s however many actors feed it.
        log.info("Ray: %d files on %d actors in %.1fs: %.1f files/s, %.1f files/s per actor; the driver spent %.1fs "
                 "of it committing (at most %.0f files/s)", len(todo), len(self.actors), seconds, rate,
                 rate / len(self.actors), committing, len(todo) / committing if committing > 0 else float("inf"))

    def _connect(self) -> None:
        ray, address = self.ray, self.config.ray.address
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # poolwatch sends nothing anywhere; Ray asks before it does
        quiet = max(logging.WARNING, logging.getLogger("poolwatch").getEffectiveLevel())
        try:
            if address:
                ray.init(address=address, logging_level=quiet, log_to_driver=True)
            else:
                # "local": a new cluster even where one runs already (ray.init alone would join it)
                ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, logging_level=quiet,
                         log_to_driver=True)
        except ConnectionError as exc:
            hint = ""
            if any(type(e).__name__ == "AuthenticationError" for e in _causes(exc)):
                hint = (f" (the cluster wants a token: set {AUTH_MODE_ENV}=token and {AUTH_TOKEN_ENV}, or the token "
                        "in ~/.ray/auth_token)")
            raise StateError(f"ray.address={address}: cannot join the Ray cluster: {_last_line(exc)}{hint}") from None
        self._connected = True
        total = ray.cluster_resources()
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        if address:
            log.info("joined the Ray cluster at %s: %d nodes, %g CPUs, %g GPUs", address, nodes, total.get("CPU", 0),
                     total.get("GPU", 0))
        else:
            log.info("started a local Ray cluster with this machine's %g CPUs (%g GPUs)", total.get("CPU", 0),
                     total.get("GPU", 0))

    def _start_actors(self) -> None:
        ray, r = self.ray, self.config.ray
        total = ray.cluster_resources()
        n = plan_actors(self.config, ray.available_resources())
        if n * r.num_cpus_per_actor > total.get("CPU", 0) or n * r.num_gpus_per_actor > total.get("GPU", 0):
            log.warning("ray.num_actors=%d at %g CPUs and %g GPUs each is more than the cluster has (%g CPUs, %g GPUs): "
                        "the actors that find no room within %.0fs are left out", n, r.num_cpus_per_actor,
                        r.num_gpus_per_actor, total.get("CPU", 0), total.get("GPU", 0), ACTOR_START_TIMEOUT)
        threads = actor_threads(r.num_cpus_per_actor)
        config = actor_config(self.config, threads)
        env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
        shipped = Shipped.of(self.engine) if r.num_gpus_per_actor == 0 else None
        self._model = model = ray.put(shipped)  # once (the actors of a node share a copy); kept for restarts
        remote = ray.remote(ShardWorker).options(
            num_cpus=r.num_cpus_per_actor, num_gpus=r.num_gpus_per_actor, max_concurrency=ACTOR_CONCURRENCY,
            max_restarts=1, max_task_retries=1, scheduling_strategy="SPREAD")
        level = max(logging.WARNING, logging.getLogger("poolwatch").getEffectiveLevel())
        began = time.perf_counter()
        actors = [remote.remote(config, self.settings, threads, level, env, model) for _ in range(n)]
        pending = {a.describe.remote(): a for a in actors}
        ready: list[tuple[Any, ActorInfo]] = []
        deadline = time.monotonic() + ACTOR_START_TIMEOUT
        try:
            while pending and time.monotonic() < deadline:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
                for ref in done:
                    actor = pending.pop(ref)
                    ready.append((actor, self._get(ref, "loading its engine")))
        except BaseException:
            for a in actors:
                ray.kill(a)
            raise
        for actor in pending.values():
            ray.kill(actor)
        if not ready:
            raise StateError(f"ingest --ray: no actor started within {ACTOR_START_TIMEOUT:.0f}s (each needs "
                             f"{r.num_cpus_per_actor:g} CPUs, {r.num_gpus_per_actor:g} GPUs; the cluster has "
                             f"{ray.available_resources()} free)")
        if pending:
            log.warning("%d of %d actors found no room on the cluster within %.0fs; going on with %d", len(pending), n,
                        ACTOR_START_TIMEOUT, len(ready))
        self.actors = [a for a, _ in ready]
        self.infos = [i for _, i in ready]
        wrong = [i for i in self.infos if i.identity != self.identity]
        if wrong:  # every vector of the pass is stamped with the driver's model id
            w = wrong[0]
            raise StateError(f"ingest --ray: the actor on {w.node} (pid {w.pid}) loaded the model {w.identity[:20]} "
                             f"({w.runtime} {w.precision} on {w.device}), the store's is {self.identity[:20]}: a node "
                             "that loads its own engine needs the same weights, store and settings (device, "
                             "embedding_precision, model.runtime)")
        foreign = [i for i in self.infos if not i.native]
        if foreign:
            raise StateError(f"ingest --ray: the CPU of {foreign[0].node} does not run {foreign[0].precision} natively "
                             "(OpenVINO would compute in another precision: other vectors under the same model id); "
                             "give the pass only nodes that do, or embedding_precision=fp32 on a new store")
        for i in self.infos:
            log.debug("actor pid %d on %s: %s %s on %s, %s threads, %d decode workers", i.pid, i.node, i.runtime,
                      i.precision, i.device, i.threads, i.decode_workers)
            if i.threads is not None and i.threads > threads:
                log.warning("the actor on %s (pid %d) runs its engine on %d threads, more than the %d CPUs it reserves",
                            i.node, i.pid, i.threads, threads)
        first = self.infos[0]
        log.info("%d actors ready in %.1fs on %d nodes: %s %s on %s, %s threads and %d decode workers each "
                 "(%g CPUs, %g GPUs reserved), model %s", len(self.actors), time.perf_counter() - began,
                 len({i.node for i in self.infos}), first.runtime, first.precision, first.device, first.threads,
                 first.decode_workers, r.num_cpus_per_actor, r.num_gpus_per_actor, self.identity[:12])

    def _made(self, todo: Sequence[FileRef]) -> Iterator[Made]:
        """Every file's result in plan order; each actor has up to SHARDS_AHEAD shards queued, the least loaded
        gets the next one, and results that come back early wait for the ones before them."""
        ray, size = self.ray, self.config.ray.shard_size
        shards = [list(todo[i:i + size]) for i in range(0, len(todo), size)]
        queued = {i: 0 for i in range(len(self.actors))}
        in_flight: dict[Any, tuple[int, int]] = {}  # object ref -> (shard, actor)
        done: dict[int, list[Made]] = {}
        submitted = given = 0
        while given < len(shards):
            while submitted < len(shards):
                actor = min(queued, key=queued.__getitem__)
                if queued[actor] >= SHARDS_AHEAD:
                    break
                in_flight[self.actors[actor].process.remote(shards[submitted])] = (submitted, actor)
                queued[actor] += 1
                submitted += 1
            if given in done:
                yield from done.pop(given)
                given += 1
                continue
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            for ref in ready:
                shard, actor = in_flight.pop(ref)
                queued[actor] -= 1
                done[shard] = self._get(ref, f"a shard from {shards[shard][0].relpath!r}")

    def _get(self, ref: Any, what: str) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            # An actor that died (twice: it is restarted once and its shard retried) or raised: one line, and
            # what is committed stays; a rerun goes on from there.
            cause = getattr(exc, "cause", None) or exc
            line = _last_line(cause)
            hint = "; every Ray node needs poolwatch installed, the same version" if "module named 'poolwatch" in line \
                else ""
            raise StateError(f"ingest --ray: an actor failed on {what}: {type(cause).__name__}: {line}{hint}") from None

    def close(self) -> None:
        """Stop the actors (their decode pools first) and leave the cluster; a local one stops with it."""
        if not self._connected:
            return
        ray = self.ray
        try:
            if self.actors:
                ray.wait([a.close.remote() for a in self.actors], num_returns=len(self.actors), timeout=30)
            for a in self.actors:
                ray.kill(a)
        finally:
            self.actors, self._model = [], None
            ray.shutdown()
            self._connected = False


def _last_line(exc: BaseException) -> str:
    """The line of an error that says what failed (Ray's come with tracebacks and advice before it)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _causes(exc: BaseException) -> Iterator[BaseException]:
    seen: BaseException | None = exc
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__
