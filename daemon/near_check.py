"""Opening and reporting the near-duplicate check (pipeline/near_duplicates.py) for the CLI and the worker."""

from __future__ import annotations

import logging

from poolwatch.pipeline import near_duplicates
from poolwatch.pipeline.config import Config
from poolwatch.pipeline.near_duplicates import NearDuplicates
from poolwatch.pipeline.near_threshold import MIN_IMAGES, ThresholdCalibration
from poolwatch.pipeline.store import Store

log = logging.getLogger(__name__)


def open_near(store: Store, model_id: int, config: Config) -> NearDuplicates | None:
    """The near-duplicate check of this model, its index loaded and repaired (or rebuilt); one INFO line says its state."""
    near = near_duplicates.for_config(store, model_id, config)
    if near is None:
        log.info("near-duplicate check off (near_duplicate.threshold=-1)")
        return None
    how = "rebuilt from the store" if near.rebuilt else (f"repaired ({near.repaired} changes)" if near.repaired else "loaded")
    log.info("near-duplicate index of model %d: %d vectors, %s (%s); %s", model_id, len(near.index), how,
             "exact" if near.index.exact else "approximate", describe_threshold(near))
    return near


def describe_threshold(near: NearDuplicates) -> str:
    if near.threshold is not None:
        source = f"calibrated: {near.calibration.rule}" if near.auto and near.calibration else "set"
        return f"threshold {near.threshold:.4g} ({source})"
    return f"threshold auto: calibrated once the store holds {MIN_IMAGES} images of this model"


def log_calibrated(model_id: int, calibration: ThresholdCalibration, links: int | None = None) -> None:
    log.info("near-duplicate threshold of model %d calibrated on %d images: %s%s", model_id, calibration.images,
             calibration.rule, "" if links is None else f"; {links} earlier images linked")
