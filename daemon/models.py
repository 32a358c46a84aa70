"""The model manager: the one place that knows the current model.

It loads the configured model at start (and registers it in the store), hands out an immutable
`ModelState` to whoever embeds, switches to another model when a reload asks for one (new files use
it at once, a reconcile scan re-embeds the store in the background, sampling keeps the old model's
vectors until the new one covers every image), and watches that re-embedding's progress.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from poolwatch.pipeline.config import Config
from poolwatch.pipeline.engine import CALIBRATION_COUNT
from poolwatch.pipeline.ingest import activate_model
from poolwatch.pipeline.store import open_store

from . import runtime
from .component import ThreadComponent
from .metrics import Metrics

if TYPE_CHECKING:
    from poolwatch.pipeline.engine import Engine

log = logging.getLogger(__name__)

COVERAGE_EVERY = 5.0  # seconds between re-embedding progress checks
CALIBRATION_RETRY = 600.0  # seconds before a failed int8 calibration is tried again
# Settings that make another model; a reload that changes one of them switches models.
MODEL_KEYS = ("checkpoint", "device", "model", "embedding_precision")
CHECK_MODEL_KEYS = ("exact_decode",)  # the decode mode changes the pixels: another model
LIGHTLY_MODEL_KEYS = ("model", "collate", "pre_trained")


def model_changed(old: Config, new: Config) -> bool:
    return (any(getattr(new, k) != getattr(old, k) for k in MODEL_KEYS)
            or any(getattr(new.check, k) != getattr(old.check, k) for k in CHECK_MODEL_KEYS)
            or any(new.lightly.get(k) != old.lightly.get(k) for k in LIGHTLY_MODEL_KEYS))


@dataclass(frozen=True)
class ModelState:
    embedder: Engine
    model_id: int

    @property
    def input_size(self) -> int:
        return int(self.embedder.input_size)


class ModelManager(ThreadComponent):
    name = "models"

    def __init__(self, settings: Callable[[], Config], metrics: Metrics,
                 sampler_running: Callable[[], bool] = lambda: False,
                 on_switch: Callable[[], None] = lambda: None,
                 loader: Callable[[Config], Engine] | None = None) -> None:
        super().__init__()
        self.settings, self.metrics = settings, metrics
        self.load = loader or runtime.load_engine  # tests wrap the real loader to inject model faults
        self._custom_loader = loader is not None
        self.sampler_running, self.on_switch = sampler_running, on_switch
        self._state: ModelState | None = None
        self._lock = threading.Lock()
        self._next_calibration = 0.0

    def current(self) -> ModelState:
        with self._lock:
            if self._state is None:
                raise RuntimeError("the model manager has not started")
            return self._state

    def start(self) -> None:
        if self._state is None:
            cfg = self.settings()
            self._activate(cfg, self.load(cfg))
        super().start()

    def _activate(self, cfg: Config, embedder: Engine) -> tuple[int, int, int]:
        """Register and make current; returns (model id, images covered, images in all)."""
        with open_store(cfg) as store:
            model_id = activate_model(store, embedder)
            done, total = store.coverage(model_id)
            for pool, size in store.pools().items():
                self.metrics.pool_size.labels(pool).set(size)
        with self._lock:
            self._state = ModelState(embedder, model_id)
        m = embedder.info
        self.metrics.model_info.info({"source": m.source, "name": m.name, "dim": str(m.dim), "input_size": str(m.input_size),
                                      "weights": m.weights_hash[:12], "model_id": str(model_id), "runtime": embedder.runtime,
                                      "precision": embedder.precision})
        self.metrics.model_dim.set(m.dim)
        return model_id, done, total

    def switch(self, new: Config) -> bool:
        """Load the model `new` asks for and make it current; False (logged) when it cannot be loaded."""
        from poolwatch.pipeline.errors import PoolwatchError

        try:
            embedder = self.load(new)
        except PoolwatchError as exc:
            log.error("reload failed, keeping the running configuration and model: %s", exc)
            return False
        old_id = self.current().model_id
        model_id, done, total = self._activate(new, embedder)
        if model_id == old_id:
            log.info("reload: the model is unchanged (same weights and input size)")
            return True
        log.info("reload: model %d (%s) is now current; re-embedding %d of %d images in the background, "
                 "sampling uses model %d until then", model_id, embedder.info.source, total - done, total, old_id)
        self.on_switch()
        return True

    def run(self) -> None:
        while not self.stopping.wait(COVERAGE_EVERY):
            self.check_calibration()
            self.check_coverage()

    def load_cancellable(self, cfg: Config) -> Engine:
        """A load in this component's thread: a stop cancels a build in the model builder's child."""
        if self._custom_loader:
            return self.load(cfg)
        return runtime.load_engine(cfg, cancel=self.stopping)

    def check_calibration(self) -> None:
        """A store whose mode is int8 that started with too few images to calibrate on runs the interim mode;
        once it holds enough `ok` images, calibrate (in the model builder's child) and switch to int8, which
        re-embeds the images stored so far in the background like any model change."""
        if time.monotonic() < self._next_calibration:
            return
        cfg, state = self.settings(), self.current()
        try:
            with open_store(cfg) as store:
                if not runtime.awaits_calibration(store, state.embedder) or store.count_ok() < CALIBRATION_COUNT:
                    return
            log.info("the store holds %d ok images or more: calibrating int8 on them", CALIBRATION_COUNT)
            engine = self.load_cancellable(cfg)
        except Exception:  # the interim model keeps running; try again later
            if self.stopping.is_set():
                return
            log.warning("int8 calibration failed; embedding stays %s, next try in %.0fs", state.embedder.precision,
                        CALIBRATION_RETRY, exc_info=True)
            self._next_calibration = time.monotonic() + CALIBRATION_RETRY
            return
        if engine.precision != "int8":
            self._next_calibration = time.monotonic() + CALIBRATION_RETRY
            return
        model_id, done, total = self._activate(cfg, engine)
        log.info("int8 model %d is now current; re-embedding %d of %d images in the background, sampling uses "
                 "model %d until then", model_id, total - done, total, state.model_id)
        self.on_switch()

    def check_coverage(self) -> None:
        """Re-embedding progress; once the current model covers every image, older vectors go."""
        cfg, model_id = self.settings(), self.current().model_id
        try:
            with open_store(cfg) as store:
                done, total = store.coverage(model_id)
                self.metrics.reembedding.set(done / total if total else 1.0)
                if done >= total and not self.sampler_running() and store.drop_old_vectors():
                    log.info("re-embedding complete (%d images): sampling now uses model %d; older vectors removed",
                             total, model_id)
        except Exception:  # progress reporting must not take the daemon down
            log.warning("could not check re-embedding progress", exc_info=True)

    def health(self) -> str:
        if not self.alive():
            return "DEAD"
        return f"model {self._state.model_id}" if self._state is not None else "loading"
