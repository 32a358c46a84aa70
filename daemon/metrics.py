"""Prometheus metrics and the /metrics + /healthz HTTP endpoint.

All metrics live in a registry passed in (one per daemon, one per test). Names follow
`poolwatch_<what>_<unit>`; label sets are bounded (reasons, triggers, outcomes, pools, roots).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from poolwatch import __version__

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
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
        self.build = Info("poolwatch_build", "poolwatch build information", registry=r)
        self.build.info({"version": __version__})
        for outcome in ("ok", "failed"):
            self.reloads.labels(outcome)
        self._ema_eff: float | None = None
        self._ema_rate: float | None = None

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
