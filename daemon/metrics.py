"""Prometheus metrics and the /metrics + /healthz HTTP endpoint.

All metrics live in a registry passed in (one per daemon, one per test). Names follow
`poolwatch_<what>_<unit>`; label sets are bounded (reasons, triggers, outcomes, pools, roots, components;
sources through `SourceLabels`, a cap with `other` beyond it). deploy/grafana/poolwatch.json and
deploy/prometheus/alerts.yml name only metrics defined here (tests/test_monitoring.py checks it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from poolwatch import __version__

log = logging.getLogger(__name__)

# poolwatch_source_images_total{verdict}: exclusive, one per image (an ok image that is a near duplicate
# counts only as near_duplicate).
VERDICTS = ("ok", "corrupt", "duplicate", "near_duplicate")
# poolwatch_source_quality_flags_total{flag}: an image may carry several.
QUALITY_FLAGS = ("blurry", "dark", "bright", "low_information", "odd_aspect")
OTHER_SOURCE = "other"
# L2 distance of a new image to the datapool. Vectors are L2-normalised by default (0..2): a stuck camera
# sits near 0, near copies at ~0.01-0.1, new views at ~0.3-1.5; the tail above 2 is for unnormalised models.
NOVELTY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 5.0, 10.0, 50.0)
LOOKUP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class SourceLabels:
    """Bounded `source` label values: the first `cap` distinct sources seen keep their name, later ones
    are `other`. A source once admitted stays admitted (its series never move). Thread-safe."""

    def __init__(self, cap: int) -> None:
        if cap < 0:
            raise ValueError(f"source cap must be >= 0, not {cap}")
        self.cap = cap
        self._admitted: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, source: str) -> str:
        with self._lock:
            if source in self._admitted:
                return source
            if len(self._admitted) < self.cap:
                self._admitted.add(source)
                return source
            return OTHER_SOURCE

    def admitted(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._admitted)


class _HealthCollector(Collector):
    """poolwatch_component_healthy{component}: read from a callback at each scrape, so it shows the state
    now (components that appear later included); before `watch` it has no samples."""

    NAME = "poolwatch_component_healthy"
    HELP = "1 while a daemon component is alive and not stalled"

    def __init__(self) -> None:
        self._fn: Callable[[], Mapping[str, bool]] | None = None

    def watch(self, fn: Callable[[], Mapping[str, bool]]) -> None:
        self._fn = fn

    def describe(self) -> Iterator[Metric]:  # lets the registry check the name without calling fn
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["component"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["component"])
        fn = self._fn
        if fn is not None:
            try:
                states = dict(fn())
            except Exception:  # a scrape must not fail because of it: no samples this time, and a log line
                log.exception("reading component health for /metrics failed")
                states = {}
            for component, healthy in sorted(states.items()):
                family.add_metric([str(component)], 1.0 if healthy else 0.0)
        yield family


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, source_cap: int = 64) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.start_time = Gauge("poolwatch_start_time_seconds", "When this daemon process started", registry=r)
        self.start_time.set(time.time())
        self.discovered = Counter("poolwatch_images_discovered_total",
                                  "Image files handed to ingest (events and scans)", registry=r)
        self.ingested = Counter("poolwatch_images_ingested_total",
                                "Images checked and recorded, by verdict", ["status"], registry=r)
        self.corrupt = Counter("poolwatch_images_corrupt_total", "Corrupt images, by reason", ["reason"], registry=r)
        self.duplicate = Counter("poolwatch_images_duplicate_total", "Exact duplicates found", registry=r)
        self.missing = Counter("poolwatch_images_missing_total", "Images whose file disappeared", registry=r)
        self.queue_depth = Gauge("poolwatch_ingest_queue_depth", "Files waiting in the ingest queue", registry=r)
        self.batch_seconds = Histogram("poolwatch_embedding_batch_duration_seconds", "Wall time of one ingest batch",
                                       buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.batch_size = Histogram("poolwatch_embedding_batch_size", "Images per ingest batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.efficiency = Gauge("poolwatch_compute_efficiency", "Model compute time / total batch time",
                                ["window"], registry=r)
        self.images_per_second = Gauge("poolwatch_images_per_second", "Ingest throughput (smoothed)", registry=r)
        self.runs = Counter("poolwatch_sampling_runs_total", "Sampling runs, by trigger and outcome",
                            ["trigger", "outcome"], registry=r)
        self.runs_skipped = Counter("poolwatch_sampling_runs_skipped_total",
                                    "Scheduled sampling runs skipped because another node's run held the store's lock",
                                    ["trigger"], registry=r)
        self.run_seconds = Histogram("poolwatch_sampling_run_duration_seconds", "Duration of sampling runs",
                                     buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800), registry=r)
        self.last_candidates = Gauge("poolwatch_last_run_candidates", "Candidates of the last successful run", registry=r)
        self.last_selected = Gauge("poolwatch_last_run_selected", "Images selected by the last successful run", registry=r)
        self.last_success = Gauge("poolwatch_last_successful_run_timestamp_seconds", "When the last run succeeded", registry=r)
        self.pool_size = Gauge("poolwatch_datapool_size", "Members of each datapool", ["pool"], registry=r)
        self.model_info = Info("poolwatch_model", "The current embedding model", registry=r)
        self.model_dim = Gauge("poolwatch_model_embedding_dimension", "Embedding size of the current model", registry=r)
        self.reembedding = Gauge("poolwatch_reembedding_progress_ratio",
                                 "Share of ok images with a vector of the current model (1 = sampling uses it)", registry=r)
        self.reloads = Counter("poolwatch_config_reloads_total",
                               "Configuration reloads (SIGHUP), by outcome", ["outcome"], registry=r)
        self.overflows = Counter("poolwatch_watcher_overflows_total",
                                 "inotify queue overflows (lost events, each followed by a reconcile scan)", registry=r)
        self.outages = Counter("poolwatch_watcher_outages_total",
                               "Input directories that went missing/unreadable", ["root"], registry=r)
        self.outage_active = Gauge("poolwatch_watcher_outage",
                                   "1 while an input directory is missing/unreadable", ["root"], registry=r)
        self.component_restarts = Counter("poolwatch_component_restarts_total",
                                          "Components restarted after a crash", ["component"], registry=r)
        self.report_failures = Counter("poolwatch_report_failures_total", "Report generations that failed", registry=r)
        # ---- per source (an input root, or its first-level subfolder with source.depth=1) ----
        self.source_labels = SourceLabels(source_cap)
        self.source_images = Counter("poolwatch_source_images_total",
                                     "Images ingested per source, by verdict (ok, corrupt, duplicate, near_duplicate; "
                                     "one each)", ["source", "verdict"], registry=r)
        self.source_quality = Counter("poolwatch_source_quality_flags_total",
                                      "Quality flags raised per source (blurry, dark, bright, low_information, odd_aspect)",
                                      ["source", "flag"], registry=r)
        self.source_novelty = Histogram("poolwatch_source_novelty_distance",
                                        "L2 distance of each new ok image to the nearest datapool member "
                                        "(to the nearest stored image when there is no pool)",
                                        ["source"], buckets=NOVELTY_BUCKETS, registry=r)
        # ---- near-duplicate detection ----
        self.near_duplicate_threshold = Gauge("poolwatch_near_duplicate_threshold",
                                              "L2 distance below which an image is a near duplicate, for the current "
                                              "model (-1: off or not calibrated yet)", registry=r)
        self.near_duplicate_threshold.set(-1)
        self.near_index_vectors = Gauge("poolwatch_near_duplicate_index_vectors",
                                        "Vectors in the near-duplicate index", registry=r)
        self.near_lookup_seconds = Histogram("poolwatch_near_duplicate_lookup_seconds",
                                             "Nearest-neighbour lookup of one batch", buckets=LOOKUP_BUCKETS, registry=r)
        self.component_healthy = _HealthCollector()
        r.register(self.component_healthy)
        self.build = Info("poolwatch_build", "poolwatch build information", registry=r)
        self.build.info({"version": __version__})
        for outcome in ("ok", "failed"):
            self.reloads.labels(outcome)
        self._ema_eff: float | None = None
        self._ema_rate: float | None = None
        self._sources_seen: set[str] = set()
        self._sources_lock = threading.Lock()

    def watch_health(self, fn: Callable[[], Mapping[str, bool]]) -> None:
        """poolwatch_component_healthy{component} reads fn() (component name -> alive and not stalled) at
        each scrape; called on the HTTP server's thread, so fn must be cheap and thread-safe."""
        self.component_healthy.watch(fn)

    def record_source(self, source: str, verdict: str, flags: Sequence[str], novelty: float | None) -> None:
        """One ingested image of `source` (capped: see SourceLabels): its verdict (VERDICTS), quality flags
        (QUALITY_FLAGS) and novelty (None: not measured; observed when finite)."""
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r} (one of {', '.join(VERDICTS)})")
        unknown = [f for f in flags if f not in QUALITY_FLAGS]
        if unknown:
            raise ValueError(f"unknown quality flag(s) {unknown} (known: {', '.join(QUALITY_FLAGS)})")
        label = self.source_labels(source)
        self._init_source(label)
        self.source_images.labels(label, verdict).inc()
        for flag in flags:
            self.source_quality.labels(label, flag).inc()
        if novelty is not None and math.isfinite(novelty):
            self.source_novelty.labels(label).observe(novelty)

    def _init_source(self, label: str) -> None:
        """All of a source's series from its first image on, at 0: rate() and shares see the first
        increments, and a verdict that never happens reads 0 rather than no data."""
        with self._sources_lock:
            if label in self._sources_seen:
                return
            self._sources_seen.add(label)
        for verdict in VERDICTS:
            self.source_images.labels(label, verdict)
        for flag in QUALITY_FLAGS:
            self.source_quality.labels(label, flag)
        self.source_novelty.labels(label)

    def smoothed_efficiency(self) -> float | None:
        return None if self._ema_eff is None else round(self._ema_eff, 4)

    def observe_batch(self, files: int, seconds: float, compute_seconds: float, alpha: float = 0.2) -> None:
        eff = compute_seconds / seconds if seconds > 0 else 0.0
        eff = min(max(eff, 0.0), 1.0)
        rate = files / seconds if seconds > 0 else 0.0
        self._ema_eff = eff if self._ema_eff is None else (1 - alpha) * self._ema_eff + alpha * eff
        self._ema_rate = rate if self._ema_rate is None else (1 - alpha) * self._ema_rate + alpha * rate
        self.efficiency.labels("last_batch").set(eff)
        self.efficiency.labels("smoothed").set(self._ema_eff)
        self.images_per_second.set(self._ema_rate)
        self.batch_seconds.observe(seconds)
        self.batch_size.observe(files)


REQUEST_TIMEOUT = 5.0  # seconds a client may take to send its request; an idle connection is closed after it


class _QuietHandler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT  # socketserver applies it to the connection: an idle client cannot hold a thread

    def log_message(self, format: str, *args: object) -> None:  # the stdlib names it `format`
        log.debug("http: " + format, *args)


class MetricsServer:
    """/metrics (Prometheus text format) and /healthz (200 healthy, 503 not); a daemon component.

    prometheus_client's ThreadingWSGIServer serves each connection on a thread of its own, and every
    connection has a timeout, so idle or slow clients (the port may be reachable by anyone) never keep
    /healthz from answering. Other paths get 404; HEAD answers like GET without a body. The socket is
    bound in `start`, so a port in use fails the daemon's start."""

    name = "metrics"

    def __init__(self, metrics: Metrics, host: str, port: int, healthy: Callable[[], tuple[bool, str]]) -> None:
        self.metrics, self.host, self.requested_port, self.healthy = metrics, host, port, healthy
        self.server: WSGIServer | None = None
        self.thread: threading.Thread | None = None

    def _app(self) -> Callable[[dict[str, Any], Callable[..., Any]], list[bytes]]:
        metrics_app = make_wsgi_app(self.metrics.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
            if method not in ("GET", "HEAD"):
                start_response("405 Method Not Allowed", [("Content-Type", "text/plain"), ("Allow", "GET, HEAD")])
                body = [b"method not allowed\n"]
            elif path == "/healthz":
                ok, why = self.healthy()
                start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
                body = [(("ok: " if ok else "unhealthy: ") + why + "\n").encode()]
            elif path in ("/metrics", "/"):
                body = list(metrics_app({**environ, "REQUEST_METHOD": "GET"}, start_response))
            else:
                start_response("404 Not Found", [("Content-Type", "text/plain")])
                body = [b"not found: try /metrics or /healthz\n"]
            return [] if method == "HEAD" else body

        return app

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> None:
        try:
            self.server = make_server(self.host, self.requested_port, self._app(), ThreadingWSGIServer,
                                      handler_class=_QuietHandler)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics.port {self.requested_port} on {self.host}: {exc.strerror}") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics-http", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics (health: /healthz)", self.server.server_address[0], self.port)

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def health(self) -> str:
        return f"port {self.requested_port}" if self.alive() else "DEAD"

    def request_stop(self) -> None:
        """Nothing early: /healthz and /metrics keep answering (503 "stopping") until the worker has stopped."""

    def stop(self, timeout: float = 5.0) -> bool:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        if self.thread is not None:
            self.thread.join(timeout)
            return not self.thread.is_alive()
        return True
