"""The daemon's worker, reconciler, model manager and sampler in-process: a real store, the real
queue, a real (tiny) model, real files. The model's faults are injected by wrapping the real model."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry

from poolwatch.daemon import runtime
from poolwatch.daemon.ingest_queue import IngestQueue
from poolwatch.daemon.metrics import Metrics
from poolwatch.daemon.models import ModelManager
from poolwatch.daemon.reconciler import Reconciler
from poolwatch.daemon.sampler import Sampler
from poolwatch.daemon.worker import Worker
from poolwatch.pipeline.config import Config, load_config
from poolwatch.pipeline.discover import discover, plan
from poolwatch.pipeline.ingest import MAX_EMBED_ATTEMPTS
from poolwatch.pipeline.store import Store

from .conftest import FAST, encode, photo


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except sqlite3.Error:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class FlakyModel:
    """The real model, except that it raises on any batch holding an all-black image while `failing`, and
    on every batch while `broken` (a lost GPU)."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.failing = threading.Event()
        self.broken = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        if self.broken.is_set():
            raise RuntimeError("injected: the model fails on everything")
        if self.failing.is_set() and (batch.reshape(len(batch), -1).max(axis=1) == 0).any():
            raise RuntimeError("injected: the model failed on this image")
        return self.real.embed(batch)


@dataclass
class Parts:
    config: Config
    queue: IngestQueue
    models: ModelManager
    worker: Worker
    reconciler: Reconciler
    sampler: Sampler
    flaky: FlakyModel

    def row(self, relpath: str) -> dict[str, Any] | None:
        with Store.open(self.config.store_path) as store:
            return store.image_by_path(str(self.config.input_paths[0]), relpath)


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    inp, shared = tmp_path / "in", tmp_path / "shared"
    inp.mkdir()
    for i in range(6):
        (inp / f"img_{i}.jpg").write_bytes(encode(photo(i)))
    config = load_config([f"input_dir={inp}", f"shared_dir={shared}", *FAST, "lightly.collate.input_size=16",
                          "lightly.loader.num_workers=0", "watch.rescan_interval=0", "stopping_condition.n_samples=3"])
    metrics = Metrics(CollectorRegistry())
    queue = IngestQueue(100)
    flaky: list[FlakyModel] = []

    def loader(cfg: Config) -> Any:
        flaky.append(FlakyModel(runtime.load_engine(cfg)))
        return flaky[-1]

    def settings() -> Config:
        return config

    models = ModelManager(settings, metrics, loader=loader)
    models.start()
    reconciler = Reconciler(settings, queue, lambda: models.current().model_id, metrics)
    worker = Worker(settings, queue, models, None, metrics, reconciler.is_outage)
    sampler = Sampler(settings, metrics)
    p = Parts(config, queue, models, worker, reconciler, sampler, flaky[0])
    try:
        yield p
    finally:
        for c in (sampler, reconciler, worker, models):
            assert c.stop(30.0), f"{c.name} did not stop"


def scanned(p: Parts, before: int) -> Callable[[], bool]:
    return lambda: p.reconciler.scans > before and len(p.queue) == 0 and not p.worker.busy


def test_a_pending_image_is_retried_by_the_daemon_and_the_attempts_are_bounded(parts: Parts) -> None:
    p = parts
    inp = p.config.input_paths[0]
    Image.new("RGB", (64, 48)).save(inp / "black.png")
    p.flaky.failing.set()
    for c in (p.worker, p.reconciler):
        c.start()
    # The start-up scan: six photos ok, the black image pending after the model failed on it once.
    row = wait_for(lambda: (r := p.row("black.png")) and r["status"] == "pending" and r, 60, "black.png pending")
    assert row["reason"] == "embed_error" and row["attempts"] == 1, row
    wait_for(lambda: all((r := p.row(f"img_{i}.jpg")) and r["status"] == "ok" for i in range(6)), 60, "the photos")

    # The model works again: the next reconcile scan retries the pending image (same size and mtime).
    p.flaky.failing.clear()
    p.reconciler.request()
    row = wait_for(lambda: (r := p.row("black.png")) and r["status"] == "ok" and r, 60, "black.png retried and ok")
    assert row["attempts"] == 0
    with Store.open(p.config.store_path) as store:
        assert store.has_vector(int(row["id"]), p.models.current().model_id)

    # A model that fails on everything (a lost GPU) uses up no image's attempts.
    p.flaky.broken.set()
    (inp / "while_broken.jpg").write_bytes(encode(photo(50)))
    p.reconciler.request()
    row = wait_for(lambda: (r := p.row("while_broken.jpg")) and r["status"] == "pending" and r, 60, "pending")
    assert row["attempts"] == 0, row
    p.flaky.broken.clear()

    # A file the model always fails on (while it embeds the others) is retried MAX_EMBED_ATTEMPTS times,
    # then it is corrupt.
    Image.new("RGB", (40, 30)).save(inp / "black2.png")
    p.flaky.failing.set()
    for attempt in range(1, MAX_EMBED_ATTEMPTS + 1):
        (inp / f"companion_{attempt}.jpg").write_bytes(encode(photo(60 + attempt)))
        p.reconciler.request()  # no watcher here: each scan finds it (again), with a new companion
        wait_for(lambda a=attempt: (r := p.row("black2.png")) and r["attempts"] == a, 60, f"attempt {attempt}")
    before = p.reconciler.scans
    p.reconciler.request()
    wait_for(scanned(p, before), 60, "one more reconcile scan")
    row = p.row("black2.png")
    assert row is not None and row["status"] == "corrupt" and row["reason"] == "embed_error", row
    with Store.open(p.config.store_path) as store:
        todo, gone, back = plan(store, inp, discover(inp), p.models.current().model_id)
    assert todo == [] and gone == [] and back == []  # nothing loops for ever


def test_the_sampler_runs_on_request_and_queues_one_more(parts: Parts) -> None:
    p = parts
    for c in (p.worker, p.reconciler):
        c.start()
    wait_for(lambda: all((r := p.row(f"img_{i}.jpg")) and r["status"] == "ok" for i in range(6)), 60, "ingest")
    p.sampler.start()
    assert p.sampler.request("signal") == "queued"
    wait_for(lambda: p.sampler.completed == 1 and p.sampler.idle(), 120, "the sampling run")
    with Store.open(p.config.store_path) as store:
        runs = store.runs()
    assert [(r["trigger"], r["status"], r["n_selected"]) for r in runs] == [("signal", "ok", 3)]
    assert (Path(runs[0]["output_dir"]) / "filenames" / "sampled_filenames.txt").read_text().count("\n") == 3
