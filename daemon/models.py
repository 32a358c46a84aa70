"""The model manager: the one place that knows the current model.

It loads the configured model at start (and registers it in the store), hands out an immutable
`ModelState` to whoever embeds, switches to another model when a reload asks for one (new files use
it at once, a reconcile scan re-embeds the store in the background, sampling keeps the old model's
vectors until the new one covers every image), and watches that re-embedding's progress.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from poolwatch.pipeline.config import Config
from poolwatch.pipeline.ingest import activate_model
from poolwatch.pipeline.store import Store

from . import runtime
from .component import ThreadComponent
from .metrics import Metrics

if TYPE_CHECKING:
    from poolwatch.pipeline.embed import Embedder

log = logging.getLogger(__name__)

COVERAGE_EVERY = 5.0  # seconds between re-embedding progress checks
# Settings that make another model; a reload that changes one of them switches models.
MODEL_KEYS = ("checkpoint", "device", "model", "embedding_precision")
LIGHTLY_MODEL_KEYS = ("model", "collate", "pre_trained")


def model_changed(old: Config, new: Config) -> bool:
    return (any(getattr(new, k) != getattr(old, k) for k in MODEL_KEYS)
            or any(new.lightly.get(k) != old.lightly.get(k) for k in LIGHTLY_MODEL_KEYS))


@dataclass(frozen=True)
class ModelState:
    embedder: Embedder
    model_id: int

    @property
    def input_size(self) -> int:
        return int(self.embedder.input_size)


class ModelManager(ThreadComponent):
    name = "models"

    def __init__(self, settings: Callable[[], Config], metrics: Metrics,
                 sampler_running: Callable[[], bool] = lambda: False,
                 on_switch: Callable[[], None] = lambda: None,
                 loader: Callable[[Config], Embedder] | None = None) -> None:
        super().__init__()
        self.settings, self.metrics = settings, metrics
        self.load = loader or runtime.load_embedder  # tests wrap the real loader to inject model faults
        self.sampler_running, self.on_switch = sampler_running, on_switch
        self._state: ModelState | None = None
        self._lock = threading.Lock()

    def current(self) -> ModelState:
        with self._lock:
            if self._state is None:
                raise RuntimeError("the model manager has not started")
            return self._state

    def start(self) -> None:
        if self._state is None:
            cfg = self.settings()
            runtime.configure_torch_threads()
            self._activate(cfg, self.load(cfg))
        super().start()

    def _activate(self, cfg: Config, embedder: Embedder) -> tuple[int, int, int]:
        """Register and make current; returns (model id, images covered, images in all)."""
        with Store.open(cfg.store_path, float(cfg.store.busy_timeout)) as store:
            model_id = activate_model(store, embedder)
            done, total = store.coverage(model_id)
            for pool, size in store.pools().items():
                self.metrics.pool_size.labels(pool).set(size)
        with self._lock:
            self._state = ModelState(embedder, model_id)
        m = embedder.model
        self.metrics.model_info.info({"source": m.source, "name": m.spec.name, "dim": str(m.spec.num_ftrs),
                                      "input_size": str(m.spec.input_size), "weights": m.weights_hash[:12],
                                      "model_id": str(model_id)})
        self.metrics.model_dim.set(m.spec.num_ftrs)
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
                 "sampling uses model %d until then", model_id, embedder.model.source, total - done, total, old_id)
        self.on_switch()
        return True

    def run(self) -> None:
        while not self.stopping.wait(COVERAGE_EVERY):
            self.check_coverage()

    def check_coverage(self) -> None:
        """Re-embedding progress; once the current model covers every image, older vectors go."""
        cfg, model_id = self.settings(), self.current().model_id
        try:
            with Store.open(cfg.store_path, float(cfg.store.busy_timeout)) as store:
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
