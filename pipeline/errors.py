"""Domain exceptions that callers catch without importing the heavy modules (torch) that raise them."""

from __future__ import annotations


class ModelError(ValueError):
    """The model cannot be built or its weights cannot be loaded; the message is one line."""
