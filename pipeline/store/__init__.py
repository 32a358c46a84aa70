"""The store package: the one interface (`Store`) over SQLite and PostgreSQL, and the only SQL in poolwatch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .backends import file_identity
from .core import Store
from .records import (
    QUALITY_COLUMNS,
    STATUSES,
    CandidateFilter,
    ImageRecord,
    KnownFile,
    Location,
    ModelRecord,
    StoreError,
    quality_condition,
    vector_hash,
    vector_tag,
)

if TYPE_CHECKING:
    from ..config import Config

__all__ = ["QUALITY_COLUMNS", "STATUSES", "CandidateFilter", "ImageRecord", "KnownFile", "Location", "ModelRecord",
           "Store", "StoreError", "file_identity", "open_store", "quality_condition", "vector_hash", "vector_tag"]


def open_store(config: Config) -> Store:
    """The configured store, opened as this node: PostgreSQL when store.url (or $POOLWATCH_STORE_URL) is set,
    else the SQLite file at store.path."""
    from ..config import mask_url

    busy = float(config.store.busy_timeout)
    url = config.store_url
    if url:
        return Store.connect(url, config.node.name or None, busy, describe=mask_url(url))
    return Store.open(config.store_path, busy, node=config.node.name or None)
